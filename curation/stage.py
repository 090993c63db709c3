"""sDPO stages: split the kept pairs into K stages taught one after another, easy first.

Why: sDPO (Kim et al. 2024) trains stage t against the model aligned at stage t-1, an
easy-to-hard curriculum. "Easy" defaults to a large reward margin (the labeller was sure).
Also: any numeric score column, the source data set (the paper split by data set: the
easier set, here the one with the larger median margin, first) and `random` for ablations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from curation.errors import WinnowError

OrderBy = Literal["margin", "column", "source", "random"]


@dataclass(frozen=True)
class StageConfig:
    """K stages (default 2). `descending=True`: larger values of the ordering column come first."""

    k: int = 2
    order_by: OrderBy = "margin"
    column: str | None = None
    descending: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise WinnowError(f"the number of stages must be at least 1, got {self.k}")
        if self.order_by not in ("margin", "column", "source", "random"):
            raise WinnowError(f"stage order_by must be margin, column, source or random, got {self.order_by!r}")
        if self.order_by == "column" and not self.column:
            raise WinnowError("stage order_by='column' needs a column name (e.g. token_edit_norm)")

    def label(self) -> str:
        if self.order_by == "column":
            return f"column:{self.column}{'' if self.descending else ' asc'}"
        return self.order_by


def _even_split(n: int, k: int) -> np.ndarray:
    """Stage (1-based) of each of n ordered positions: k contiguous chunks as equal as can be."""
    sizes = np.full(k, n // k)
    sizes[: n % k] += 1
    return np.repeat(np.arange(1, k + 1), sizes)


def assign_stages(kept: pl.DataFrame, config: StageConfig) -> pl.DataFrame:
    """(pair_id, stage, stage_position) for the kept pairs; rows come back in teaching order.

    `kept` needs pair_id, margin and source, plus the ordering column for order_by='column'.
    Ties break by pair_id, so the same inputs always give the same stages.
    """
    n = kept.height
    if config.k > n:
        raise WinnowError(f"{config.k} stages asked for but only {n} pair(s) were kept: lower --stages or loosen the filters")
    base = kept.sort("pair_id")
    if config.order_by == "margin":
        ordered = base.sort(["margin", "pair_id"], descending=[True, False], nulls_last=True)
        stages = _even_split(n, config.k)
    elif config.order_by == "column":
        column = config.column or ""
        if column not in base.columns or not base.schema[column].is_numeric():
            numeric = sorted(c for c, t in base.schema.items() if t.is_numeric() or t == pl.Boolean)
            raise WinnowError(f"cannot order stages by {column!r}: not a numeric score column; choose one of "
                              f"{', '.join(numeric)}")
        ordered = base.sort([column, "pair_id"], descending=[config.descending, False], nulls_last=True)
        stages = _even_split(n, config.k)
    elif config.order_by == "random":
        rng = np.random.default_rng(config.seed)
        ordered = base[rng.permutation(n)]
        stages = _even_split(n, config.k)
    else:
        ordered, stages = _by_source(base, config.k)
    return ordered.select("pair_id").with_columns(
        stage=pl.Series(stages, dtype=pl.Int32),
    ).with_columns(stage_position=pl.int_range(pl.len(), dtype=pl.Int64).over("stage"))


def _by_source(base: pl.DataFrame, k: int) -> tuple[pl.DataFrame, np.ndarray]:
    """Whole sources per stage, easier sources (larger median margin) first, then by margin within.

    With more sources than stages, consecutive sources are grouped by where their midpoint
    falls in the cumulative pair count, so stage sizes stay as even as whole sources allow.
    """
    sources = (base.group_by("source").agg(n=pl.len(), median=pl.col("margin").median())
               .sort(["median", "source"], descending=[True, False], nulls_last=True))
    if sources.height < k:
        raise WinnowError(f"order_by='source' needs at least as many sources as stages: {sources.height} source(s) "
                          f"for {k} stages")
    counts = sources["n"].to_numpy()
    before = np.concatenate([[0], np.cumsum(counts)[:-1]])
    group = np.minimum((k * (before + counts / 2) / counts.sum()).astype(np.int64), k - 1)
    dense = np.unique(group, return_inverse=True)[1] + 1
    if dense.max() < k:
        raise WinnowError(f"the sources' sizes cannot fill {k} stages with whole sources; use fewer stages")
    mapping = sources.select("source", _stage=pl.Series(dense, dtype=pl.Int32),
                             _rank=pl.int_range(pl.len(), dtype=pl.Int64))
    ordered = (base.join(mapping, on="source", how="left")
               .sort(["_stage", "_rank", "margin", "pair_id"], descending=[False, False, True, False], nulls_last=True))
    return ordered.drop("_stage", "_rank"), ordered["_stage"].to_numpy()


def placement_details(assigned: pl.DataFrame, kept: pl.DataFrame, config: StageConfig) -> pl.DataFrame:
    """(pair_id, detail) saying why each kept pair sits in its stage: the ordering value and the stage's range."""
    k = int(assigned["stage"].max() or 0)
    if config.order_by == "random":
        return assigned.select("pair_id", detail=pl.format(f"stage {{}} of {k}: random order (seed {config.seed})",
                                                           pl.col("stage")))
    if config.order_by == "source":
        frame = assigned.join(kept.select("pair_id", "source"), on="pair_id", how="left")
        medians = kept.group_by("source").agg(_median=pl.col("margin").median())
        return frame.join(medians, on="source", how="left").select(
            "pair_id", detail=pl.format(f"stage {{}} of {k} by source: {{}} (median margin {{}}; larger first)",
                                        pl.col("stage"), pl.col("source"), pl.col("_median").round(4)))
    column = "margin" if config.order_by == "margin" else config.column or "margin"
    frame = assigned.join(kept.select("pair_id", pl.col(column).alias("_value")), on="pair_id", how="left")
    frame = frame.with_columns(_lo=pl.col("_value").min().over("stage"), _hi=pl.col("_value").max().over("stage"))
    value = pl.col("_value").cast(pl.Float64).round(4)
    direction = "larger first" if config.order_by == "margin" or config.descending else "smaller first"
    return frame.select("pair_id", detail=pl.format(
        f"stage {{}} of {k} by {column}: {{}} (stage range {{}}..{{}}; {direction})",
        pl.col("stage"), value, pl.col("_lo").cast(pl.Float64).round(4), pl.col("_hi").cast(pl.Float64).round(4)))


def stage_summary(assigned: pl.DataFrame, margins: pl.DataFrame, config: StageConfig) -> pl.DataFrame:
    """One row per stage for the `stages` table: size and margin range."""
    return (assigned.join(margins.select("pair_id", "margin"), on="pair_id", how="left")
            .group_by("stage").agg(pairs=pl.len(), margin_min=pl.col("margin").min(),
                                   margin_max=pl.col("margin").max(), margin_mean=pl.col("margin").mean())
            .sort("stage").with_columns(order_by=pl.lit(config.label())))
