"""Decontamination: n-gram overlap of every pair with the evaluation sets the user names.

The rule of GPT-3 (Brown et al. 2020, appendix C) and datatrove's decontaminator, applied to
pairs: texts are normalised (lower case, punctuation and whitespace runs to one space), cut into
word n-grams (13 by default) and a pair whose prompt, chosen or rejected shares at least
`min_ngrams` of them with a benchmark entry is contaminated. The decision names the benchmark,
its row and field, and the matched span (the first run of overlapping n-grams, normalised).

Benchmarks are read through ingest's source resolution (files, folders, globs, `hf:NAME[:SPLIT]`)
and its streaming readers; every text field of a row is an entry (or the fields named in
`fields`, dotted for nested ones), prompts and references alike. Entries shorter than `ngram`
words cannot match (as in GPT-3 and datatrove); their count is recorded so a user can lower
`ngram`. The benchmarks' n-grams sit in memory as one sorted array (8 bytes each, plus owners),
the pairs stream past in batches.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl

from curation.config_fields import setting
from curation.errors import WinnowError
from curation.ingest.readers import read_source
from curation.ingest.sources import HUB_PREFIX, resolve_sources
from curation.shingles import normalise, window_hashes, word_tokens

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
SPAN_CHARS = 200


@dataclass(frozen=True)
class DecontamConfig:
    """Settings of the decontamination step (docs: curation/decontam.py)."""

    benchmarks: list[str] = setting(default_factory=list, help="Evaluation sets to check the pairs against: files, "
                                    "folders, globs or hf:NAME[:SPLIT], each optionally named NAME=SOURCE; empty: off.")
    ngram: int = setting(13, help="Words per n-gram (13: GPT-3's and datatrove's choice).")
    fields: list[str] = setting(default_factory=list, help="Benchmark fields to read (dotted for nested ones); "
                                "empty: every text field (prompts and references).")
    min_ngrams: int = setting(1, help="Shared n-grams that make a pair's field contaminated.")
    drop: bool = setting(True, help="Drop contaminated pairs (reason contaminated); false: record the hits only.")

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.min_ngrams < 1:
            raise WinnowError(f"decontam.ngram and decontam.min_ngrams must be at least 1, got {self.ngram}, "
                              f"{self.min_ngrams}")

    @property
    def enabled(self) -> bool:
        return bool(self.benchmarks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchmarkInfo:
    """What was read of one benchmark (recorded with the curation settings)."""

    name: str
    sources: list[str]
    fingerprints: list[str]
    rows: int = 0
    unreadable_rows: int = 0
    entries: int = 0
    short_entries: int = 0  # fewer words than the n-gram: cannot match
    ngrams: int = 0


@dataclass
class NgramIndex:
    """Every benchmark n-gram: sorted hashes, each with its benchmark, row and field (first occurrence)."""

    keys: np.ndarray  # uint64, sorted; one entry per (hash, benchmark)
    bench: np.ndarray  # int32
    row: np.ndarray  # int64
    field: np.ndarray  # int32, into `fields`
    names: list[str]
    fields: list[str]
    infos: list[BenchmarkInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A one-hash Bloom filter in front of the sorted keys: about 64 slots per key, so ~1.5% of
        # the pairs' n-grams reach the binary search (most n-grams of a preference set hit nothing).
        bits = int(min(max(np.ceil(np.log2(max(self.keys.size, 1) * 64)), 16), 28))
        self._shift = np.uint64(64 - bits)
        self._filter = np.zeros(1 << bits, dtype=bool)
        self._filter[(self.keys >> self._shift).astype(np.int64)] = True

    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query position, index entry) of every hit; a hash in k benchmarks hits k times."""
        maybe = np.flatnonzero(self._filter[(hashes >> self._shift).astype(np.int64)])
        query, entry = self._search(hashes[maybe])
        return maybe[query], entry

    def _search(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo = np.searchsorted(self.keys, hashes, side="left")
        hi = np.searchsorted(self.keys, hashes, side="right")
        count = hi - lo
        query = np.repeat(np.arange(hashes.size), count)
        entry = np.repeat(lo, count) + (np.arange(query.size) - np.repeat(np.cumsum(count) - count, count))
        return query, entry


def _split_name(spec: str) -> tuple[str | None, str]:
    if spec.startswith(HUB_PREFIX) or "=" not in spec:
        return None, spec
    name, _, rest = spec.partition("=")
    return (name, rest) if _NAME.match(name) else (None, spec)


def _default_name(spec: str) -> str:
    if spec.startswith(HUB_PREFIX):
        return spec[len(HUB_PREFIX):].split(":", 1)[0]
    stem = spec.rstrip("/").rsplit("/", 1)[-1]
    return stem.split(".", 1)[0] or spec


def _texts(record: Any, prefix: str, wanted: set[str] | None, out: list[tuple[str, str]]) -> None:
    """(field, text) of every string in a benchmark row, descending into lists and mappings."""
    if isinstance(record, str):
        if wanted is None or prefix in wanted:
            out.append((prefix, record))
    elif isinstance(record, dict):
        for key, value in record.items():
            _texts(value, f"{prefix}.{key}" if prefix else str(key), wanted, out)
    elif isinstance(record, list | tuple):
        for value in record:
            _texts(value, prefix, wanted, out)


def load_index(config: DecontamConfig, seed: int = 0, batch_size: int = 5000) -> NgramIndex:
    """Read every benchmark and hash its entries' n-grams (one clear line if a benchmark gives none)."""
    names: list[str] = []
    fields: dict[str, int] = {}
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    infos: list[BenchmarkInfo] = []
    wanted = set(config.fields) or None
    for b, spec in enumerate(config.benchmarks):
        name, location = _split_name(spec)
        name = name or _default_name(location)
        if name in names:
            raise WinnowError(f"two benchmarks are named {name!r}: name them, e.g. {name}2={location}")
        sources = resolve_sources([location])
        info = BenchmarkInfo(name=name, sources=[s.label for s in sources], fingerprints=[s.fingerprint() for s in sources])
        names.append(name)
        row_base = 0
        for source in sources:
            last = 0
            for raw in read_source(source, batch_size, max_bytes=50_000_000):
                info.unreadable_rows += len(raw.rejects)
                entries: list[tuple[str, str]] = []
                rows: list[int] = []
                for row, record in raw.records:
                    found: list[tuple[str, str]] = []
                    _texts(record, "", wanted, found)
                    entries += found
                    rows += [row_base + row] * len(found)
                    last = max(last, row)
                info.rows += len(raw.records)
                if not entries:
                    continue
                tokens = word_tokens(normalise(pl.Series([t for _, t in entries], dtype=pl.String)), seed)
                hashes, doc, _ = window_hashes(tokens, config.ngram, short="drop")
                info.entries += len(entries)
                info.short_entries += int(((tokens.counts > 0) & (tokens.counts < config.ngram)).sum())
                info.ngrams += int(hashes.size)
                field_ids = np.array([fields.setdefault(f, len(fields)) for f, _ in entries], dtype=np.int32)
                parts.append((hashes, np.full(hashes.size, b, np.int32), np.asarray(rows, np.int64)[doc],
                              field_ids[doc]))
            row_base += last
        if info.rows == 0:
            raise WinnowError(f"benchmark {name} ({location}) has no readable rows")
        infos.append(info)
    if parts:
        keys, bench, row, fid = (np.concatenate(p) for p in zip(*parts, strict=True))
    else:
        keys, bench, row, fid = (np.zeros(0, t) for t in (np.uint64, np.int32, np.int64, np.int32))
    order = np.lexsort((row, bench, keys))  # by hash, then benchmark, then first row
    keys, bench, row, fid = keys[order], bench[order], row[order], fid[order]
    first = np.ones(keys.size, dtype=bool)  # one entry per (hash, benchmark): its first row
    first[1:] = (keys[1:] != keys[:-1]) | (bench[1:] != bench[:-1])
    return NgramIndex(keys=keys[first], bench=bench[first], row=row[first], field=fid[first], names=names,
                      fields=list(fields), infos=infos)


def match(index: NgramIndex, hashes: np.ndarray, doc: np.ndarray, position: np.ndarray) -> pl.DataFrame:
    """Hits of one text column of a batch, one row per (document, benchmark).

    Columns: doc, bench, row and field of the benchmark entry of the first hit, ngrams (distinct
    matched positions), start (first matched n-gram) and run (consecutive n-grams from `start`).
    """
    query, entry = index.lookup(hashes)
    if query.size == 0:
        return pl.DataFrame(schema={"doc": pl.Int64, "bench": pl.Int32, "row": pl.Int64, "field": pl.Int32,
                                    "ngrams": pl.UInt32, "start": pl.Int64, "run": pl.UInt32})
    hits = pl.DataFrame({"doc": doc[query], "position": position[query], "bench": index.bench[entry],
                         "row": index.row[entry], "field": index.field[entry]}).sort("doc", "bench", "position")
    hits = hits.with_columns(
        _run=(pl.col("position").diff().fill_null(1) != 1).cum_sum().over("doc", "bench"))
    return hits.group_by("doc", "bench", maintain_order=True).agg(
        row=pl.col("row").first(), field=pl.col("field").first(), ngrams=pl.col("position").n_unique(),
        start=pl.col("position").first(), run=(pl.col("_run") == 0).sum())


def spans(normalised: pl.Series, hits: pl.DataFrame, ngram: int) -> list[str]:
    """The matched words of each hit (its first run of n-grams), from the normalised texts of the batch."""
    out = []
    for doc, start, run in hits.select("doc", "start", "run").iter_rows():  # one per hit: a handful per batch
        words = normalised[int(doc)].split(" ")
        text = " ".join(words[int(start) : int(start) + int(run) + ngram - 1])
        out.append(text if len(text) <= SPAN_CHARS else text[: SPAN_CHARS - 3] + "...")
    return out
