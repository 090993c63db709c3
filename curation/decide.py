"""Curation decisions, end to end: rules -> screen -> beta-guided filter -> stages -> advice -> catalog -> shards -> report.

One call, :func:`curate`, so the CLI and the Prefect task are thin. Every pair of the run
gets exactly one `decisions` row: kept (its stage, its 0-based row in the stage's shard, and
a detail saying why that stage) or dropped with a reason code and a detail naming the number
and the threshold, so "why was pair X dropped" is one query (:data:`WHY_SQL`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curation import paths
from curation.advice import Advice, AdviceConfig, advise
from curation.beta_filter import BetaFilterConfig, BetaFilterResult, beta_filter
from curation.decontam import DecontamConfig
from curation.errors import WinnowError
from curation.filter import RuleFilterConfig, RulesConfig, Threshold, apply_rules
from curation.heldout import HeldoutConfig, split_heldout
from curation.jsonable import json_safe
from curation.manifest import ReferenceInfo, ShardManifest, StageShard
from curation.near_dup import NearDupConfig
from curation.reads import WHY_SQL, run_config, scored_pairs, why
from curation.schema import DecisionReason
from curation.score.scoring import CONVERSATION_TOKENS
from curation.screen import ScreenResult, screen
from curation.shard import ShardSet, write_shards
from curation.stage import StageConfig, assign_stages, placement_details, stage_summary
from curation.store import Catalog

__all__ = ["WHY_SQL", "CurateConfig", "CurateResult", "curate", "run_dir", "why"]

@dataclass(frozen=True)
class CurateConfig:
    """Everything `winnow curate` decides with; the defaults are explained in docs/curation.md."""

    rules: RulesConfig = field(default_factory=RulesConfig)
    near_dup: NearDupConfig = field(default_factory=NearDupConfig)  # curation/near_dup.py
    decontam: DecontamConfig = field(default_factory=DecontamConfig)  # curation/decontam.py
    beta: BetaFilterConfig = field(default_factory=BetaFilterConfig)
    stages: StageConfig = field(default_factory=StageConfig)
    advice: AdviceConfig = field(default_factory=AdviceConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    compression: str = "zstd"
    report: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CurateConfig:
        """Inverse of :meth:`to_dict` (recipes, manifests); missing keys keep their defaults."""
        data = data or {}
        rules = dict(data.get("rules") or {})
        for name in ("too_long", "low_edit_distance", "length_ratio", "low_margin"):
            if isinstance(rules.get(name), dict):
                rule = dict(rules[name])
                threshold = rule.get("threshold")
                if threshold is not None and not isinstance(threshold, Threshold):
                    rule["threshold"] = (Threshold(**threshold) if isinstance(threshold, dict)
                                         else Threshold.parse(threshold))
                rules[name] = RuleFilterConfig(**rule)
        extra = {k: v for k, v in data.items() if k in ("compression", "report")}
        return cls(rules=RulesConfig(**rules), near_dup=NearDupConfig(**(data.get("near_dup") or {})),
                   decontam=DecontamConfig(**(data.get("decontam") or {})),
                   beta=BetaFilterConfig(**(data.get("beta") or {})),
                   stages=StageConfig(**(data.get("stages") or {})), advice=AdviceConfig(**(data.get("advice") or {})),
                   heldout=HeldoutConfig(**(data.get("heldout") or {})), **extra)


@dataclass
class CurateResult:
    run_id: str
    pairs: int
    kept: int
    dropped: dict[str, int]  # reason -> pairs
    stage_sizes: list[int]
    advice: Advice
    shard_dir: Path
    manifest_path: Path
    report_path: Path | None = None
    seconds: float = 0.0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


def run_dir(workdir: Path | str, run_id: str) -> Path:
    """The run's folder, the run id checked and the path kept inside the workdir (curation.paths)."""
    return paths.run_dir(workdir, run_id)


