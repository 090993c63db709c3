"""Per-row checks of candidate pairs at ingest: NFC normalisation, empty and identical sides, size, and the
hashes that name a pair (pair_id) and its comparison whatever side won (the unordered key).

Vectorised over a batch (polars expressions; hashing and NFC quick checks are CPython's C code).
"""

from __future__ import annotations

import hashlib
import unicodedata
from functools import cache

import polars as pl

from curation.ingest.multi_response import Pairing
from curation.schema import Reason

_MULTI = tuple(p.value for p in Pairing)  # multi-response pairings: the detail names which pair of the row


def pair_keys(frame: pl.DataFrame) -> tuple[list[str], list[str]]:
    """pair_id and the unordered key of each row, from the normalised texts.

    pair_id = sha256(prompt, chosen, rejected joined by U+001F); the unordered key ignores
    which side won (least text first), so both orientations of one comparison meet in the
    same group. Hashed here rather than by DuckDB's sha256 (2-3x slower), with the same
    bytes: the UTF-8 of the joined text, lowercase hex. When chosen < rejected the unordered
    key is the pair_id itself (UTF-8 byte order, DuckDB's, is code-point order, Python's).
    """
    sha256 = hashlib.sha256
    pair_ids: list[str] = []
    unordered: list[str] = []
    for p, c, r in zip(frame["n_prompt"].to_list(), frame["n_chosen"].to_list(), frame["n_rejected"].to_list(),
                       strict=True):
        pair_id = sha256(f"{p}\x1f{c}\x1f{r}".encode()).hexdigest()
        pair_ids.append(pair_id)
        unordered.append(pair_id if c <= r else sha256(f"{p}\x1f{r}\x1f{c}".encode()).hexdigest())
    return pair_ids, unordered


@cache
def _unassigned_pattern() -> str:
    """A regex class of the code points this Python's Unicode database does not assign."""
    ranges, start = [], None
    for cp in range(0x110000 + 1):
        unassigned = cp < 0x110000 and unicodedata.category(chr(cp)) == "Cn"
        if unassigned and start is None:
            start = cp
        elif not unassigned and start is not None:
            ranges.append(f"\\x{{{start:X}}}-\\x{{{cp - 1:X}}}")
            start = None
    return "[" + "".join(ranges) + "]"


def nfc(column: pl.Series) -> pl.Series:
    """``column.str.normalize("NFC")``, computed only for texts that may change.

    Polars normalises every text (~70 MB/s); CPython's quick check says in a fraction of that
    time which texts already are NFC. Unicode's normalization stability policy makes a text
    that is NFC under one version NFC under every later one, as long as all its characters
    are assigned in the first: texts with characters newer than this Python's Unicode tables
    therefore go to polars as well, so the result is polars' in every case.
    """
    is_nfc = unicodedata.is_normalized
    wide = [i for i, v in enumerate(column.to_list()) if v is not None and not v.isascii()]  # ASCII is NFC
    if not wide:
        return column
    texts = column.gather(wide)
    redo = [i for i, v in zip(wide, texts.to_list(), strict=True) if not is_nfc("NFC", v)]
    newer = texts.str.contains(_unassigned_pattern()).arg_true().to_list()
    idx = sorted({*redo, *(wide[j] for j in newer)})
    if not idx:
        return column
    return column.clone().scatter(idx, column.gather(idx).str.normalize("NFC"))


def validate_rows(frame: pl.DataFrame, max_bytes: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Vectorised row checks; returns (candidates with normalised texts, rejects)."""
    norm = {f"n_{c}": nfc(frame[c]).str.strip_chars() for c in ("prompt", "chosen", "rejected")}
    frame = frame.with_columns(**norm)
    empty = [pl.when(pl.col(f"n_{c}").str.len_bytes() == 0).then(pl.lit(c)) for c in ("prompt", "chosen", "rejected")]
    size = pl.sum_horizontal(pl.col(c).str.len_bytes() for c in ("prompt", "chosen", "rejected"))
    frame = frame.with_columns(_empty=pl.concat_str(empty, separator=", ", ignore_nulls=True), _size=size)
    reason = (
        pl.when(pl.col("_size") > max_bytes)
        .then(pl.lit(Reason.TOO_LARGE.value))
        .when(pl.col("_empty") != "")
        .then(pl.lit(Reason.EMPTY_TEXT.value))
        .when(pl.col("n_chosen") == pl.col("n_rejected"))
        .then(pl.lit(Reason.IDENTICAL_SIDES.value))
    )
    detail = (
        pl.when(pl.col("_size") > max_bytes)
        .then(pl.format("texts of {} bytes exceed max_bytes={}", pl.col("_size"), pl.lit(max_bytes)))
        .when(pl.col("_empty") != "")
        .then(pl.format("empty after trimming: {}", pl.col("_empty")))
        .otherwise(pl.lit("chosen equals rejected after normalisation"))
    )
    multi = pl.col("pairing").is_in(_MULTI)  # say which pair of a multi-response row it was
    detail = pl.when(multi).then(pl.format("{} pair {}: {}", pl.col("pairing"), pl.col("pair_index"), detail)) \
        .otherwise(detail)
    frame = frame.with_columns(reason=reason, detail=detail)
    bad = frame.filter(pl.col("reason").is_not_null()).select(
        "source_row",
        "pair_index",
        "reason",
        "detail",
        raw=pl.concat_str([pl.col("prompt"), pl.col("chosen"), pl.col("rejected")], separator=" | ").str.slice(0, 300),
    )
    good = frame.filter(pl.col("reason").is_null()).drop("_empty", "_size", "reason", "detail")
    return good, bad
