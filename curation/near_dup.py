"""Near-duplicate pairs: MinHash signatures, LSH banding spilled to disk, exact checks, clusters.

What counts as a near-duplicate of a pair: a pair whose prompt is at least `prompt_similarity`
alike (a changed word, whitespace, punctuation, a light rephrasing) AND whose two responses are
each at least `response_similarity` alike, the comparison it teaches being the same. Both
similarities are rapidfuzz's normalised Indel similarity on normalised text
(:func:`curation.shingles.normalise`), computed exactly on every candidate. When the prompt
matches and the responses match the other way round (A>B here, B>A there) the two pairs are a
near-contradiction.

Candidates come from MinHash/LSH over the prompt and over prompt+chosen+rejected, in two indexes:

* the *pair* index: each band hashes `prompt_rows` bins of the prompt's signature (character
  5-grams) together with `response_rows` bins of the responses' signature (word 3-grams of chosen
  and rejected, pooled, so a swapped pair signs alike), so a band collides only when prompt and
  responses both look alike; a pair signature of the concatenated text would instead be ruled by
  whichever part is longer (two different comparisons under one long prompt would look alike);
* the *responses* index (`response_bands` bands of `response_only_rows` bins): the same answer
  pair re-posted under a rephrased prompt, which the pair index's prompt rows would miss.

A prompt-only index is not used: sets with several pairs per prompt (UltraFeedback) would put
every comparison of a prompt in one bucket, none of them a duplicate.

Signatures are one-permutation MinHash (Li, Owen and Zhang 2012: one hash per shingle, the
minimum per bin) densified by rotation (Shrivastava and Li 2014) so short texts have no empty
bins; a batch costs one hash per shingle, not one per shingle and permutation. Band keys are
radix-partitioned into files as they are computed; each partition is then sorted alone, so
memory holds one batch or one partition, never the run. Buckets larger than `bucket_window + 1`
link each member to its next `bucket_window` members only (clusters are connected components,
so a chain suffices).

Clusters are the connected components of the verified edges (single linkage). One pair per
cluster is kept: the first seen (lowest source, source_row) or the highest margin; the others are
dropped with the id of the kept pair. Clusters whose pairs disagree on which response wins are
reported, and dropped whole with ``contradictions="drop"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from rapidfuzz import process
from rapidfuzz.distance import Indel

from curation.config_fields import setting
from curation.errors import WinnowError
from curation.schema import DecisionReason
from curation.shingles import Tokens, mix64, window_hashes

Keep = Literal["first", "margin"]
Contradictions = Literal["report", "drop"]

_EMPTY = np.uint64(1 << 32)  # above every 32-bit bin value: the bin saw no shingle
_PARTITION_ROWS = 4_000_000  # band keys per partition file: what one sort holds in memory (~100 MB)
_RECORD = np.dtype([("key", np.uint64), ("idx", np.int64)])


@dataclass(frozen=True)
class NearDupConfig:
    """Settings of the near-duplicate step (docs: curation/near_dup.py)."""

    enabled: bool = setting(True, help="Find near-duplicate pairs and keep one per cluster.")
    prompt_similarity: float = setting(0.6, help="Least normalised Indel similarity of two prompts for their pairs "
                                                 "to be near-duplicates (1 = identical after normalising case, "
                                                 "whitespace and punctuation).")
    response_similarity: float = setting(0.9, help="Least similarity of each response to its counterpart (chosen to "
                                                   "chosen and rejected to rejected; the other way round: a "
                                                   "near-contradiction).")
    keep: Keep = setting("first", help="Which pair of a cluster is kept: first (first seen: lowest source, "
                                       "source_row) or margin (highest margin, then first seen).")
    contradictions: Contradictions = setting("report", help="Clusters whose pairs disagree on which response wins: "
                                                            "report (keep the representative, drop the others as "
                                                            "near_duplicate) or drop (drop the whole cluster as "
                                                            "near_contradiction).")
    bands: int = setting(20, help="Bands of the pair index (prompt and responses together).")
    prompt_rows: int = setting(2, help="Prompt MinHash bins per band of the pair index.")
    response_rows: int = setting(3, help="Response MinHash bins per band of the pair index.")
    response_bands: int = setting(10, help="Bands of the responses-only index (same answers, rephrased prompt).")
    response_only_rows: int = setting(6, help="Response bins per band of the responses-only index.")
    prompt_shingle: int = setting(5, help="Characters per prompt shingle.")
    response_shingle: int = setting(3, help="Words per response shingle.")
    bucket_window: int = setting(16, help="In an LSH bucket, each pair is checked against its next N members "
                                          "(all of them in buckets up to N+1).")
    batch_pairs: int = setting(4096, help="Pairs hashed per batch (memory holds one batch).")
    seed: int = setting(0, help="Seed of the hash functions.")

    def __post_init__(self) -> None:
        if self.keep not in ("first", "margin"):
            raise WinnowError(f"near_dup.keep must be 'first' or 'margin', got {self.keep!r}")
        if self.contradictions not in ("report", "drop"):
            raise WinnowError(f"near_dup.contradictions must be 'report' or 'drop', got {self.contradictions!r}")
        for name in ("prompt_similarity", "response_similarity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise WinnowError(f"near_dup.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("bands", "prompt_rows", "response_rows", "response_bands", "response_only_rows",
                     "prompt_shingle", "response_shingle", "bucket_window", "batch_pairs"):
            if getattr(self, name) < 1:
                raise WinnowError(f"near_dup.{name} must be at least 1, got {getattr(self, name)}")

    @property
    def prompt_bins(self) -> int:
        return self.bands * self.prompt_rows

    @property
    def response_bins(self) -> int:
        return max(self.bands * self.response_rows, self.response_bands * self.response_only_rows)

    @property
    def total_bands(self) -> int:
        return self.bands + self.response_bands

    def candidate_probability(self, prompt_jaccard: float, response_jaccard: float) -> float:
        """P(two pairs become candidates) for shingle Jaccard similarities: the LSH S-curve of both indexes."""
        pair = prompt_jaccard**self.prompt_rows * response_jaccard**self.response_rows
        miss = (1 - pair) ** self.bands * (1 - response_jaccard**self.response_only_rows) ** self.response_bands
        return 1 - miss

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- signatures --------------------------------------------------------------------------------------------


def minhash(hashes: np.ndarray, doc: np.ndarray, docs: int, bins: int) -> np.ndarray:
    """One-permutation MinHash, densified: (docs, bins) uint64; a document without shingles keeps _EMPTY.

    The high 32 bits of a shingle's hash pick its bin, the low 32 bits are its value; a bin keeps
    the smallest value. An empty bin borrows the value of the next non-empty bin to its right
    (circularly), tagged with the distance, so two documents agree on it only when they agree on
    the bin it borrows from.
    """
    with np.errstate(over="ignore"):
        which = ((hashes >> np.uint64(32)) * np.uint64(bins)) >> np.uint64(32)
        value = hashes & np.uint64(0xFFFFFFFF)
        sig = np.full(docs * bins, _EMPTY, dtype=np.uint64)
        np.minimum.at(sig, doc * bins + which.astype(np.int64), value)
        sig = sig.reshape(docs, bins)
        filled = sig != _EMPTY
        columns = np.arange(bins)
        big = np.int64(4 * bins)
        position = np.where(filled, columns, big)
        doubled = np.concatenate([position, np.where(filled, columns + bins, big)], axis=1)
        nearest = np.minimum.accumulate(doubled[:, ::-1], axis=1)[:, ::-1][:, :bins]
        has_any = filled.any(axis=1)
        source = np.where(has_any[:, None], nearest % bins, columns)
        distance = np.where(has_any[:, None], nearest - columns, 0).astype(np.uint64)
        borrowed = np.take_along_axis(sig, source, axis=1) + distance * np.uint64(1 << 33)
        return np.where(filled | ~has_any[:, None], sig, borrowed)


def _coefficients(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 2**63, size=shape, dtype=np.uint64) | np.uint64(1)


def band_keys(prompt_sig: np.ndarray, response_sig: np.ndarray, config: NearDupConfig) -> np.ndarray:
    """(docs, total_bands) uint64 bucket keys: the pair index's bands, then the responses index's."""
    docs = prompt_sig.shape[0]
    b, rp, rr = config.bands, config.prompt_rows, config.response_rows
    b2, r2 = config.response_bands, config.response_only_rows
    cp = _coefficients(config.seed + 1, (rp,))
    cr = _coefficients(config.seed + 2, (rr,))
    c2 = _coefficients(config.seed + 3, (r2,))
    tag = _coefficients(config.seed + 4, (b + b2,))
    with np.errstate(over="ignore"):
        pair = (prompt_sig[:, : b * rp].reshape(docs, b, rp) * cp).sum(axis=2, dtype=np.uint64)
        pair += (response_sig[:, : b * rr].reshape(docs, b, rr) * cr).sum(axis=2, dtype=np.uint64)
        alone = (response_sig[:, : b2 * r2].reshape(docs, b2, r2) * c2).sum(axis=2, dtype=np.uint64)
        return mix64(np.concatenate([pair, alone], axis=1) + tag)


def response_signature(chosen: Tokens, rejected: Tokens, config: NearDupConfig) -> np.ndarray:
    """MinHash of the word shingles of chosen and rejected pooled: a swapped pair signs alike."""
    hc, dc, _ = window_hashes(chosen, config.response_shingle, short="whole")
    hr, dr, _ = window_hashes(rejected, config.response_shingle, short="whole")
    return minhash(np.concatenate([hc, hr]), np.concatenate([dc, dr]), chosen.docs, config.response_bins)


def prompt_signature(prompt_bytes: Tokens, config: NearDupConfig) -> np.ndarray:
    hashes, doc, _ = window_hashes(prompt_bytes, config.prompt_shingle, short="whole")
    return minhash(hashes, doc, prompt_bytes.docs, config.prompt_bins)


# -- LSH buckets, spilled ----------------------------------------------------------------------------------


class BandSpill:
    """Band keys of every pair, radix-partitioned into files under `folder` as batches arrive.

    `partitions` is sized so a partition holds about 4M keys: a sort of one partition at a time
    keeps memory flat in the number of pairs. The files are raw fixed-width records this step
    writes and reads itself (never unpickled).
    """

    def __init__(self, folder: Path, expected_keys: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        want = max(1, math.ceil(expected_keys / _PARTITION_ROWS))
        self.bits = max(0, math.ceil(math.log2(want)))
        self.partitions = 1 << self.bits
        self.paths = [self.folder / f"bands-{p:04d}.bin" for p in range(self.partitions)]
        self._handles = [open(p, "wb") for p in self.paths]  # noqa: SIM115 - closed in close()
        self.keys = 0

    def add(self, idx: np.ndarray, keys: np.ndarray) -> None:
        """Append the (docs, bands) keys of pairs `idx`."""
        if idx.size == 0:
            return
        records = np.empty(keys.size, dtype=_RECORD)
        records["key"] = keys.ravel()
        records["idx"] = np.repeat(idx.astype(np.int64), keys.shape[1])
        self.keys += records.size
        if self.partitions == 1:
            records.tofile(self._handles[0])
            return
        part = (records["key"] >> np.uint64(64 - self.bits)).astype(np.int64)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(self.partitions + 1))
        for p in range(self.partitions):
            if bounds[p + 1] > bounds[p]:
                records[order[bounds[p] : bounds[p + 1]]].tofile(self._handles[p])

    def close(self) -> None:
        for handle in self._handles:
            if not handle.closed:
                handle.close()

    def candidate_edges(self, window: int, skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Distinct (a, b), a < b, of pairs sharing a bucket; each member meets its next `window` members."""
        self.close()
        found: list[np.ndarray] = []
        for path in self.paths:
            records = np.fromfile(path, dtype=_RECORD)
            if records.size < 2:
                continue
            if skip is not None and skip.size:
                records = records[~np.isin(records["idx"], skip)]
            found.append(_bucket_edges(records["key"], records["idx"], window))
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        codes = np.unique(np.concatenate(found))
        return codes >> np.int64(32), codes & np.int64(0xFFFFFFFF)


