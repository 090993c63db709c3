"""The curation report: report.md, a self-contained report.html and PNG plots, rebuilt from the catalog alone.

Why from the catalog: `winnow report RUN_ID` must work later, on another machine, from the
DuckDB file only. The cut-offs it draws come from `runs.config.curate.resolved` (written by
:func:`curation.decide.curate`), the per-pair numbers from `decisions` joined to `scores`.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curation.errors import WinnowError
from curation.paths import run_dir
from curation.reads import drop_examples, eval_table, report_tables, train_curves, why_example
from curation.report_doc import (
    Block,
    Code,
    Example,
    Examples,
    Image,
    Paragraph,
    Report,
    Section,
    Table,
    markdown_table,
    render_markdown,
)
from curation.report_filtering import filtering_section
from curation.report_screen import SCREEN_PLOT, has_screen_plot, plot_screen, screen_data, screen_section
from curation.schema import DecisionReason
from curation.store import Catalog

COLOURS = {"kept": "#2a9d8f", "dropped (rules)": "#8d99ae", "beta_outlier_low": "#e76f51", "beta_outlier_high": "#e9c46a"}
STAGE_COLOURS = ("#264653", "#2a9d8f", "#8ab17d", "#e9c46a", "#f4a261", "#e76f51", "#9b5de5", "#577590")
PLOTS = ("margin.png", "edit_distance.png", "length_gap.png", "token_lengths.png")
TRAINING_PLOT = "training.png"  # written once the run has train_metrics rows


def report_dir(workdir: Path | str, run_id: str) -> Path:
    return run_dir(workdir, run_id) / "report"


def report_data(catalog: Catalog, run_id: str) -> dict[str, Any]:
    """Everything the report draws, read from the catalog (the sections' ``data``)."""
    data = report_tables(catalog, run_id)
    if not data["curate"]:
        raise WinnowError(f"run {run_id} has no curation decisions yet: run `winnow curate {run_id}` first")
    beta_reasons = [DecisionReason.BETA_OUTLIER_LOW.value, DecisionReason.BETA_OUTLIER_HIGH.value]
    data["pairs"] = data["pairs"].with_columns(
        group=pl.when(pl.col("kept")).then(pl.lit(DecisionReason.KEPT.value))
        .when(pl.col("reason").is_in(beta_reasons)).then(pl.col("reason"))
        .otherwise(pl.lit("dropped (rules)")),
        length_ratio_max=pl.max_horizontal("chosen_tokens", "rejected_tokens")
        / pl.max_horizontal(pl.min_horizontal("chosen_tokens", "rejected_tokens"), 1),
    )
    data["train"] = train_curves(catalog, run_id)
    data["evals"] = eval_table(catalog, run_id)
    data["examples"] = drop_examples(catalog, run_id)
    data["screen"] = screen_data(catalog, run_id)
    return data


def _rule(curate: dict[str, Any], reason: str) -> dict[str, Any] | None:
    for rule in curate["resolved"]["rules"]:
        if rule["reason"] == reason and rule.get("cutoff") is not None:
            return rule
    return None


def _bins(values: np.ndarray, integer: bool = False, count: int = 40) -> np.ndarray:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.linspace(0, 1, 2)
    lo, hi = float(values.min()), float(values.max())
    if integer and hi - lo <= 60:
        return np.arange(lo - 0.5, hi + 1.5, 1.0)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, count + 1)


def _stacked(ax, frame: pl.DataFrame, column: str, groups: dict[str, str], bins: np.ndarray, by: str = "group") -> None:  # noqa: ANN001
    data, labels, colours = [], [], []
    for name, colour in groups.items():
        values = frame.filter(pl.col(by) == name)[column].cast(pl.Float64).drop_nulls().to_numpy()
        if values.size:
            data.append(values)
            labels.append(f"{name} ({values.size})")
            colours.append(colour)
    if data:
        ax.hist(data, bins=bins, stacked=True, label=labels, color=colours, edgecolor="white", linewidth=0.3)
    ax.set_ylabel("pairs")
    ax.grid(axis="y", alpha=0.3)


def _vline(ax, x: float | None, label: str, colour: str = "black", style: str = "--") -> None:  # noqa: ANN001
    if x is not None and np.isfinite(x):
        ax.axvline(x, color=colour, linestyle=style, linewidth=1.4, label=label)


