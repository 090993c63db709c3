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
from curation.report_plots import (
    length_facts,
    plot_edits,
    plot_lengths,
    plot_margin,
    plot_token_lengths,
    plot_training,
)
from curation.report_screen import SCREEN_PLOT, has_screen_plot, plot_screen, screen_data, screen_section
from curation.schema import DecisionReason
from curation.store import Catalog

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
    plot_margin(data, out / "margin.png")
    plot_edits(data, out / "edit_distance.png")
    plot_lengths(data, out / "length_gap.png")
    plot_token_lengths(data, out / "token_lengths.png")
    (out / SCREEN_PLOT).unlink(missing_ok=True)
    if has_screen_plot(data["screen"]):
        plot_screen(data["screen"], out / SCREEN_PLOT)
    (out / TRAINING_PLOT).unlink(missing_ok=True)
    if data["train"].height:
        plot_training(data, out / TRAINING_PLOT)
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
