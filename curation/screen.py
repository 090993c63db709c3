"""The curate step that screens pairs against each other and against benchmarks, in one pass.

One streamed pass over the run's texts (:class:`curation.reads.PairTextScan`) computes, per
batch, the near-duplicate band keys (curation/near_dup.py) and the benchmark n-gram hits
(curation/decontam.py); then LSH candidates are checked exactly, clustered, and one pair per
cluster is kept. Memory holds one batch, one LSH partition, the benchmarks' n-grams, and the
texts of pairs that met a candidate.

Order of reasons, and why: rule drops first (a pair the rules drop never represents a cluster, so a
cluster is not lost to a representative the rules would drop), then `contaminated` (checked on
every pair, so the contamination table is the whole picture; a contaminated pair never represents
a cluster), then `near_contradiction` and `near_duplicate`; the beta-guided filter comes after, so
copies of one pair do not weigh on the margin centre it measures.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from curation.decontam import DecontamConfig, NgramIndex, load_index, match, spans
from curation.near_dup import (
    SIDES,
    BandSpill,
    NearDupConfig,
    assign_representatives,
    band_keys,
    cluster_rows,
    connected_components,
    decisions,
    edge_batches,
    prompt_signature,
    prompt_similarities,
    response_signature,
    similarities,
    verified,
)
from curation.reads import PairTextScan
from curation.schema import DecisionReason
from curation.shingles import Tokens, byte_tokens, normalise, window_hashes, word_tokens
from curation.store import Catalog

__all__ = ["CLUSTER_COLUMNS", "CONTAMINATION_COLUMNS", "ScreenResult", "screen"]

CLUSTER_COLUMNS = ("cluster_id", "pair_id", "representative", "duplicate_of", "size", "prompt_similarity",
                   "response_similarity", "orientation", "contradiction")
CONTAMINATION_COLUMNS = ("pair_id", "benchmark", "benchmark_row", "benchmark_field", "field", "ngrams", "span")
EDGE_ROWS = 20_000  # edges per batch of texts
EDGE_CHUNK = 200_000  # edges per join: what DuckDB holds of the result and its hash table


@dataclass
class ScreenResult:
    decisions: pl.DataFrame  # pair_id, reason, detail of the pairs this step drops
    clusters: pl.DataFrame  # the `clusters` table's rows
    contamination: pl.DataFrame  # the `contamination` table's rows
    stats: dict[str, Any] = field(default_factory=dict)  # recorded under resolved.near_dup / resolved.decontam
    seconds: float = 0.0  # wall time of the step (kept out of `stats`: the manifest is reproducible)
    scan_seconds: float = 0.0  # of which the pass over the texts


def _empty_decisions() -> pl.DataFrame:
    return pl.DataFrame(schema={"pair_id": pl.String, "reason": pl.String, "detail": pl.String})


def _empty_clusters() -> pl.DataFrame:
    return pl.DataFrame(schema={"cluster_id": pl.Int32, "pair_id": pl.String, "representative": pl.Boolean,
                                "duplicate_of": pl.String, "size": pl.Int32, "prompt_similarity": pl.Float64,
                                "response_similarity": pl.Float64, "orientation": pl.String,
                                "contradiction": pl.Boolean})


def _empty_contamination() -> pl.DataFrame:
    return pl.DataFrame(schema={"pair_id": pl.String, "benchmark": pl.String, "benchmark_row": pl.Int64,
                                "benchmark_field": pl.String, "field": pl.String, "ngrams": pl.Int64,
                                "span": pl.String})


def screen(catalog: Catalog, run_id: str, near: NearDupConfig | None = None, decontam: DecontamConfig | None = None,
           excluded: pl.Series | None = None) -> ScreenResult:
    """Near-duplicates and contamination of a run's pairs; `excluded` (pair ids) are checked for
    contamination but never clustered (the rules already dropped them)."""
    near, decontam = near or NearDupConfig(), decontam or DecontamConfig()
    start = time.perf_counter()
    stats: dict[str, Any] = {"near_dup": {"enabled": near.enabled}, "decontam": {"enabled": decontam.enabled}}
    if not near.enabled and not decontam.enabled:
        return ScreenResult(_empty_decisions(), _empty_clusters(), _empty_contamination(), stats)
    index = load_index(decontam, seed=near.seed) if decontam.enabled else None
    with PairTextScan(catalog, run_id, excluded) as scan, \
            tempfile.TemporaryDirectory(dir=catalog.workdir, prefix=".screen-") as tmp:
        spill = BandSpill(tmp, scan.clusterable * near.total_bands) if near.enabled else None
        hits = _scan(scan, near, decontam, index, spill)
        t_scan = time.perf_counter() - start
        contamination, contaminated = _contamination(scan, hits, index)
        drop_idx = contaminated["idx"].to_numpy() if decontam.drop else np.zeros(0, np.int64)
        out = [_contamination_decisions(contaminated, decontam)] if decontam.drop else []
        clusters = _empty_clusters()
        if spill is not None:
            clusters, cluster_decisions, stats["near_dup"] = _clusters(scan, spill, near, drop_idx)
            out.append(cluster_decisions)
        if index is not None:
            stats["decontam"] = _decontam_stats(index, decontam, contamination, contaminated)
    frames = [f for f in out if f.height]
    return ScreenResult(decisions=pl.concat(frames) if frames else _empty_decisions(), clusters=clusters,
                        contamination=contamination, stats=stats, seconds=round(time.perf_counter() - start, 3),
                        scan_seconds=round(t_scan, 3))


def _scan(scan: PairTextScan, near: NearDupConfig, decontam: DecontamConfig, index: NgramIndex | None,
          spill: BandSpill | None) -> list[pl.DataFrame]:
    """The one pass: band keys into the spill, benchmark hits returned (idx, side, bench, ...)."""
    hits: list[pl.DataFrame] = []
    for batch in scan.batches(near.batch_pairs):
        frame = pl.from_arrow(batch)
        idx = frame["idx"].to_numpy()
        text = {side: normalise(frame[side]) for side in SIDES}
        words: dict[str, Tokens] = {}
        if spill is not None:
            words = {side: word_tokens(text[side], near.seed) for side in ("chosen", "rejected")}
            keys = band_keys(prompt_signature(byte_tokens(text["prompt"]), near),
                             response_signature(words["chosen"], words["rejected"], near), near)
            mask = frame["clusterable"].to_numpy()
            spill.add(idx[mask], keys[mask])
        if index is None:
            continue
        for side in SIDES:
            tokens = words.get(side) or word_tokens(text[side], near.seed)
            found = match(index, *window_hashes(tokens, decontam.ngram, short="drop"))
            found = found.filter(pl.col("ngrams") >= decontam.min_ngrams)
            if found.height:
                hits.append(found.with_columns(idx=pl.Series(idx[found["doc"].to_numpy()]), side=pl.lit(side),
                                               span=pl.Series(spans(text[side], found, decontam.ngram),
                                                              dtype=pl.String)).drop("doc"))
    return hits


def _contamination(scan: PairTextScan, hits: list[pl.DataFrame],
                   index: NgramIndex | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The contamination table's rows, and per contaminated pair (idx, pair_id) its first hit and hit count."""
    if not hits or index is None:
        return _empty_contamination(), pl.DataFrame(schema={"idx": pl.Int64, "pair_id": pl.String})
    side_order = {s: i for i, s in enumerate(SIDES)}
    frame = pl.concat(hits).with_columns(_side=pl.col("side").replace_strict(side_order, return_dtype=pl.Int32))
    frame = frame.join(scan.pair_ids(frame["idx"].unique().to_numpy()), on="idx", how="left").sort(
        "idx", "_side", "bench")
    frame = frame.with_columns(
        benchmark=pl.col("bench").replace_strict(dict(enumerate(index.names)), return_dtype=pl.String),
        benchmark_field=pl.col("field").replace_strict(dict(enumerate(index.fields)), return_dtype=pl.String),
    )
    table = frame.select("pair_id", "benchmark", benchmark_row="row", benchmark_field="benchmark_field",
                         field="side", ngrams=pl.col("ngrams").cast(pl.Int64), span="span")
    first = frame.group_by("idx", maintain_order=True).agg(
        pl.col("pair_id").first(), pl.col("benchmark").first(), pl.col("row").first(),
        pl.col("benchmark_field").first(), pl.col("side").first(), pl.col("span").first(),
        pl.col("ngrams").first(), others=pl.len() - 1)
    return table.sort("pair_id", "field", "benchmark"), first