def _plot_margin(data: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    pairs, curate = data["pairs"], data["curate"]
    beta = curate["resolved"]["beta"]
    bins = _bins(pairs["margin"].cast(pl.Float64).drop_nulls().to_numpy(), count=50)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    _stacked(top, pairs, "margin", COLOURS, bins)
    rule = _rule(curate, "low_margin")
    if rule:
        _vline(top, rule["cutoff"], f"min margin {rule['cutoff']:.3g}", "black", "-.")
    if beta.get("mode") != "off":
        _vline(top, beta.get("margin_low"), f"beta filter cut-offs ({beta['mode']})", "#c1121f")
        _vline(top, beta.get("margin_high"), "_nolegend_", "#c1121f")
        _vline(top, beta.get("centre"), f"centre {beta['centre']:.3g} ({curate['settings']['beta']['centre']})",
               "#555555", ":")
        twin = top.twinx()
        xs = np.linspace(bins[0], bins[-1], 400)
        twin.plot(xs, np.exp(-0.5 * ((xs - beta["centre"]) / beta["scale"]) ** 2), color="#c1121f", alpha=0.5,
                  linewidth=1, label="beta weight")
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("beta weight", color="#c1121f")
        handles, labels = top.get_legend_handles_labels()
        extra, extra_labels = twin.get_legend_handles_labels()
        top.legend(handles + extra, labels + extra_labels, loc="upper left", fontsize=8)
    else:
        top.legend(loc="upper left", fontsize=8)
    top.set_title(f"Reward margin ({curate['scoring'].get('margin_source')}): kept vs dropped")

    kept = pairs.filter(pl.col("kept"))
    stages = sorted(int(s) for s in kept["stage"].unique().to_list())
    _stacked(bottom, kept.with_columns(pl.format("stage {}", pl.col("stage")).alias("stage")), "margin",
             {f"stage {s}": STAGE_COLOURS[(s - 1) % len(STAGE_COLOURS)] for s in stages}, bins, by="stage")
    table = data["stages"]
    order_by = table["order_by"][0] if table.height else ""
    if order_by == "margin":
        rows = table.sort("stage").to_dicts()
        for a, b in zip(rows, rows[1:], strict=False):
            _vline(bottom, (a["margin_min"] + b["margin_max"]) / 2, f"stage {a['stage']}|{b['stage']} boundary",
                   "#222222")
    bottom.set_title(f"Kept pairs by sDPO stage (order: {order_by}, easy first)")
    bottom.set_xlabel("margin (chosen minus rejected)")
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def _plot_edits(data: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    pairs, curate = data["pairs"], data["curate"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    _stacked(left, pairs, "token_edit_distance", COLOURS,
             _bins(pairs["token_edit_distance"].cast(pl.Float64).drop_nulls().to_numpy(), integer=True))
    rule = _rule(curate, "low_edit_distance")
    if rule and rule["column"] == "token_edit_distance":
        _vline(left, rule["cutoff"] - 0.5 if rule["threshold"]["kind"] == "value" else rule["cutoff"],
               f"min edit distance: drop < {rule['cutoff']:.3g}")
    left.set_title("Token edit distance (chosen vs rejected)")
    left.set_xlabel("tokens")
    left.legend(fontsize=8)
    _stacked(right, pairs, "token_edit_norm", COLOURS, np.linspace(0, 1, 41))
    if rule and rule["column"] == "token_edit_norm":
        _vline(right, rule["cutoff"], f"min edit distance: drop < {rule['cutoff']:.3g}")
    thresholds = curate["settings"]["advice"]
    _vline(right, thresholds["low_edit_norm"], f"advice: low-edit if <= {thresholds['low_edit_norm']:g} "
           f"(or <= {thresholds['low_edit_tokens']} tokens)", "#7b2cbf", ":")
    right.set_title("Normalised token edit distance")
    right.set_xlabel("edit distance / longer side")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def _plot_lengths(data: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    pairs, curate = data["pairs"], data["curate"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    gaps = pairs["length_gap"].cast(pl.Float64).drop_nulls().to_numpy()
    _stacked(left, pairs, "length_gap", COLOURS, _bins(gaps, integer=True))
    _vline(left, 0.0, "equal length", "#555555", ":")
    kept_gap = pairs.filter(pl.col("kept"))["length_gap"].cast(pl.Float64).mean()
    _vline(left, kept_gap, f"mean gap of kept pairs {kept_gap:.2f}" if kept_gap is not None else "", "#7b2cbf")
    left.set_title("Length gap: chosen minus rejected tokens")
    left.set_xlabel("tokens (> 0: chosen longer)")
    left.legend(fontsize=8)
    ratios = pairs["length_ratio_max"].cast(pl.Float64).drop_nulls().to_numpy()
    _stacked(right, pairs, "length_ratio_max", COLOURS, _bins(ratios, count=40))
    rule = _rule(curate, "length_ratio")
    if rule:
        _vline(right, rule["cutoff"], f"max length ratio {rule['cutoff']:.3g}")
    right.set_title("Length ratio: longer / shorter completion")
    right.set_xlabel("ratio")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def length_facts(data: dict[str, Any]) -> dict[str, Any]:
    """Token lengths against max_length (curation.filter.length_summary) for this run's pairs."""
    from curation.filter import length_summary

    curate = data["curate"]
    policy = ((curate.get("settings") or {}).get("rules") or {}).get("length_policy", "truncate")
    pairs = data["pairs"].filter(pl.col("reason") != DecisionReason.HELDOUT.value)
    return length_summary(pairs, curate["scoring"].get("max_length"), policy)


def plot_token_lengths(data: dict[str, Any], path: Path) -> None:
    """Histogram of prompt + completion tokens (chosen and rejected sequences, as TRL builds them) with max_length.

    A plot of its own (not folded into the length-gap figure), so an HTML report can reuse it.
    """
    import matplotlib.pyplot as plt

    pairs = data["pairs"].filter(pl.col("reason") != DecisionReason.HELDOUT.value)
    facts = length_facts(data)
    max_length = facts["max_length"]
    sides = {side: (pairs["prompt_tokens"] + pairs[f"{side}_tokens"]).cast(pl.Float64).drop_nulls().to_numpy()
             for side in ("chosen", "rejected")}
    values = np.concatenate(list(sides.values())) if sides else np.zeros(0)
    top = max(float(values.max(initial=0.0)), float(max_length or 0)) + 1
    bins = np.linspace(0, top, 51)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for (side, v), colour in zip(sides.items(), ("#2a9d8f", "#e76f51"), strict=True):
        if v.size:
            ax.hist(v, bins=bins, alpha=0.55, color=colour, label=f"prompt + {side} ({v.size})")
    if max_length is not None:
        verb = "dropped" if facts["length_policy"] == "drop" else "truncated by TRL"
        _vline(ax, float(max_length), f"max_length {max_length}: {facts['over']} pairs over ({verb})", "#c1121f")
    ax.set_title("Tokens per training sequence (chat template applied for conversations) against max_length")
    ax.set_xlabel("prompt + completion tokens")
    ax.set_ylabel("sequences")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def _plot_training(data: dict[str, Any], path: Path) -> None:
    """Training curves from train_metrics across the sDPO stages (one x axis, stage boundaries marked)."""
    import matplotlib.pyplot as plt

    curves = data["train"]
    offsets, start = {}, 0
    for stage in sorted(curves["stage"].unique().to_list()):
        offsets[stage] = start
        start += int(curves.filter(pl.col("stage") == stage)["step"].max() or 0)
    curves = curves.with_columns(x=pl.col("step") + pl.col("stage").replace_strict(offsets, default=0))
    panels = (("loss", "loss"), ("rewards_margins", "reward margin (chosen - rejected)"),
              ("rewards_accuracies", "reward accuracy"), ("beta", "beta"), ("kept_fraction", "kept fraction (in batch)"),
              ("learning_rate", "learning rate"))
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
    for ax, (column, label) in zip(axes.flat, panels, strict=True):
        for stage in offsets:
            part = curves.filter(pl.col("stage") == stage).drop_nulls(column)
            if part.height:
                ax.plot(part["x"].to_numpy(), part[column].to_numpy(), marker=".", linewidth=1.2,
                        color=STAGE_COLOURS[(stage - 1) % len(STAGE_COLOURS)], label=f"stage {stage}")
        for offset in offsets.values():
            if offset:
                _vline(ax, offset, "_nolegend_", "#888888", ":")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step (all stages)")
    fig.suptitle(f"Training curves ({', '.join(sorted(set(curves['objective'].drop_nulls().to_list())))})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


_table = markdown_table  # sections written as markdown lines call it by this name


# -- sections: each one a function of (run_id, data), in report order; None leaves it out ----------


def _lead(run_id: str, data: dict[str, Any]) -> str:
    scoring, pairs = data["curate"]["scoring"], data["pairs"]
    total, kept = pairs.height, int(pairs["kept"].sum())
    return (f"{total} pairs: **{kept} kept** in {data['stages'].height} stage(s), {total - kept} dropped. "
            f"Margin source `{scoring.get('margin_source')}`, tokenizer `{scoring.get('tokenizer')}`, "
            f"max_length {scoring.get('max_length')}.")


def decisions_section(run_id: str, data: dict[str, Any]) -> Section:
    total = max(data["pairs"].height, 1)
    rows = [[r["reason"], r["stage"], r["pairs"], f"{r['pairs'] / total:.1%}"] for r in data["by_reason"].to_dicts()]
    return Section("decisions", "Decisions by reason and stage", [Table(["reason", "stage", "pairs", "share"], rows)])


def stages_section(run_id: str, data: dict[str, Any]) -> Section:
    shards = {r["stage"]: r for r in data["shards"].to_dicts()}
    rows = [[s["stage"], s["pairs"], s["margin_min"], s["margin_max"], s["margin_mean"],
             Path(shards.get(s["stage"], {}).get("path", "")).name, (shards.get(s["stage"], {}).get("sha256") or "")[:16]]
            for s in data["stages"].to_dicts()]
    order_by = data["stages"]["order_by"][0] if data["stages"].height else ""
    return Section("stages", "Stages", [
        Paragraph(f"Ordered by `{order_by}`, easy first."),
        Table(["stage", "pairs", "margin min", "margin max", "margin mean", "shard", "sha256 (16)"], rows)])


def filters_section(run_id: str, data: dict[str, Any]) -> Section:
    curate = data["curate"]
    beta, settings = curate["resolved"]["beta"], curate["settings"]["beta"]
    rows = [[r["reason"], r.get("column"), r.get("bound"), _threshold_text(r.get("threshold")), r.get("cutoff"),
             r["failing"], r["dropped"]] for r in curate["resolved"]["rules"]]
    blocks: list[Block] = [Table(["rule", "column", "bound", "threshold", "cut-off", "failing",
                                  "dropped (first reason)"], rows)]
    if beta.get("mode") == "off":
        blocks.append(Paragraph("Beta-guided filter: off."))
    else:
        cut = (f" Weight cut-off {beta['weight_cutoff']:.3g}: kept margins lie in "
               f"[{beta['margin_low']:.4g}, {beta['margin_high']:.4g}]." if beta.get("weight_cutoff") is not None else "")
        blocks.append(Paragraph(
            f"Beta-guided filter: mode `{beta['mode']}`, keep {settings['keep']}, centre `{settings['centre']}` "
            f"({beta['centre']:.4g}), scale {beta['scale']:.4g}, seed {settings['seed']}; kept {beta['kept']}, "
            f"dropped {beta['dropped']}.{cut}"))
    heldout = curate["resolved"].get("heldout")
    if heldout and heldout["heldout_pairs"]:
        blocks.append(Paragraph(
            f"Held out for evaluation: {heldout['heldout_pairs']} pairs ({heldout['heldout_prompts']} of "
            f"{heldout['prompts']} prompts; decision reason `heldout`, never in a shard)."))
    return Section("filters", "Filters", blocks)


def lengths_section(run_id: str, data: dict[str, Any]) -> Section:
    """Token lengths against max_length: how many pairs are over it and what happens to them."""
    facts = length_facts(data)
    max_length, policy = facts["max_length"], facts["length_policy"]
    if max_length is None:
        return Section("lengths", "Lengths", [Paragraph("No max_length: nothing is truncated.")])
    over, kept = facts["over"], facts.get("over_kept", 0)
    if over == 0:
        effect = "nothing is truncated"
    elif policy == "drop":
        effect = f"{facts.get('dropped_over', 0)} dropped (`over_max_length`)"
    else:
        effect = f"{kept} of them kept, which TRL truncates to {max_length} tokens"
    rows = [["max_length", max_length], ["length_policy", policy],
            ["pairs over max_length", f"{over} of {facts['pairs']} ({facts['over_share']:.1%})"],
            ["prompt alone fills max_length (dropped: too_long)", facts.get("prompt_fills", 0)],
            ["prompt + longer completion: median / p90 / p99 / max",
             " / ".join(f"{facts[k]:.0f}" for k in ("p50", "p90", "p99", "max") if k in facts)]]
    return Section("lengths", "Lengths", [
        Paragraph(f"Pairs over max_length: {over}; {effect}."), Table(["", "value"], rows, numeric=[False, False]),
        Image("token_lengths.png", "token lengths", "Prompt + completion tokens of every training sequence against "
                                                    "max_length.")])


def advice_section(run_id: str, data: dict[str, Any]) -> Section | None:
    if not data["advice"].height:
        return None
    advice = data["advice"].row(0, named=True)
    evidence = json.loads(advice["evidence"])
    signals = [["low edit distance", evidence["signals"]["low_edit"], _numbers(evidence["edit_distance"])],
               ["length bias", evidence["signals"]["length_bias"], _numbers(evidence["length"])],
               ["noisy margins", evidence["signals"]["noisy_margins"], _numbers(evidence["margins"])]]
    return Section("advice", "Objective advice", [
        Paragraph(f"**{advice['objective']}** with params `{advice['params']}`."), Paragraph(advice["rationale"]),
        Table(["signal", "fired", "numbers"], signals)])


def plots_section(run_id: str, data: dict[str, Any]) -> Section:
    return Section("plots", "Plots", [
        Image("margin.png", "margin", "Reward margins, kept and dropped, with the filters' cut-offs; below, the kept "
                                      "pairs by sDPO stage with the stage boundaries."),
        Image("edit_distance.png", "edit distance", "Token edit distance between chosen and rejected, with the "
                                                    "low-edit cut-off and the advice's threshold."),
        Image("length_gap.png", "length gap", "Chosen minus rejected length, and the longer/shorter ratio with its "
                                              "cut-off.")])


def training_section(run_id: str, data: dict[str, Any]) -> Section | None:
    curves = data["train"]
    if not curves.height:
        return None
    rows = []
    for stage in curves.partition_by("stage", maintain_order=True):
        first, last = stage.row(0, named=True), stage.row(-1, named=True)
        rows.append([first["stage"], first["objective"], last["step"], first["loss"], last["loss"],
                     last["rewards_margins"], last["rewards_accuracies"], last["beta"], last["kept_fraction"]])
    return Section("training", "Training", [
        Paragraph(f"{curves.height} logged steps in `train_metrics` over {len(rows)} stage(s) (`winnow query \"... FROM "
                  f"train_metrics\"`; trackers get the same numbers through `train.report_to`)."),
        Table(["stage", "objective", "steps", "first loss", "last loss", "last reward margin", "last accuracy",
               "last beta", "last kept fraction"], rows),
        Image(TRAINING_PLOT, "training curves", "Loss, reward margin and accuracy, beta, beta-DPO's kept fraction and "
                                                "the learning rate per logged step; dotted lines: stage boundaries.")])


def evaluation_section(run_id: str, data: dict[str, Any]) -> Section | None:
    evals = data["evals"]
    if not evals.height:
        return None
    values = {(r["model"], r["metric"]): r for r in evals.to_dicts()}
    rows = []
    for (model, metric), r in values.items():
        if metric.endswith("_ref") or metric == "kl_se":
            continue
        ref = values.get((model, f"{metric}_ref"))
        se = values.get((model, "kl_se")) if metric == "kl" else None
        rows.append([model, metric, r["value"], ref["value"] if ref else None, se["value"] if se else None, r["n"]])
    return Section("evaluation", "Evaluation", [
        Paragraph("Held-out evaluation of the trained policy against the reference (rows of `evals`)."),
        Table(["model", "metric", "policy", "reference", "standard error", "n"], rows)])


def examples_section(run_id: str, data: dict[str, Any]) -> Section | None:
    examples = data["examples"]
    if not examples.height:
        return None
    blocks: list[Block] = [Paragraph("For each reason a pair was dropped, the most telling few (lowest beta weight, "
                                     "then largest margin), whole, with the decision's own words.")]
    for part in examples.partition_by("reason", maintain_order=True):
        pairs = [Example(r["pair_id"], r["prompt"], r["chosen"], r["rejected"], r["margin"], r["detail"] or "",
                         r["weight"]) for r in part.to_dicts()]
        blocks.append(Examples(part["reason"][0], int(part["reason_pairs"][0]), pairs))
    return Section("examples", "Dropped pairs, by reason", blocks)


def catalog_section(run_id: str, data: dict[str, Any]) -> Section:
    return Section("catalog", "Ask the catalog", [
        Paragraph("Why was a pair dropped (a pair_id prefix is enough):"), Code(why_example(run_id))])


# A section written as markdown lines (with its "## Title") joins as
# `lambda run_id, data: markdown_section("key", lines_of(data))` (curation.report_doc.markdown_section).
SECTIONS = [decisions_section, plots_section, filters_section, filtering_section, screen_section, lengths_section, stages_section, advice_section,
            training_section, evaluation_section, examples_section, catalog_section]


def report_document(run_id: str, data: dict[str, Any]) -> Report:
    """The report as sections (curation.report_doc); both renderers draw this."""
    sections = [s for s in (make(run_id, data) for make in SECTIONS) if s is not None]
    return Report(f"Curation report: {run_id}", _lead(run_id, data), sections)


def _threshold_text(threshold: dict[str, Any] | None) -> str:
    if threshold is None:
        return "off"
    if threshold["kind"] == "flag":
        return str(threshold["value"])
    return f"{threshold['kind']} {threshold['value']:g}"


def _numbers(section: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in section.items())


def build_report(catalog: Catalog, run_id: str, out_dir: Path | None = None) -> Path:
    """Write report.md, report.html and the PNGs for a curated run; returns the markdown path.

    Training curves and evaluation results appear once the run has `train_metrics` and `evals`
    rows (the pipeline rebuilds the report after training).
    """
    import matplotlib

    from curation.report_html import render_html

    matplotlib.use("Agg")
    data = report_data(catalog, run_id)
    out = Path(out_dir) if out_dir else report_dir(catalog.workdir, run_id)
    out.mkdir(parents=True, exist_ok=True)
    _plot_margin(data, out / "margin.png")
    _plot_edits(data, out / "edit_distance.png")
    _plot_lengths(data, out / "length_gap.png")
    plot_token_lengths(data, out / "token_lengths.png")
    (out / SCREEN_PLOT).unlink(missing_ok=True)
    if has_screen_plot(data["screen"]):
        plot_screen(data["screen"], out / SCREEN_PLOT)
    (out / TRAINING_PLOT).unlink(missing_ok=True)
    if data["train"].height:
        _plot_training(data, out / TRAINING_PLOT)
    document = report_document(run_id, data)
    (out / "report.html").write_text(render_html(document, out), encoding="utf-8")
    path = out / "report.md"
    path.write_text(render_markdown(document), encoding="utf-8")
    return path


def html_path(report_path: Path) -> Path:
    """report.html beside report.md."""
    return Path(report_path).with_suffix(".html")


_LOCAL_IMAGE = re.compile(r"!\[([^\]]*)\]\(([A-Za-z0-9_.-]+\.png)\)")


def data_uri(path: Path) -> str:
    """A PNG as a data: URI, for documents that must carry their images (HTML report, Prefect artifact)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def embedded_markdown(report_path: Path) -> str:
    """report.md with its plots inlined as data URIs: Prefect's UI cannot load the files beside it.

    Only bare file names in the report's own folder are inlined (the report links nothing else).
    """
    folder = Path(report_path).parent

    def inline(match: re.Match[str]) -> str:
        image = folder / match.group(2)
        return f"![{match.group(1)}]({data_uri(image)})" if image.is_file() else match.group(0)

    return _LOCAL_IMAGE.sub(inline, Path(report_path).read_text(encoding="utf-8"))
