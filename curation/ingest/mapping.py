"""Column mapping: read a source whose columns have other names (``--columns prompt=question``).

A mapping renames a row's columns to the names Winnow reads, before the shape is detected:
``prompt``, ``chosen``, ``rejected`` (strings or message lists), ``system`` (becomes the
first message), ``score_chosen``/``score_rejected`` (ratings), ``tools`` (function schemas),
and ``responses``/``ratings`` (lists, for the multi-response ``ranked`` shape). The mapped
value replaces a column of the target's name; the source column is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from curation.errors import WinnowError
from curation.ingest.readers import RawBatch

TARGETS = ("prompt", "chosen", "rejected", "system", "score_chosen", "score_rejected", "tools", "responses",
           "ratings")

# Words that name each role in public sets' columns, for the suggestion in the "cannot detect" error.
# System first, so `system_prompt` is not taken for the prompt.
_HINTS: dict[str, tuple[str, ...]] = {
    "system": ("system",),
    "chosen": ("chosen", "preferred", "better", "winner", "good", "positive", "accepted"),
    "rejected": ("rejected", "dispreferred", "worse", "loser", "bad", "negative"),
    "prompt": ("prompt", "question", "instruction", "input", "query", "history", "context", "post", "text"),
}


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """``prompt=question,system=system`` (or a mapping) -> {target: source column}, checked."""
    if not spec:
        return {}
    if isinstance(spec, str):
        pairs: dict[str, str] = {}
        for item in spec.split(","):
            target, sep, column = (part.strip() for part in item.partition("="))
            if not sep or not target or not column:
                raise WinnowError(f"--columns expects TARGET=COLUMN[,TARGET=COLUMN...], got {item.strip()!r}")
            if target in pairs:
                raise WinnowError(f"--columns names {target!r} twice")
            pairs[target] = column
        spec = pairs
    if not isinstance(spec, Mapping):
        raise WinnowError(f"ingest.columns must map target names to columns, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(TARGETS))
    if unknown:
        raise WinnowError(f"ingest.columns: unknown target(s) {unknown}; targets are {', '.join(TARGETS)}")
    bad = [k for k, v in spec.items() if not isinstance(v, str) or not v]
    if bad:
        raise WinnowError(f"ingest.columns: {bad[0]!r} must name a column")
    return dict(spec)


def format_columns(columns: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in columns.items())


def apply_columns(raw: RawBatch, columns: Mapping[str, str]) -> RawBatch:
    """The batch with each record's columns renamed (rejects pass through)."""
    if not columns:
        return raw
    sources = set(columns.values())
    items = tuple(columns.items())
    records = []
    for row, record in raw.records:
        mapped = {k: v for k, v in record.items() if k not in sources}
        for target, column in items:
            if column in record:
                mapped[target] = record[column]
        records.append((row, mapped))
    return RawBatch(records=records, rejects=raw.rejects)


def suggest_columns(keys: Iterable[str]) -> str:
    """A ``--columns`` value that would likely read rows with these keys (<column> where none fits)."""
    keys = list(keys)
    chosen: dict[str, str] = {}
    for target, words in _HINTS.items():
        for word in words:
            match = next((k for k in keys if k not in chosen.values() and _names(k, word)), None)
            if match is not None:
                chosen[target] = match
                break
    parts = {t: chosen.get(t, "<column>") for t in ("prompt", "chosen", "rejected")}
    if "system" in chosen:
        parts["system"] = chosen["system"]
    return format_columns(parts)


def _names(key: str, word: str) -> bool:
    """Whether `word` is one of the words of column name `key` (question, question_text, QuestionText)."""
    words = re.findall(r"[a-z]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", key).lower())
    return word in words
