"""The gym's report: markdown tables, plots, and GYM.md (hand-written notes below a marker are kept)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from training.gym.arms import ARM_DESCRIPTIONS
from training.gym.claims import decide_defaults, evaluate_claims, part_effects, per_seed_values, stat
from training.gym.measure import TABLE_METRICS

if TYPE_CHECKING:
    from training.gym.runner import GymResult

PLOT_METRICS: tuple[str, ...] = (
    "gold_reward", "gold_reward_sampled", "win_rate", "len_tokens", "filler_rate",
    "len_tokens_sampled", "implicit_acc", "chosen_drift_low_edit", "chosen_drift_high_edit", "kl",
)
NOTES_MARKER = "<!-- notes: everything below this line is kept when the gym rewrites this file -->"



def _cell(mean: float, std: float, digits: int) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    text = f"{mean:.{digits}f}"
    if std is not None and math.isfinite(std):
        text += f" ± {std:.{digits}f}"
    return text


_DIGITS = {"gold_reward": 3, "gold_reward_sampled": 3, "win_rate": 3, "len_tokens": 2, "len_tokens_sampled": 2, "filler_rate_sampled": 3,
           "filler_rate": 3,
           "implicit_acc": 3, "chosen_drift": 2, "chosen_drift_low_edit": 2, "chosen_drift_high_edit": 2, "kl": 2}


def _levels(result: GymResult) -> list[float]:
    return list(result.config.noise_levels) if "noise" in result.per_seed.columns else [result.config.primary_noise]


def _at(result: GymResult, noise: float) -> GymResult:
    return result.at(noise) if "noise" in result.per_seed.columns else result


def markdown_table(result: GymResult, noise: float | None = None) -> str:
    """Mean ± sample std across seeds, one row per arm (plus the reference); one table per noise level."""
    if noise is None and len(_levels(result)) > 1:
        return "\n\n".join(f"Label noise {n:.0%}:\n\n" + markdown_table(result, n) for n in _levels(result))
    result = _at(result, noise if noise is not None else _levels(result)[0])
    head = ["arm", "pairs", "steps", *TABLE_METRICS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for arm in ("reference", *result.config.arms):
        cells = [f"`{arm}`"]
        pairs, _ = stat(result.summary, arm, "pairs")
        steps, _ = stat(result.summary, arm, "steps")
        cells += [f"{pairs:.0f}" if pairs else "–", f"{steps:.0f}" if steps else "–"]
        for metric in TABLE_METRICS:
            mean, std = stat(result.summary, arm, metric)
            cells.append(_cell(mean, std, _DIGITS.get(metric, 3)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(result: GymResult) -> str:
    cols = ["noise", "seed", "arm", "pairs", "steps", "gold_reward", "gold_reward_sampled", "win_rate", "len_tokens",
            "filler_rate",
            "len_tokens_sampled", "implicit_acc", "chosen_drift_low_edit", "chosen_drift_high_edit", "rejected_drift",
            "kl", "train_seconds"]
    frame = result.per_seed.select([c for c in cols if c in result.per_seed.columns])
    frame = frame.sort([c for c in ("noise", "seed") if c in frame.columns], maintain_order=True)
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "|".join("---:" for _ in frame.columns) + "|"]
    noise = frame.columns.index("noise") if "noise" in frame.columns else -1
    for row in frame.iter_rows():
        lines.append("| " + " | ".join(f"{v:.0%}" if i == noise else f"{v:.3f}" if isinstance(v, float) else str(v)
                                       for i, v in enumerate(row)) + " |")
    return "\n".join(lines)


def filter_table(result: GymResult) -> str:
    lines = ["| noise | seed | pairs | flipped | dropped by rules | dropped by beta filter (low / high) | precision "
             "| recall | precision, low tail | flipped share kept |", "|" + "---:|" * 10]
    for s in result.seeds:
        f = s.filter
        lines.append(f"| {s.noise:.0%} | {s.seed} | {s.raw_pairs} | {f['flipped']} | {f['dropped_by_rules']} | {f['dropped']} "
                     f"({f['dropped_low_tail']} / {f['dropped'] - f['dropped_low_tail']}) | {f['precision']:.3f} | "
                     f"{f['recall']:.3f} | {f['precision_low_tail']:.3f} | {f['flipped_share_kept']:.3f} |")
    return "\n".join(lines)


def effects_table(result: GymResult) -> str:
    """Each part's effect on gold reward, paired by seed, at every noise level (training.gym.part_effects)."""
    levels = _levels(result)
    effects = part_effects(result)
    head = ["part", "with / without", *[f"label noise {n:.0%}" for n in levels]]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(levels)]
    for part, with_arm, without_arm in dict.fromkeys((e.part, e.with_arm, e.without_arm) for e in effects):
        cells = []
        for n in levels:
            e = next(x for x in effects if x.part == part and x.noise == n)
            cells.append("–" if not e.diffs else f"{e.mean:+.3f} ± {e.std:.3f} ({e.verdict})" if math.isfinite(e.std)
                         else f"{e.mean:+.3f} ({e.verdict})")
        lines.append(f"| {part} | `{with_arm}` / `{without_arm}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decisions_table(result: GymResult) -> str:
    lines = ["| setting | default before | the gym's decision | rule | effect (gold reward) |", "|---|---|---|---|---|"]
    for d in decide_defaults(result):
        lines.append(f"| `{d.setting}` | {d.default_before} | **{d.decision}** | {d.rule} | {d.evidence} |")
    return "\n".join(lines)


def plot_results(result: GymResult, out_dir: Path) -> list[Path]:
    """Bar charts (mean across seeds) with one dot per seed, one panel per metric, at the primary noise
    level, and gold reward by arm at every level; returns the PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    full, result = result, _at(result, result.config.primary_noise)
    out_dir.mkdir(parents=True, exist_ok=True)
    arms = ["reference", *result.config.arms]
    colours = {"reference": "#9e9e9e", "trl-dpo": "#d62728", "winnow-curated": "#2ca02c"}
    fig, axes = plt.subplots(2, 5, figsize=(22, 8.5))
    for ax, metric in zip(axes.flat, PLOT_METRICS, strict=True):
        means = [stat(result.summary, a, metric)[0] for a in arms]
        x = np.arange(len(arms))
        ax.bar(x, [0 if not math.isfinite(m) else m for m in means],
               color=[colours.get(a, "#1f77b4") for a in arms], alpha=0.75)
        for i, arm in enumerate(arms):
            values = per_seed_values(result.per_seed, arm, metric)
            jitter = np.linspace(-0.18, 0.18, len(values)) if len(values) > 1 else np.zeros(len(values))
            ax.scatter(i + jitter, values, color="black", s=12, zorder=3)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(x, arms, rotation=45, ha="right", fontsize=8)
        ax.set_title(TABLE_METRICS.get(metric, metric), fontsize=10)
    n = len(result.config.seeds)
    fig.suptitle(f"Preference gym at {result.config.primary_noise:.0%} label noise: mean over {n} seed(s) (bars) and "
                 "each seed (dots); held-out sorting prompts", fontsize=12)
    fig.tight_layout()
    metrics_png = out_dir / "metrics.png"
    fig.savefig(metrics_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    subsets = (("chosen_drift_low_edit", "low-edit pairs"), ("chosen_drift_high_edit", "high-edit pairs"),
               ("rejected_drift", "rejected (all)"))
    width = 0.27
    x = np.arange(len(arms))
    for j, (metric, label) in enumerate(subsets):
        means = [stat(result.summary, a, metric)[0] for a in arms] if metric in result.per_seed.columns else []
        if not means:
            continue
        ax.bar(x + (j - 1) * width, [0 if not math.isfinite(m) else m for m in means], width, label=label)
        for i, arm in enumerate(arms):
            values = per_seed_values(result.per_seed, arm, metric)
            ax.scatter(np.full(len(values), i + (j - 1) * width), values, color="black", s=8, zorder=3)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, arms, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean log pi(y) - log ref(y)")
    ax.set_title("Log-prob drift on held-out clean pairs: chosen (by edit distance) and rejected")
    ax.legend(fontsize=8)
    fig.tight_layout()
    drift_png = out_dir / "drift.png"
    fig.savefig(drift_png, dpi=110)
    plt.close(fig)

    levels = _levels(full)
    fig, ax = plt.subplots(figsize=(max(10, 0.9 * len(arms) * len(levels) / 2), 4.8))
    width = 0.8 / len(levels)
    for j, noise in enumerate(levels):
        level = _at(full, noise)
        offset = (j - (len(levels) - 1) / 2) * width
        means = [stat(level.summary, a, "gold_reward")[0] for a in arms]
        ax.bar(x + offset, [0 if not math.isfinite(m) else m for m in means], width, label=f"noise {noise:.0%}")
        for i, arm in enumerate(arms):
            values = per_seed_values(level.per_seed, arm, "gold_reward")
            ax.scatter(np.full(len(values), i + offset), values, color="black", s=6, zorder=3)
    finite = [v for v in full.per_seed["gold_reward"].drop_nulls().to_list() if math.isfinite(v)]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.03))
    ax.set_xticks(x, arms, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("gold reward (greedy, held-out)")
    ax.set_title("Gold reward by arm and label noise (bars: mean over seeds; dots: seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    gold_png = out_dir / "gold_by_noise.png"
    fig.savefig(gold_png, dpi=110)
    plt.close(fig)
    return [gold_png, metrics_png, drift_png]


def render_report(result: GymResult, command: str, plots: Sequence[Path], report_path: Path) -> str:
    """GYM.md: setup, each part's effect, the defaults it decides, the tables and claims per noise level,
    the filter against the truth and every per-seed number."""
    c = result.config
    levels = _levels(result)
    claims = [cl for n in levels for cl in evaluate_claims(result, n)]
    rel = [os.path.relpath(p, report_path.parent) for p in plots]
    m = result.machine
    load = (f"load average (1/5/15 min) {m['loadavg_before']} at the start, {m['loadavg_after']} at the end"
            if m.get("loadavg_before") else "load average unavailable")
    busy = bool(m.get("loadavg_before")) and max(m["loadavg_before"][0],
                                                 (m.get("loadavg_after") or [0])[0]) > 0.5 + c.workers
    advice = {json.dumps({"objective": s.advice["objective"], "params": s.advice["params"]}, sort_keys=True)
              for s in result.seeds}
    steps = sorted({s.steps for s in result.seeds})
    seconds = {k: np.mean([s.seconds.get(k, 0.0) for s in result.seeds]) for k in ("reference_sft", "score", "curate")}
    arm_time = result.per_seed.filter(pl.col("arm") != "reference")
    primary = c.primary_noise
    lines = [
        "# Preference gym",
        "",
        "Every method side by side on a task whose truth is known (sorting short lists; gold reward = share of",
        "correctly placed numbers), at several label-noise levels, with ablations of the curated arm. Generated by",
        "one command; the numbers below are not edited by hand.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"**Wall time: {result.wall_seconds / 60:.1f} min ({result.wall_seconds:.0f} s)** for {len(c.seeds)} seeds x "
        f"{len(levels)} noise level(s) x {len(c.arms)} arms on {m.get('cpus')} CPU cores, {c.workers} worker "
        f"process(es), no GPU; {load}." + (" The machine was shared with other jobs while this ran, so timings are "
                                           "noisy." if busy else ""),
        "",
        f"Per seed on average: reference SFT {seconds['reference_sft']:.0f} s, scoring {seconds['score']:.0f} s, "
        f"curation {seconds['curate']:.1f} s (every curation variant); per arm: training "
        f"{arm_time['train_seconds'].mean():.0f} s, evaluation {arm_time['eval_seconds'].mean():.0f} s.",
        "",
        "## Setup",
        "",
        f"- **Data**, one set per noise level ({', '.join(f'{n:.0%}' for n in levels)}) and seed "
        f"({', '.join(map(str, c.seeds))}): `PreferenceSetConfig(size={c.size}, label_noise=<level>, "
        f"verbosity_bias={c.verbosity_bias}, low_edit_share={c.low_edit_share}, margin_spread={c.margin_spread}, "
        f"rating_noise={c.rating_noise})`, seed = gym seed; written as JSONL (truth columns removed) and ingested "
        "like user data. The ratings (`score_chosen/score_rejected`) are the margin source curation uses.",
        "- **Reference**: one winnow-tiny model per noise level and seed (2-layer Llama, local BPE tokenizer), "
        f"SFT'd on that set's prompt -> chosen pairs ({c.tiny.sft_steps} steps), as the pipeline builds it. Every "
        "arm of a set starts from it and is measured against it, so seed spread includes the reference.",
        f"- **Budget**: every arm of a set makes the same number of optimizer steps, {c.epochs:g} pass(es) over the "
        f"raw set at batch {c.batch_size} ({', '.join(map(str, steps))} steps); lr {c.learning_rate:g} linear with "
        f"10% warm-up, max_length {c.max_length}, training seed = gym seed. Arms on fewer pairs (filtered) see them "
        "more often; staged arms split the steps over their stages by size (a fresh schedule per stage, as sDPO).",
        "- **Arms**: " + "; ".join(f"`{a}`: {ARM_DESCRIPTIONS[a]}" for a in c.arms) + ".",
        f"- **Curation advice** (objective `auto` of the curated arms, default curation): {'; '.join(sorted(advice))}.",
        f"- **Evaluation**: one held-out set for all seeds, levels and arms, prompts and pairs disjoint from every "
        f"training prompt: {result.heldout.get('prompts')} prompts sampled greedily from policy and reference "
        f"(gold reward, win rate with ties half, length) and once at temperature 1 from the policy (KL estimate "
        f"mean log pi/ref, plus the sampled length and filler share), {result.heldout.get('pairs')} clean pairs "
        f"({result.heldout.get('low_edit_pairs')} low-edit, same pathology mix, no label noise) for implicit-reward "
        f"accuracy (summed log-ratios, beta {c.eval_beta}) and chosen drift = mean log pi(chosen) - log ref(chosen). "
        "Rows are in each set's catalog `evals` table (model = arm).",
        "- **Spread**: ± is the sample standard deviation across seeds (ddof 1); per-seed numbers are at the end.",
        "",
        "## Each part's effect",
        "",
        "Gold reward with the part minus without it, paired by seed: mean ± sample std of the per-seed differences. "
        "\"helps\" / \"hurts\" when the mean is beyond one std (rule fixed before the run: "
        "`training.gym.part_effects`).",
        "",
        effects_table(result),
        "",
        "## Defaults the gym decides",
        "",
        f"Rules fixed before the run (`training.gym.decide_defaults`): a default moves only when its part's effect at "
        f"{primary:.0%} noise says so and it hurts at no other level.",
        "",
        decisions_table(result),
        "",
        *[f"![{Path(p).stem}]({r})" for p, r in zip(plots, rel, strict=True)],
        "",
    ]
    for n in levels:
        lines += [f"## Results at {n:.0%} label noise", "", markdown_table(result, n), ""]
    lines += [
        "The `reference` row is the start model measured against itself: win rate 0.5, drift 0, KL 0 and implicit "
        "accuracy 0 (a zero margin counts as wrong) hold by construction and check the plumbing. Lengths exclude "
        "eos; \"filler share\" is the share of responses carrying words (a filler phrase) rather than only numbers. "
        "Implicit accuracy uses summed log-ratios for every arm, also for LN-DPO.",
        "",
        "## Claims",
        "",
        "Each rule was fixed before the numbers were seen (see `training.gym.evaluate_claims`); nothing was tuned.",
        "",
        "| claim | noise | verdict | numbers |",
        "|---|---|---|---|",
        *[f"| {cl.statement} | {cl.noise:.0%} | **{cl.verdict}** | {cl.evidence} |" for cl in claims],
        "",
        "## Beta-guided filter against the truth",
        "",
        "Curation's default filter (median/MAD centre, keep 0.8, threshold mode) on the ratings margin; precision = "
        "flipped among the pairs it dropped, recall = flipped pairs it dropped / all flipped pairs.",
        "",
        filter_table(result),
        "",
        "## Per seed",
        "",
        per_seed_table(result),
        "",
        NOTES_MARKER,
    ]
    return "\n".join(lines) + "\n"


def write_report(result: GymResult, report_path: Path, plots_dir: Path, command: str) -> Path:
    """Write GYM.md and its plots; hand-written notes below NOTES_MARKER in an existing file are kept."""
    report_path = Path(report_path)
    plots = plot_results(result, plots_dir)
    text = render_report(result, command, plots, report_path)
    if report_path.is_file():
        old = report_path.read_text()
        if NOTES_MARKER in old:
            text += old.split(NOTES_MARKER, 1)[1].lstrip("\n")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text)
    return report_path

