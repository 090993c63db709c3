"""The report's plots: margins with the filters' cut-offs and the stages, edit distances, length gaps,
token lengths against max_length, and the training curves (matplotlib, written as PNGs).

Each takes the report's ``data`` (curation/report.py: report_data) and a path; none reads the catalog.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curation.schema import DecisionReason

COLOURS = {"kept": "#2a9d8f", "dropped (rules)": "#8d99ae", "beta_outlier_low": "#e76f51", "beta_outlier_high": "#e9c46a"}
STAGE_COLOURS = ("#264653", "#2a9d8f", "#8ab17d", "#e9c46a", "#f4a261", "#e76f51", "#9b5de5", "#577590")

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


def plot_margin(data: dict[str, Any], path: Path) -> None:
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


def plot_edits(data: dict[str, Any], path: Path) -> None:
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


def plot_lengths(data: dict[str, Any], path: Path) -> None:
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


def plot_training(data: dict[str, Any], path: Path) -> None:
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