def _contamination_decisions(first: pl.DataFrame, config: DecontamConfig) -> pl.DataFrame:
    if first.height == 0:
        return _empty_decisions()
    return first.select(
        "pair_id",
        reason=pl.lit(DecisionReason.CONTAMINATED.value),
        detail=pl.format(f"{config.ngram}-gram overlap with benchmark {{}} (row {{}}, field {{}}) in {{}}: {{}} "
                         "shared n-gram(s), span '{}'{}", "benchmark", "row", "benchmark_field", "side", "ngrams",
                         "span", pl.when(pl.col("others") > 0).then(pl.format(" (+{} more hit(s))", "others"))
                         .otherwise(pl.lit(""))),
    )


def _edge_similarities(scan: PairTextScan, a: np.ndarray, b: np.ndarray, measure: Any) -> pl.DataFrame:
    """`measure` (a function of an edge batch) over edges a-b, whose ends :meth:`load_nodes` loaded."""
    parts = []
    for ea, eb in edge_batches(a, b, EDGE_CHUNK):  # DuckDB joins a chunk of edges to the nodes at a time
        for batch in scan.edge_texts(ea, eb, EDGE_ROWS):
            parts.append(measure(pl.from_arrow(batch)))  # texts normalised by load_nodes
    if not parts:
        return measure(pl.DataFrame({"a": pl.Series([], dtype=pl.Int64), "b": pl.Series([], dtype=pl.Int64),
                                     **{f"{s}_{t}": pl.Series([], dtype=pl.String) for s in SIDES for t in "ab"}}))
    return pl.concat(parts)