def _bucket_edges(key: np.ndarray, idx: np.ndarray, window: int) -> np.ndarray:
    """Edge codes a << 32 | b of one partition: members of a bucket sorted by idx, each to its next `window`."""
    order = np.lexsort((idx, key))
    key, idx = key[order], idx[order]
    same = key[1:] == key[:-1]
    if not same.any():
        return np.zeros(0, np.int64)
    shared = np.zeros(key.size, dtype=bool)
    shared[1:] |= same
    shared[:-1] |= same
    key, idx = key[shared], idx[shared]
    codes = []
    for d in range(1, min(window, key.size - 1) + 1):
        hit = key[d:] == key[:-d]
        if not hit.any():
            break  # no bucket has d+1 members, so none has more
        codes.append((idx[:-d][hit] << np.int64(32)) | idx[d:][hit])
    return np.concatenate(codes) if codes else np.zeros(0, np.int64)


# -- exact checks ------------------------------------------------------------------------------------------

SIDES = ("prompt", "chosen", "rejected")


def _similarity(batch: pl.DataFrame, x: str, y: str, cutoff: float | None = None) -> np.ndarray:
    """Normalised Indel similarity of two text columns, row by row, all cores; below `cutoff`: 0."""
    return process.cpdist(batch[x].to_list(), batch[y].to_list(), scorer=Indel.normalized_similarity, workers=-1,
                          dtype=np.float64, score_cutoff=cutoff)


