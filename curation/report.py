"""The curation report: markdown plus PNG plots, rebuilt from the catalog alone.

Why from the catalog: `winnow report RUN_ID` must work later, on another machine, from the
DuckDB file only. The cut-offs it draws come from `runs.config.curate.resolved` (written by
:func:`curation.decide.curate`), the per-pair numbers from `decisions` joined to `scores`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curation.errors import WinnowError
from curation.reads import report_tables, why_example
from curation.schema import DecisionReason
from curation.store import Catalog

COLOURS = {"kept": "#2a9d8f", "dropped (rules)": "#8d99ae", "beta_outlier_low": "#e76f51", "beta_outlier_high": "#e9c46a"}
STAGE_COLOURS = ("#264653", "#2a9d8f", "#8ab17d", "#e9c46a", "#f4a261", "#e76f51", "#9b5de5", "#577590")
PLOTS = ("margin.png", "edit_distance.png", "length_gap.png")


def report_dir(workdir: Path | str, run_id: str) -> Path:
    return Path(workdir) / run_id / "report"


def _load(catalog: Catalog, run_id: str) -> dict[str, Any]:
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


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(run_id: str, data: dict[str, Any]) -> str:
    curate, pairs = data["curate"], data["pairs"]
    scoring, beta = curate["scoring"], curate["resolved"]["beta"]
    total, kept = pairs.height, int(pairs["kept"].sum())
    out = [f"# Curation report: {run_id}", "",
           f"{total} pairs: **{kept} kept** in {data['stages'].height} stage(s), {total - kept} dropped. "
           f"Margin source `{scoring.get('margin_source')}`, tokenizer `{scoring.get('tokenizer')}`, "
           f"max_length {scoring.get('max_length')}.", "", "## Decisions by reason and stage", ""]
    rows = [[r["reason"], r["stage"], r["pairs"], f"{r['pairs'] / total:.1%}"] for r in data["by_reason"].to_dicts()]
    out += [_table(["reason", "stage", "pairs", "share"], rows), "", "## Stages", ""]
    shards = {r["stage"]: r for r in data["shards"].to_dicts()}
    rows = [[s["stage"], s["pairs"], s["margin_min"], s["margin_max"], s["margin_mean"],
             Path(shards.get(s["stage"], {}).get("path", "")).name, (shards.get(s["stage"], {}).get("sha256") or "")[:16]]
            for s in data["stages"].to_dicts()]
    order_by = data["stages"]["order_by"][0] if data["stages"].height else ""
    out += [f"Ordered by `{order_by}`, easy first.", "",
            _table(["stage", "pairs", "margin min", "margin max", "margin mean", "shard", "sha256 (16)"], rows), "",
            "## Filters", ""]
    rows = [[r["reason"], r.get("column"), r.get("bound"),
             _threshold_text(r.get("threshold")),
             r.get("cutoff"), r["failing"], r["dropped"]] for r in curate["resolved"]["rules"]]
    out += [_table(["rule", "column", "bound", "threshold", "cut-off", "failing", "dropped (first reason)"], rows), ""]
    settings = curate["settings"]["beta"]
    if beta.get("mode") == "off":
        out += ["Beta-guided filter: off.", ""]
    else:
        cut = (f" Weight cut-off {beta['weight_cutoff']:.3g}: kept margins lie in "
               f"[{beta['margin_low']:.4g}, {beta['margin_high']:.4g}]." if beta.get("weight_cutoff") is not None else "")
        out += [f"Beta-guided filter: mode `{beta['mode']}`, keep {settings['keep']}, centre `{settings['centre']}` "
                f"({beta['centre']:.4g}), scale {beta['scale']:.4g}, seed {settings['seed']}; kept {beta['kept']}, "
                f"dropped {beta['dropped']}.{cut}", ""]
    out += filtering_section(data)
    if data["advice"].height:
        advice = data["advice"].row(0, named=True)
        evidence = json.loads(advice["evidence"])
        out += ["## Objective advice", "", f"**{advice['objective']}** with params `{advice['params']}`.", "",
                advice["rationale"], "", _table(["signal", "fired", "numbers"], [
                    ["low edit distance", evidence["signals"]["low_edit"], _numbers(evidence["edit_distance"])],
                    ["length bias", evidence["signals"]["length_bias"], _numbers(evidence["length"])],
                    ["noisy margins", evidence["signals"]["noisy_margins"], _numbers(evidence["margins"])]]), ""]
    out += ["## Plots", "", "![margin](margin.png)", "", "![edit distance](edit_distance.png)", "",
            "![length gap](length_gap.png)", "", "## Ask the catalog", "",
            "Why was a pair dropped (a pair_id prefix is enough):", "", "```sql",
            why_example(run_id), "```", ""]
    return "\n".join(out)


def filtering_section(data: dict[str, Any]) -> list[str]:
    """Markdown lines: the total share of the pairs dropped and where (rules, offline beta filter, online
    rounds, beta-DPO's in-batch filter), from the decisions, the online rounds and the advice's policy."""
    pairs, total = data["pairs"], max(data["pairs"].height, 1)
    beta_reasons = [DecisionReason.BETA_OUTLIER_LOW.value, DecisionReason.BETA_OUTLIER_HIGH.value]
    ruled = int((~pairs["kept"] & ~pairs["reason"].is_in(beta_reasons)).sum())
    beta = int(pairs["reason"].is_in(beta_reasons).sum())
    kept = int(pairs["kept"].sum())
    rows: list[list[Any]] = [["rule filters (offline)", ruled, f"{ruled / total:.1%}", "per pair in `decisions`"],
                             ["beta-guided filter (offline)", beta, f"{beta / total:.1%}", "per pair in `decisions`"]]
    for r in data.get("rounds", pl.DataFrame()).to_dicts():
        rows.append([f"online round {r['round']} (after stage {r['round']})", 0, "0.0%",
                     f"re-decided {r['pairs']} pairs: {r['readmitted']} re-admitted, {r['newly_dropped']} newly "
                     "dropped (same share; `decision_rounds`)"])
    filtering = {}
    if data["advice"].height:
        filtering = json.loads(data["advice"].row(0, named=True)["evidence"]).get("filtering") or {}
    in_batch = filtering.get("in_batch_keep")
    batch_drop = kept * (1 - in_batch) if in_batch is not None else 0.0
    rows.append(["beta-DPO in-batch filter (training)", round(batch_drop), f"{batch_drop / total:.1%}",
                 f"keeps {in_batch:.1%} of each batch (expected)" if in_batch is not None else
                 "none: the objective has no in-batch filter"])
    dropped = ruled + beta + batch_drop
    rows.append(["**total**", round(dropped), f"**{dropped / total:.1%}**", f"{total - dropped:.0f} of {total} pairs "
                 "reach the loss"])
    policy = (f"Policy `{filtering['policy']}` (keep {filtering['filter_keep']:g}, the paper's rho, for the beta "
              "filters together), recorded with the advice." if filtering else "No filtering policy recorded.")
    return ["## What was dropped, and where", "", policy, "",
            _table(["where", "pairs", "share of all", "note"], rows), ""]


def _threshold_text(threshold: dict[str, Any] | None) -> str:
    if threshold is None:
        return "off"
    if threshold["kind"] == "flag":
        return str(threshold["value"])
    return f"{threshold['kind']} {threshold['value']:g}"


def _numbers(section: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in section.items())


def build_report(catalog: Catalog, run_id: str, out_dir: Path | None = None) -> Path:
    """Write report.md and the PNGs for a curated run; returns the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    data = _load(catalog, run_id)
    out = Path(out_dir) if out_dir else report_dir(catalog.workdir, run_id)
    out.mkdir(parents=True, exist_ok=True)
    _plot_margin(data, out / "margin.png")
    _plot_edits(data, out / "edit_distance.png")
    _plot_lengths(data, out / "length_gap.png")
    path = out / "report.md"
    path.write_text(_markdown(run_id, data), encoding="utf-8")
    return path