def _clusters(scan: PairTextScan, spill: BandSpill, near: NearDupConfig,
              skip: np.ndarray) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    a, b = spill.candidate_edges(near.bucket_window, skip)
    stats: dict[str, Any] = {"enabled": True, "pairs": scan.clusterable, "band_keys": spill.keys,
                             "partitions": spill.partitions, "candidates": int(a.size)}
    if a.size == 0:
        return _empty_clusters(), _empty_decisions(), {**stats, "verified": 0, "clusters": 0, "clustered_pairs": 0,
                                                       "dropped": 0, "contradiction_clusters": 0}
    # prompts first (short texts, the check most candidates fail), then both responses of the rest
    scan.load_nodes(np.unique(np.concatenate([a, b])), ("prompt",))
    prompts = _edge_similarities(scan, a, b, lambda batch: prompt_similarities(batch, near.prompt_similarity))
    prompts = prompts.filter(pl.col("prompt_similarity") >= near.prompt_similarity)
    a, b = prompts["a"].to_numpy(), prompts["b"].to_numpy()
    stats["prompt_alike"] = int(a.size)
    good = prompts.head(0)
    if a.size:
        scan.load_nodes(np.unique(np.concatenate([a, b])))
        good = verified(_edge_similarities(scan, a, b, lambda batch: similarities(batch, near)), near)
    stats["verified"] = good.height
    if good.height == 0:
        return _empty_clusters(), _empty_decisions(), {**stats, "clusters": 0, "clustered_pairs": 0, "dropped": 0,
                                                       "contradiction_clusters": 0}
    nodes, root = connected_components(good["a"].to_numpy(), good["b"].to_numpy())
    margins = scan.margins(nodes) if near.keep == "margin" else None
    members = assign_representatives(nodes, root, margins, near.keep)
    others = members.filter(pl.col("idx") != pl.col("representative_idx"))
    to_rep = _edge_similarities(scan, others["idx"].to_numpy(), others["representative_idx"].to_numpy(), similarities)
    rows = cluster_rows(members, to_rep, near)
    ids = scan.pair_ids(rows["idx"].to_numpy())
    rows = rows.join(ids, on="idx", how="left").join(
        ids.rename({"idx": "representative_idx", "pair_id": "representative_id"}), on="representative_idx", how="left")
    dropped = decisions(rows, near)
    table = rows.sort("cluster_id", "idx").select(
        "cluster_id", "pair_id", "representative",
        duplicate_of=pl.when(pl.col("representative")).then(None).otherwise(pl.col("representative_id")),
        size="size", prompt_similarity="prompt_similarity", response_similarity="response_similarity",
        orientation="orientation", contradiction="contradiction")
    stats.update({
        "clusters": int(table["cluster_id"].n_unique()), "clustered_pairs": table.height, "dropped": dropped.height,
        "contradiction_clusters": int(table.filter(pl.col("contradiction"))["cluster_id"].n_unique()),
        "largest_cluster": int(table["size"].max()), "keep": near.keep, "contradictions": near.contradictions,
    })
    return table, dropped, stats


def _decontam_stats(index: NgramIndex, config: DecontamConfig, table: pl.DataFrame,
                    contaminated: pl.DataFrame) -> dict[str, Any]:
    per = {r["benchmark"]: r["pairs"] for r in table.group_by("benchmark").agg(pairs=pl.col("pair_id").n_unique())
           .iter_rows(named=True)}
    return {"enabled": True, "ngram": config.ngram, "min_ngrams": config.min_ngrams, "drop": config.drop,
            "contaminated_pairs": contaminated.height,
            "benchmarks": [{**info.__dict__, "pairs_hit": int(per.get(info.name, 0))} for info in index.infos]}
