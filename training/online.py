"""Online curation between sDPO stages: re-decide the untaught pairs with the last stage's policy.

Why: curation decides every pair once, from a margin computed before any training (ratings,
a reward model or the reference). sDPO trains stage k against the model of stage k-1, and the
same better model can judge the pairs still waiting (OBJECTIVES.md, "Composing them"). So
before stage k+1 trains, round k:

1. takes the pairs not yet taught: those of stages k+1..K and those curation's beta filter
   dropped (pairs dropped by a rule stay dropped: rules judge structure, not the label);
2. scores them with the stage-k policy: the ``policy`` margin of
   :func:`curation.score.margins.policy_margin`, ``beta * ((pi_w - ref_w) - (pi_l - ref_l))`` on
   summed log-probs against the base reference (the implicit reward learned so far; at round 1
   the base model is also stage 1's reference), log-probs by
   :func:`curation.lm.logprobs.score_tokenized` on the tokens training uses;
3. runs the beta-guided filter (curation's, with its centre and mode) on those margins keeping
   exactly as many pairs as stages k+1..K held, so the share dropped stays what the filtering
   policy decided (no extra filter on top: a pair the offline filter wrongly dropped can come
   back, one it wrongly kept can go);
4. re-stages the kept pairs over stages k+1..K by the new margin, easy (largest) first, with the
   curated stage sizes.

Every round's decision for every pair it saw goes to the catalog table ``decision_rounds``
(round, scoring model, margin, weight, kept, reason, stage, the previous decision), written
through ``Catalog.replace_slice``; ``curation.reads.pair_rounds`` shows how a pair's margin and
fate moved. The policy's log-probs on stage k+1's pairs are also that stage's reference
log-probs (its reference is the stage-k model), so the stage trains on them without a second
reference pass. The layering holds: this module imports curation; the pipeline (flows) passes
the catalog in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curation.beta_filter import BetaFilterConfig, beta_filter_count
from curation.errors import WinnowError
from curation.manifest import REF_LOGP_COLUMNS as REF_COLUMNS
from curation.manifest import ShardManifest, StageShard
from curation.reads import beta_dropped_pairs, round_placements
from curation.schema import DecisionReason
from curation.score.margins import policy_margin
from curation.store import Catalog

BASE_COLUMNS = ("base_chosen_logps", "base_rejected_logps")
TEXT_COLUMNS = ("pair_id", "prompt", "chosen", "rejected")
# (model path, frame with prompt/chosen/rejected) -> REF_COLUMNS in the frame's order, on training's tokens
Scorer = Callable[[str | Path, pl.DataFrame], pl.DataFrame]


@dataclass(frozen=True)
class OnlineContext:
    """What online rounds need from the pipeline: the catalog and the run whose decisions they revise."""

    catalog: Catalog
    run_id: str


@dataclass
class OnlinePool:
    """Every pair a round may place (later stages + the beta filter's drops) with its base log-probs."""

    frame: pl.DataFrame  # TEXT_COLUMNS + BASE_COLUMNS + offline_stage (null: dropped by the offline filter)
    sizes: dict[int, int]  # stage -> pairs, as curated (stages 2..K)
    filter: BetaFilterConfig
    reference_model: str


def filter_config(manifest: ShardManifest) -> BetaFilterConfig:
    """Curation's beta filter settings (centre, mode, seed) from the manifest; defaults when absent."""
    recorded = dict(((manifest.curation or {}).get("config") or {}).get("beta") or {})
    known = {f.name for f in fields(BetaFilterConfig)}
    return BetaFilterConfig(**{k: v for k, v in recorded.items() if k in known})


def build_pool(context: OnlineContext, manifest: ShardManifest, later: Sequence[StageShard],
               load_frame: Callable[[StageShard], pl.DataFrame], base_model: str | Path, score: Scorer,
               reuse_base: bool) -> OnlinePool:
    """The pool, once per training run. ``reuse_base``: the shards' and the catalog's reference log-probs
    are the base model's on training's tokens (else the base model scores the pool again)."""
    if manifest.run_id != context.run_id:
        raise WinnowError(f"online curation: the shards belong to run {manifest.run_id}, the catalog context to "
                          f"{context.run_id}")
    parts = [load_frame(entry).select(*TEXT_COLUMNS, *REF_COLUMNS).with_columns(
        offline_stage=pl.lit(entry.stage, pl.Int32)) for entry in later]
    dropped = beta_dropped_pairs(context.catalog, context.run_id).select(*TEXT_COLUMNS, *REF_COLUMNS).with_columns(
        offline_stage=pl.lit(None, pl.Int32))
    frame = pl.concat([*parts, dropped], how="vertical_relaxed").unique("pair_id", keep="first").sort("pair_id")
    if not reuse_base or frame.select(pl.any_horizontal(pl.col(list(REF_COLUMNS)).is_null().any())).item():
        frame = frame.drop(REF_COLUMNS).hstack(score(base_model, frame))
    frame = frame.rename(dict(zip(REF_COLUMNS, BASE_COLUMNS, strict=True)))
    return OnlinePool(frame=frame, sizes={e.stage: e.rows for e in later}, filter=filter_config(manifest),
                      reference_model=str(base_model))


def online_round(context: OnlineContext, round_no: int, policy_path: str | Path, pool: OnlinePool, taught: set[str],
                 beta: float, score: Scorer) -> tuple[pl.DataFrame, dict[int, pl.DataFrame]]:
    """Round ``round_no`` (after stage ``round_no``): (decision_rounds rows, stage -> frame for stages
    round_no+1..K). Each stage frame has the shard's columns; its ref_* columns are the stage-k policy's
    log-probs (the next stage's reference; later stages get theirs from their own round)."""
    stages = sorted(s for s in pool.sizes if s > round_no)
    if not stages:
        raise ValueError(f"round {round_no}: no stage left to re-decide")
    previous = set(_previous_kept(context, pool, round_no))
    candidates = pool.frame.filter(~pl.col("pair_id").is_in(list(taught)))
    policy = score(policy_path, candidates)
    margins = policy_margin(policy, candidates.select(pl.col(BASE_COLUMNS[0]).alias(REF_COLUMNS[0]),
                                                      pl.col(BASE_COLUMNS[1]).alias(REF_COLUMNS[1])), beta)
    scored = candidates.select(*TEXT_COLUMNS).hstack(policy.select(REF_COLUMNS)).with_columns(
        margin=margins["margin"], previous_kept=pl.col("pair_id").is_in(list(previous)))
    valid = scored.filter(pl.col("margin").is_not_null() & pl.col("margin").is_finite())
    wanted = sum(pool.sizes[s] for s in stages)
    result = beta_filter_count(valid["margin"].to_numpy(), min(wanted, valid.height), pool.filter)
    kept = valid.filter(pl.Series(result.keep)).sort(["margin", "pair_id"], descending=[True, False])
    sizes = _stage_sizes([pool.sizes[s] for s in stages], kept.height)
    placed = kept.select("pair_id").with_columns(stage=pl.Series(np.repeat(stages, sizes), dtype=pl.Int32)).with_columns(
        stage_position=pl.int_range(pl.len(), dtype=pl.Int64).over("stage"))
    decided = valid.select("pair_id").with_columns(weight=pl.Series(result.weight),
                                                   _tail=pl.Series(result.tail))
    rows = (scored.join(decided, on="pair_id", how="left").join(placed, on="pair_id", how="left")
            .select("pair_id", "margin", "weight", "previous_kept", "stage", "stage_position", "_tail"))
    rows = _with_reasons(rows, round_no, result, wanted, valid.height, max(pool.sizes), pool.filter.centre).with_columns(
        scoring_model=pl.lit(str(policy_path)), reference_model=pl.lit(pool.reference_model),
        margin_source=pl.lit("policy"))
    frames = {s: kept.join(placed.filter(pl.col("stage") == s), on="pair_id").sort("stage_position")
              .select("prompt", "chosen", "rejected", *REF_COLUMNS, "pair_id") for s in stages}
    return rows, frames


def write_round(context: OnlineContext, round_no: int, rows: pl.DataFrame) -> None:
    """Replace round ``round_no`` of the run in ``decision_rounds`` (a re-run of the round replaces it)."""
    with context.catalog.transaction() as con:
        context.catalog.replace_slice(con, "decision_rounds", rows, run_id=context.run_id, round=round_no)


def _previous_kept(context: OnlineContext, pool: OnlinePool, round_no: int) -> list[str]:
    """Pairs the decision before this round placed in a stage after ``round_no``: curation's for round 1,
    else round ``round_no - 1``'s, read back from the catalog (so a resumed run needs no state)."""
    if round_no == 1:
        return pool.frame.filter(pl.col("offline_stage") > round_no)["pair_id"].to_list()
    placed = round_placements(context.catalog, context.run_id, round_no - 1)
    return placed.filter(pl.col("stage") > round_no)["pair_id"].to_list()


def _stage_sizes(curated: list[int], kept: int) -> list[int]:
    """The curated sizes when the pool fills them; else ``kept`` split as evenly as possible."""
    if kept >= sum(curated):
        return curated
    sizes = [kept // len(curated)] * len(curated)
    for i in range(kept % len(curated)):
        sizes[i] += 1
    return sizes


def _with_reasons(rows: pl.DataFrame, round_no: int, result: Any, wanted: int, valid: int, k_stages: int,
                  centre: str) -> pl.DataFrame:
    """kept/reason/detail per row, vectorised: kept (stage), beta_outlier_low/high, or no_margin."""
    stats = (f"kept {result.k} of {valid} to fill {wanted} places; centre {result.centre:.4g}, "
             f"scale {result.scale:.4g} ({centre})")
    kept = pl.col("stage").is_not_null()
    margin = pl.col("margin").round(4).cast(pl.String)
    weight = pl.col("weight").round(4).cast(pl.String)
    prefix = f"round {round_no}: policy margin of the stage-{round_no} model "
    return rows.with_columns(
        kept=kept,
        reason=pl.when(kept).then(pl.lit(DecisionReason.KEPT.value))
        .when(pl.col("margin").is_null() | pl.col("weight").is_null()).then(pl.lit(DecisionReason.NO_MARGIN.value))
        .when(pl.col("_tail") == "low").then(pl.lit(DecisionReason.BETA_OUTLIER_LOW.value))
        .otherwise(pl.lit(DecisionReason.BETA_OUTLIER_HIGH.value)),
        detail=pl.when(kept).then(pl.format(prefix + "{}, weight {}: stage {} of " + str(k_stages) + " (" + stats + ")",
                                            margin, weight, pl.col("stage")))
        .when(pl.col("weight").is_null()).then(pl.lit(f"round {round_no}: no policy margin (TRL drops the pair at "
                                                      "training's max_length)"))
        .otherwise(pl.format(prefix + "{}, weight {}: not among the kept (" + stats + ")", margin, weight)),
    ).drop("_tail")