def _ends(batch: pl.DataFrame) -> dict[str, np.ndarray]:
    """Copies of the edge ends: a view would keep the whole Arrow batch, texts and all, alive."""
    return {"a": batch["a"].to_numpy().copy(), "b": batch["b"].to_numpy().copy()}


def prompt_similarities(batch: pl.DataFrame, cutoff: float | None = None) -> pl.DataFrame:
    """a, b, prompt_similarity of an edge batch (columns a, b, prompt_a, prompt_b): the cheap first check."""
    return pl.DataFrame({**_ends(batch), "prompt_similarity": _similarity(batch, "prompt_a", "prompt_b", cutoff)})


def similarities(batch: pl.DataFrame, cutoff: NearDupConfig | None = None) -> pl.DataFrame:
    """Exact similarities of an edge batch: columns a, b and the normalised texts `<side>_a`, `<side>_b`.

    Returns a, b, prompt_similarity, same (min of chosen~chosen, rejected~rejected) and swapped
    (min of chosen~rejected, rejected~chosen). With `cutoff` (a config) values below its
    thresholds read 0 and the second response of an orientation is only compared when the first
    passed: candidates that fail cost little; without, every number is exact (kept-pair similarities).
    """
    t_prompt = cutoff.prompt_similarity if cutoff else None
    t_response = cutoff.response_similarity if cutoff else None

    def both(first: tuple[str, str], second: tuple[str, str]) -> np.ndarray:
        one = _similarity(batch, *first, t_response)
        other = np.zeros_like(one)
        passed = one >= (t_response or 0.0)
        if passed.any():
            other[passed] = _similarity(batch.filter(pl.Series(passed)), *second, t_response)
        return np.minimum(one, other)

    return pl.DataFrame({
        **_ends(batch),
        "prompt_similarity": _similarity(batch, "prompt_a", "prompt_b", t_prompt),
        "same": both(("chosen_a", "chosen_b"), ("rejected_a", "rejected_b")),
        "swapped": both(("chosen_a", "rejected_b"), ("rejected_a", "chosen_b")),
    })


