"""Detect a source's layout and normalise its records to the pair schema.

Layouts (ARCHITECTURE.md): explicit prompt, TRL conversational, implicit prompt
(Anthropic-HH transcripts), each optionally scored with per-response ratings.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from curation.errors import UnknownFormatError
from curation.ingest.readers import RawBatch
from curation.schema import Format, Reason

ASSISTANT_MARKER = "\n\nAssistant:"
SCORE_ALIASES: tuple[tuple[str, str], ...] = (
    ("score_chosen", "score_rejected"),
    ("chosen_score", "rejected_score"),
    ("chosen_rating", "rejected_rating"),
)


@dataclass(frozen=True)
class Layout:
    base: Format  # explicit | conversational | implicit
    scored: bool

    @property
    def label(self) -> str:
        return f"{self.base.value}+scored" if self.scored else self.base.value


def _score_keys(record: dict[str, Any]) -> tuple[str, str] | None:
    return next(((c, r) for c, r in SCORE_ALIASES if c in record and r in record), None)


def _guess(record: dict[str, Any]) -> Format | None:
    if "chosen" not in record or "rejected" not in record:
        return None
    if isinstance(record["chosen"], list):
        return Format.CONVERSATIONAL
    return Format.EXPLICIT if "prompt" in record else Format.IMPLICIT


def detect_layout(records: list[dict[str, Any]], requested: Format, source_label: str) -> Layout:
    """Majority vote over the first batch, so a few broken rows do not decide the format."""
    votes = Counter(g for r in records if (g := _guess(r)) is not None)
    scored_votes = sum(1 for r in records if _score_keys(r))
    if requested in (Format.AUTO, Format.SCORED):
        if not votes:
            keys = sorted({k for r in records[:50] for k in r})[:12]
            raise UnknownFormatError(
                f"{source_label}: cannot detect the format (keys seen: {keys}); expected prompt/chosen/rejected, "
                "chosen/rejected transcripts or message lists; pass --format"
            )
        base = votes.most_common(1)[0][0]
        scored = requested == Format.SCORED or scored_votes * 2 > len(records)
        return Layout(base, scored)
    return Layout(requested, scored_votes * 2 > len(records))


@dataclass
class Normalised:
    columns: dict[str, list[Any]]

    @classmethod
    def empty(cls) -> Normalised:
        names = ("prompt", "chosen", "rejected", "prompt_messages", "chosen_messages", "rejected_messages")
        return cls({n: [] for n in (*names, "score_chosen", "score_rejected", "source_row")})

    def add(self, row: int, texts: tuple[str, str, str], messages: tuple[Any, Any, Any], scores: tuple) -> None:
        c = self.columns
        c["source_row"].append(row)
        for name, value in zip(("prompt", "chosen", "rejected"), texts, strict=True):
            c[name].append(value)
        for name, value in zip(("prompt_messages", "chosen_messages", "rejected_messages"), messages, strict=True):
            c[name].append(json.dumps(value, ensure_ascii=False) if value is not None else None)
        c["score_chosen"].append(scores[0])
        c["score_rejected"].append(scores[1])


def normalise_batch(raw: RawBatch, layout: Layout) -> tuple[Normalised, RawBatch]:
    """Split a batch into normalised candidates and rejects (missing field, wrong type, no prompt)."""
    out, rejects = Normalised.empty(), RawBatch(rejects=list(raw.rejects))
    extract = {
        Format.EXPLICIT: _explicit,
        Format.IMPLICIT: _implicit,
        Format.CONVERSATIONAL: _conversational,
    }[layout.base]
    for row, record in raw.records:
        try:
            texts, messages = extract(record)
            scores = _scores(record, layout.scored)
        except _Reject as bad:  # the preview is built for rejects only: dumping every record cost ~10% of ingest
            rejects.reject(row, bad.reason, bad.detail, json.dumps(record, ensure_ascii=False, default=str))
            continue
        out.add(row, texts, messages, scores)
    return out, rejects


class _Reject(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _require(record: dict[str, Any], keys: tuple[str, ...], kind: type | tuple[type, ...], kind_name: str) -> list:
    missing = [k for k in keys if record.get(k) is None]
    if missing:
        raise _Reject(Reason.MISSING_FIELD, f"missing field(s): {', '.join(missing)}")
    wrong = [k for k in keys if not isinstance(record[k], kind)]
    if wrong:
        got = ", ".join(f"{k} is {type(record[k]).__name__}" for k in wrong)
        raise _Reject(Reason.WRONG_TYPE, f"expected {kind_name}: {got}")
    return [record[k] for k in keys]


def _explicit(record: dict[str, Any]) -> tuple[tuple[str, str, str], tuple]:
    prompt, chosen, rejected = _require(record, ("prompt", "chosen", "rejected"), str, "strings")
    return (prompt, chosen, rejected), (None, None, None)


def _implicit(record: dict[str, Any]) -> tuple[tuple[str, str, str], tuple]:
    """Split HH transcripts at the last assistant marker both sides share; the prompt keeps it."""
    chosen, rejected = _require(record, ("chosen", "rejected"), str, "strings")
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise _Reject(Reason.NO_SHARED_PROMPT, f"chosen and rejected share no {ASSISTANT_MARKER!r} turn")
    cut += len(ASSISTANT_MARKER)
    return (chosen[:cut], chosen[cut:], rejected[cut:]), (None, None, None)


def _check_messages(name: str, messages: list) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise _Reject(Reason.WRONG_TYPE, f"{name}[{i}] is not a {{role, content}} message")
        if not isinstance(message.get("role"), str):
            raise _Reject(Reason.MISSING_FIELD, f"{name}[{i}] has no role")


def render_messages(messages: list[dict[str, str]]) -> str:
    """A plain-text view of a conversation for text statistics (the shards keep the messages)."""
    return "".join(f"\n\n{m['role'].capitalize()}: {m['content']}" for m in messages)


def _conversational(record: dict[str, Any]) -> tuple[tuple[str, str, str], tuple]:
    chosen, rejected = _require(record, ("chosen", "rejected"), list, "message lists")
    _check_messages("chosen", chosen)
    _check_messages("rejected", rejected)
    if record.get("prompt") is not None:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list):
            raise _Reject(Reason.WRONG_TYPE, f"expected a message list: prompt is {type(prompt).__name__}")
        _check_messages("prompt", prompt)
    else:  # TRL's implicit conversational layout: the shared leading messages are the prompt
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise _Reject(Reason.NO_SHARED_PROMPT, "chosen and rejected share no leading messages")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    texts = (render_messages(prompt), _contents(chosen), _contents(rejected))
    return texts, (prompt, chosen, rejected)


def _contents(messages: list[dict[str, str]]) -> str:
    return "\n\n".join(m["content"] for m in messages)


def _scores(record: dict[str, Any], required: bool) -> tuple[float | None, float | None]:
    keys = _score_keys(record)
    if keys is None:
        if required:
            raise _Reject(Reason.MISSING_FIELD, "missing field(s): score_chosen, score_rejected")
        return None, None
    values = []
    for key in keys:
        value = record[key]
        if value is None:
            if required:
                raise _Reject(Reason.MISSING_FIELD, f"missing field(s): {key}")
            values.append(None)
            continue
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _Reject(Reason.WRONG_TYPE, f"expected a number: {key} is {value[:30]!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Reject(Reason.WRONG_TYPE, f"expected a number: {key} is {type(value).__name__}")
        values.append(float(value))
    return values[0], values[1]