def _load(catalog: Catalog, run_id: str) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Every pair of the run with its scores, sorted by pair_id (the stable order ties break by)."""
    if not catalog.run_exists(run_id):
        raise WinnowError(f"no run {run_id!r} in {catalog.path}; run `winnow ingest` first")
    frame = scored_pairs(catalog, run_id)
    if frame.height == 0:
        raise WinnowError(f"run {run_id} has no pairs: nothing to curate")
    scored = int(frame["_scored"].sum())
    if scored == 0:
        raise WinnowError(f"run {run_id} is not scored yet: run `winnow score {run_id}` before curating")
    if scored < frame.height:
        raise WinnowError(f"run {run_id} has {frame.height} pairs but only {scored} scores: re-run `winnow score "
                          f"{run_id}` so every pair is scored")
    score_config = (run_config(catalog, run_id) or {}).get("score") or {}
    first = frame.row(0, named=True)
    scoring = {
        **score_config,
        "margin_source": first["margin_source"],
        "tokenizer": first["tokenizer"],
        "max_length": first["max_length"],
        "truncation_mode": score_config.get("truncation_mode", "keep_start"),
        "reference_model": score_config.get("reference_model"),
    }
    return frame.drop("_scored"), scoring


def _beta_details(entered: pl.DataFrame, result: BetaFilterResult, config: BetaFilterConfig) -> pl.DataFrame:
    """reason/detail for the pairs the beta filter dropped (numbers formatted in one numpy call)."""
    weights = np.char.mod("%.3g", result.weight)
    margins = np.char.mod("%.4g", result.margins)
    stats = f"centre {result.centre:.4g}, scale {result.scale:.4g} ({config.centre}), keep {config.keep:g}"
    if result.mode == "sample":
        how = f": not drawn (kept {result.k} of {result.keep.size} with probability ~ weight, seed {config.seed}; "
    elif result.weight_cutoff is not None:
        reach = (result.margin_high or 0.0) - result.centre
        how = f" < cut-off {result.weight_cutoff:.3g} (kept: margin within centre +- {reach:.4g}; "
    else:
        how = " ("
    dropped = pl.Series(~result.keep)
    return entered.select("pair_id").with_columns(
        weight=pl.Series(result.weight, dtype=pl.Float64),
        _beta_reason=pl.when(dropped).then(pl.Series(np.where(result.tail == "low", DecisionReason.BETA_OUTLIER_LOW.value,
                                                              DecisionReason.BETA_OUTLIER_HIGH.value))),
        _beta_detail=pl.when(dropped).then(pl.format("margin {}: weight {}" + how + stats + ")",
                                                     pl.Series(margins), pl.Series(weights))),
    )


def _screened(catalog: Catalog, run_id: str, frame: pl.DataFrame, config: CurateConfig) -> tuple[pl.DataFrame,
                                                                                                 ScreenResult]:
    """Near-duplicates and benchmark contamination (curation/screen.py) on top of the rule reasons.

    After the rules, so a cluster's kept pair is one the rules keep; before the beta filter, so
    copies of one pair do not weigh on the margin centre it measures. A rule reason stays first.
    """
    screened = screen(catalog, run_id, config.near_dup, config.decontam,
                      excluded=frame.filter(pl.col("reason").is_not_null())["pair_id"])
    frame = frame.join(screened.decisions.rename({"reason": "_screen_reason", "detail": "_screen_detail"}),
                       on="pair_id", how="left", maintain_order="left")
    ruled = pl.col("reason").is_not_null()
    return frame.with_columns(
        reason=pl.when(ruled).then("reason").otherwise("_screen_reason"),
        detail=pl.when(ruled).then("detail").otherwise("_screen_detail"),
    ).drop("_screen_reason", "_screen_detail"), screened


def _dropped_counts(decisions: pl.DataFrame) -> dict[str, int]:
    counts = decisions.filter(~pl.col("kept")).group_by("reason").len().sort(["len", "reason"], descending=[True, False])
    return {r: int(n) for r, n in counts.iter_rows()}


def curate(catalog: Catalog, run_id: str, config: CurateConfig | None = None) -> CurateResult:
    """Decide every pair of a scored run, write the catalog rows, the shards, the manifest and the report.

    A re-run replaces the run's `decisions`, `stages`, `shards` and `advice` rows in one
    transaction and rewrites the shard files byte for byte the same.
    """
    config = config or CurateConfig()
    start = time.perf_counter()
    frame, scoring = _load(catalog, run_id)

    # held-out prompts first: they leave before any rule, so no threshold is computed on them
    heldout = split_heldout(frame["prompt_key"], config.heldout)
    frame = frame.with_columns(_held=pl.Series(heldout.mask))
    ruled, resolved = apply_rules(frame.filter(~pl.col("_held")), config.rules, scoring["max_length"],
                                  scoring["truncation_mode"])
    frame = frame.join(ruled, on="pair_id", how="left", maintain_order="left").with_columns(
        reason=pl.when("_held").then(pl.lit(DecisionReason.HELDOUT.value)).otherwise(pl.col("reason")),
        detail=pl.when("_held").then(pl.lit(heldout.detail(config.heldout))).otherwise(pl.col("detail")),
    ).drop("_held")
    frame, screened = _screened(catalog, run_id, frame, config)
    entered = frame.filter(pl.col("reason").is_null())
    beta = beta_filter(entered["margin"].cast(pl.Float64).to_numpy(), config.beta)
    beta_rows = _beta_details(entered, beta, config.beta)
    kept = entered.filter(pl.Series(beta.keep))
    if kept.height == 0:
        counts = frame.group_by("reason").len().sort("len", descending=True)
        summary = ", ".join(f"{r or 'beta filter'} {n}" for r, n in counts.iter_rows())
        raise WinnowError(f"every pair of run {run_id} was dropped ({summary}); loosen the thresholds")
    assigned = assign_stages(kept, config.stages)
    placed = placement_details(assigned, kept, config.stages).rename({"detail": "_stage_detail"})
    summary = stage_summary(assigned, kept, config.stages)
    advice = advise(entered, kept, scoring["margin_source"], config.advice)

    decisions = (
        frame.select("pair_id", "reason", "detail")
        .join(beta_rows, on="pair_id", how="left")
        .join(assigned, on="pair_id", how="left")
        .join(placed, on="pair_id", how="left")
        .select(
            "pair_id",
            kept=pl.col("stage").is_not_null(),
            reason=pl.coalesce("reason", "_beta_reason",
                               pl.when(pl.col("stage").is_not_null()).then(pl.lit(DecisionReason.KEPT.value))),
            detail=pl.coalesce("detail", "_beta_detail", "_stage_detail"),
            weight="weight",
            stage="stage",
            stage_position="stage_position",
        )
    )
    dropped = _dropped_counts(decisions)

    out = run_dir(catalog.workdir, run_id)
    shard_dir = out / "shards"
    shards = write_shards(catalog, run_id, assigned, shard_dir, compression=config.compression,
                          chat_template_logps=scoring.get("conversations") == CONVERSATION_TOKENS)
    resolved_dict = {"rules": [r.to_dict() for r in resolved], **screened.stats, "beta": beta.stats(), "heldout": heldout.to_dict()}
    curate_record = json_safe({"settings": config.to_dict(), "resolved": resolved_dict, "scoring": scoring})
    with catalog.transaction() as con:
        catalog.replace_slice(con, "decisions", decisions, run_id=run_id)
        catalog.replace_slice(con, "stages", summary, run_id=run_id)
        catalog.replace_slice(con, "clusters", screened.clusters, run_id=run_id)
        catalog.replace_slice(con, "contamination", screened.contamination, run_id=run_id)
        catalog.replace_slice(con, "shards", pl.DataFrame(
            {"stage": [s.stage for s in shards.shards],
             "path": [str(s.path.resolve()) for s in shards.shards], "rows": [s.rows for s in shards.shards],
             "bytes": [s.bytes for s in shards.shards], "sha256": [s.sha256 for s in shards.shards]},
            schema_overrides={"stage": pl.Int32, "rows": pl.Int64, "bytes": pl.Int64}), run_id=run_id)
        catalog.replace_slice(con, "advice", pl.DataFrame({
            "objective": [advice.objective],
            "params": [json.dumps(json_safe(advice.params), sort_keys=True)],
            "evidence": [json.dumps(json_safe(advice.evidence), sort_keys=True)],
            "rationale": [advice.rationale]}), run_id=run_id)
        catalog.upsert_run(run_id, con, stage="curate", status="curated", config={"curate": curate_record},
                           accounting={"curate": {"pairs": frame.height, "kept": kept.height, "dropped": dropped,
                                                  "stages": summary["pairs"].to_list()}},
                           timings={"curate": round(time.perf_counter() - start, 3), "screen": screened.seconds})
    manifest_path = _manifest(run_id, frame.height, kept.height, dropped, summary, shards, scoring, config,
                              resolved_dict, advice).write(shard_dir)
    report_path = None
    if config.report:
        from curation.report import build_report

        report_path = build_report(catalog, run_id)
    return CurateResult(run_id=run_id, pairs=frame.height, kept=kept.height, dropped=dropped,
                        stage_sizes=summary["pairs"].to_list(), advice=advice, shard_dir=shard_dir,
                        manifest_path=manifest_path, report_path=report_path,
                        seconds=round(time.perf_counter() - start, 3))


def _manifest(run_id: str, pairs: int, kept: int, dropped: dict[str, int], summary: pl.DataFrame, shards: ShardSet,
              scoring: dict[str, Any], config: CurateConfig, resolved: dict[str, Any], advice: Advice) -> ShardManifest:
    """Everything training needs to trust a shard folder; paths are relative to the manifest."""
    ranges = {row["stage"]: row for row in summary.iter_rows(named=True)}
    stages = [StageShard(stage=s.stage, path=s.path.name, rows=s.rows, bytes=s.bytes, sha256=s.sha256,
                         margin_min=ranges[s.stage]["margin_min"], margin_max=ranges[s.stage]["margin_max"],
                         margin_mean=ranges[s.stage]["margin_mean"]) for s in shards.shards]
    reference = ReferenceInfo(model=scoring.get("reference_model"), tokenizer=scoring.get("tokenizer"),
                              max_length=scoring.get("max_length"),
                              truncation_mode=scoring.get("truncation_mode", "keep_start"),
                              margin_source=scoring.get("margin_source"))
    return ShardManifest(
        run_id=run_id, reference=reference, stages=stages, columns=shards.columns,
        conversational=shards.conversational, ref_logps_included=shards.ref_logps, ref_logps_note=shards.ref_logps_note,
        advice=json_safe(advice.to_dict()), order_by=config.stages.label(),
        counts={"pairs": pairs, "kept": kept, "dropped": pairs - kept, "dropped_by_reason": dropped},
        curation=json_safe({"config": config.to_dict(), "filters": resolved, "scoring": scoring}),
    )