def verified(sims: pl.DataFrame, config: NearDupConfig) -> pl.DataFrame:
    """The edges that pass: prompts alike and both responses alike, one way round or the other."""
    return sims.filter((pl.col("prompt_similarity") >= config.prompt_similarity)
                       & (pl.max_horizontal("same", "swapped") >= config.response_similarity))


# -- clusters ----------------------------------------------------------------------------------------------


def connected_components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, root) of an undirected graph given by edges a-b: root = the smallest node of each component.

    Min-label propagation with pointer jumping, vectorised over the edges; a handful of rounds
    for the shallow components near-duplicates form.
    """
    nodes, inverse = np.unique(np.concatenate([a, b]).astype(np.int64), return_inverse=True)
    ea, eb = inverse[: a.size], inverse[a.size :]
    label = np.arange(nodes.size)
    while True:
        low = np.minimum(label[ea], label[eb])
        new = label.copy()
        np.minimum.at(new, ea, low)
        np.minimum.at(new, eb, low)
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return nodes, nodes[label]
        label = new


def assign_representatives(nodes: np.ndarray, root: np.ndarray, margins: pl.DataFrame | None,
                           keep: Keep) -> pl.DataFrame:
    """Members (idx), cluster ids 1.. (in order of first-seen member), size, and each cluster's kept pair.

    `margins`: idx, margin (needed for ``keep="margin"``; a missing margin ranks last).
    """
    members = pl.DataFrame({"idx": nodes, "root": root})
    members = members.with_columns(cluster_id=pl.col("root").rank("dense").cast(pl.Int32),
                                   size=pl.len().over("root").cast(pl.Int32))
    if keep == "margin":
        if margins is None:
            raise ValueError("keep='margin' needs the members' margins")
        members = members.join(margins.select("idx", "margin"), on="idx", how="left")
        best = (members.sort(["cluster_id", pl.col("margin").fill_null(-np.inf), "idx"],
                             descending=[False, True, False])
                .group_by("cluster_id", maintain_order=True).agg(representative_idx=pl.col("idx").first()))
        members = members.join(best, on="cluster_id", how="left").drop("margin")
    else:
        members = members.with_columns(representative_idx=pl.col("root"))
    return members.drop("root").sort("idx")


def cluster_rows(members: pl.DataFrame, to_rep: pl.DataFrame, config: NearDupConfig) -> pl.DataFrame:
    """The clusters table (by idx): similarities to the kept pair, orientation, contradiction flag.

    `to_rep`: :func:`similarities` of (member a, representative b) for every non-representative member.
    """
    rows = members.join(to_rep.rename({"a": "idx", "b": "representative_idx"}), on=["idx", "representative_idx"],
                        how="left")
    is_rep = pl.col("idx") == pl.col("representative_idx")
    rows = rows.with_columns(
        representative=is_rep,
        prompt_similarity=pl.when(is_rep).then(1.0).otherwise(pl.col("prompt_similarity")),
        response_similarity=pl.when(is_rep).then(1.0).otherwise(pl.max_horizontal("same", "swapped")),
        orientation=pl.when(~is_rep & (pl.col("swapped") > pl.col("same"))).then(pl.lit("swapped"))
        .otherwise(pl.lit("same")),
    )
    rows = rows.with_columns(contradiction=(pl.col("orientation") == "swapped").any().over("cluster_id"))
    return rows.select("idx", "cluster_id", "representative_idx", "representative", "size", "prompt_similarity",
                       "response_similarity", "orientation", "contradiction")


def decisions(rows: pl.DataFrame, config: NearDupConfig) -> pl.DataFrame:
    """reason/detail (by pair_id) of the pairs the clusters drop; `rows` carries pair_id and representative_id."""
    kept_by = "the first seen" if config.keep == "first" else "the highest margin"
    sims = pl.format("prompt similarity {}, response similarity {}", pl.col("prompt_similarity").round(3),
                     pl.col("response_similarity").round(3))
    drop_all = config.contradictions == "drop"
    contradiction = pl.col("contradiction") & pl.lit(drop_all)
    dropped = rows.filter(contradiction | ~pl.col("representative"))
    return dropped.select(
        "pair_id",
        reason=pl.when(contradiction).then(pl.lit(DecisionReason.NEAR_CONTRADICTION.value))
        .otherwise(pl.lit(DecisionReason.NEAR_DUPLICATE.value)),
        detail=pl.when(contradiction).then(pl.format(
            "near-contradiction: cluster {} ({} pairs) disagrees on which response wins; {}; "
            "near_dup.contradictions=drop drops the whole cluster",
            "cluster_id", "size",
            pl.when(pl.col("representative")).then(pl.lit("this pair is its representative"))
            .otherwise(pl.format("this pair vs {}: {} orientation, {}", "representative_id", "orientation", sims))))
        .otherwise(pl.format(
            "near-duplicate of {}{} (cluster {}, {} pairs; {}; kept: {} pair)",
            "representative_id",
            pl.when(pl.col("orientation") == "swapped").then(pl.lit(" with the sides swapped, a near-contradiction"))
            .otherwise(pl.lit("")),
            "cluster_id", "size", sims, pl.lit(kept_by))),
    )


def edge_batches(a: np.ndarray, b: np.ndarray, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for lo in range(0, a.size, rows):
        yield a[lo : lo + rows], b[lo : lo + rows]
