"""The generic layouts' pair makers, and the helpers every shape uses to build a candidate pair.

Generic layouts (ARCHITECTURE.md): explicit prompt, TRL conversational (with or without a
prompt, or with a prompt text next to full message lists, which TRL's `maybe_extract_prompt`
handles), implicit prompt (Anthropic-HH transcripts), each optionally scored with
per-response ratings; and ``ranked``: a prompt with several rated responses. The shapes of
public sets (shapes.py) build on these. A maker takes one record and returns its candidate
pairs, or raises :class:`Reject` with the quarantine reason.
"""

from __future__ import annotations

import math
import os
from typing import Any

from curation.ingest.candidates import Candidate, Reject
from curation.ingest.messages import (
    check_messages,
    check_tools,
    contents,
    render_messages,
    split_prompt,
    with_system,
)
from curation.ingest.multi_response import PairingOptions, rank_pairs
from curation.schema import Reason

ASSISTANT_MARKER = "\n\nAssistant:"
GIVEN = "given"  # the pairing of rows that state chosen and rejected themselves
SCORE_ALIASES: tuple[tuple[str, str], ...] = (
    ("score_chosen", "score_rejected"),
    ("chosen_score", "rejected_score"),
    ("chosen_rating", "rejected_rating"),
    ("chosen-rating", "rejected-rating"),  # argilla's UltraFeedback sets
    ("chosen_avg_rating", "rejected_avg_rating"),
)


def score_keys(record: dict[str, Any]) -> tuple[str, str] | None:
    return next(((c, r) for c, r in SCORE_ALIASES if c in record and r in record), None)


def require(record: dict[str, Any], keys: tuple[str, ...], kind: type | tuple[type, ...], kind_name: str) -> list:
    missing = [k for k in keys if record.get(k) is None]
    if missing:
        raise Reject(Reason.MISSING_FIELD, f"missing field(s): {', '.join(missing)}")
    wrong = [k for k in keys if not isinstance(record[k], kind)]
    if wrong:
        got = ", ".join(f"{k} is {type(record[k]).__name__}" for k in wrong)
        raise Reject(Reason.WRONG_TYPE, f"expected {kind_name}: {got}")
    return [record[k] for k in keys]


def number(value: Any, key: str) -> float | None:
    """A rating or label: int, float or numeric text (CSV); None stays None; booleans are refused."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise Reject(Reason.WRONG_TYPE, f"expected a number: {key} is {value[:30]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Reject(Reason.WRONG_TYPE, f"expected a number: {key} is {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond a double's range
        value = math.inf
    if not math.isfinite(value):  # "1e400" or "nan" as text, or a hub dataset's inf/NaN
        raise Reject(Reason.WRONG_TYPE, f"expected a finite number: {key} is {value}")
    return value


def scores(record: dict[str, Any], required: bool) -> tuple[float | None, float | None]:
    keys = score_keys(record)
    if keys is None:
        if required:
            raise Reject(Reason.MISSING_FIELD, "missing field(s): score_chosen, score_rejected")
        return None, None
    values = []
    for key in keys:
        value = number(record[key], key)
        if value is None and required:
            raise Reject(Reason.MISSING_FIELD, f"missing field(s): {key}")
        values.append(value)
    return values[0], values[1]


def text_candidate(prompt: str | list, chosen: str | list, rejected: str | list, score: tuple[float | None, float | None],
                   pairing: str, system: Any = None, tools: str | None = None, as_messages: bool = False) -> Candidate:
    """A candidate from a prompt (text or messages) and two completions (texts or messages).

    Plain text stays plain unless `as_messages`, a system turn, tools or a message list make it
    a conversation: then a prompt text is one user turn and each completion text one assistant
    turn. A shape whose rows may carry a system column passes `as_messages`, so its rows with
    an empty one are conversations too and a source does not mix the two kinds.
    """
    if (not as_messages and isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str)
            and not system and not tools):
        return prompt, chosen, rejected, None, None, None, score[0], score[1], None, pairing
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    messages = with_system(system, messages)
    chosen_m = [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else chosen
    rejected_m = [{"role": "assistant", "content": rejected}] if isinstance(rejected, str) else rejected
    return (render_messages(messages), contents(chosen_m), contents(rejected_m), messages, chosen_m, rejected_m,
            score[0], score[1], tools, pairing)


def explicit(record: dict[str, Any], options: PairingOptions) -> list[Candidate]:
    prompt, chosen, rejected = require(record, ("prompt", "chosen", "rejected"), str, "strings")
    score = scores(record, options.require_scores)
    if "system" not in record and "tools" not in record:  # the common case, kept lean: the hot path of a big ingest
        return [(prompt, chosen, rejected, None, None, None, score[0], score[1], None, GIVEN)]
    return [text_candidate(prompt, chosen, rejected, score, GIVEN, record.get("system"),
                           check_tools(record.get("tools")), as_messages=True)]


def implicit(record: dict[str, Any], options: PairingOptions) -> list[Candidate]:
    """Split HH transcripts at the last assistant marker both sides share; the prompt keeps it.

    A system column goes in front of the transcript, where Anthropic's text format puts it.
    """
    chosen, rejected = require(record, ("chosen", "rejected"), str, "strings")
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise Reject(Reason.NO_SHARED_PROMPT, f"chosen and rejected share no {ASSISTANT_MARKER!r} turn")
    cut += len(ASSISTANT_MARKER)
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise Reject(Reason.WRONG_TYPE, f"expected a string: system is {type(system).__name__}")
    score = scores(record, options.require_scores)
    return [((system or "") + chosen[:cut], chosen[cut:], rejected[cut:], None, None, None, score[0], score[1], None,
             GIVEN)]


def conversational(record: dict[str, Any], options: PairingOptions) -> list[Candidate]:
    """TRL's conversational layouts, the prompt taken the way `maybe_extract_prompt` takes it.

    A message-list prompt is the prompt. With a prompt *text* next to message lists (the
    "trl-style" HH layout, UltraFeedback binarized), TRL ignores the text and extracts the
    shared leading messages, so does Winnow: keeping both would put the question in twice.
    Lists that share no leading message and start with the assistant are completions of the
    text prompt, which becomes a user turn.
    """
    chosen, rejected = require(record, ("chosen", "rejected"), list, "message lists")
    chosen = check_messages("chosen", chosen)
    rejected = check_messages("rejected", rejected)
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        prompt = check_messages("prompt", prompt)
    elif prompt is not None and not isinstance(prompt, str):
        raise Reject(Reason.WRONG_TYPE, f"expected a message list: prompt is {type(prompt).__name__}")
    else:
        split = split_prompt(chosen, rejected)
        if split is not None:
            prompt, chosen, rejected = split
        elif isinstance(prompt, str) and chosen and rejected and chosen[0]["role"] == rejected[0]["role"] == "assistant":
            prompt = [{"role": "user", "content": prompt}]
        else:
            raise Reject(Reason.NO_SHARED_PROMPT, "chosen and rejected share no leading messages")
    prompt = with_system(record.get("system"), prompt)
    score = scores(record, options.require_scores)
    tools = check_tools(record.get("tools"))
    return [(render_messages(prompt), contents(chosen), contents(rejected), prompt, chosen, rejected, score[0],
             score[1], tools, GIVEN)]


def prompt_of(record: dict[str, Any], key: str = "prompt") -> str | list:
    """A prompt column: a text, or a message list (checked)."""
    prompt = record.get(key)
    if prompt is None:
        raise Reject(Reason.MISSING_FIELD, f"missing field(s): {key}")
    if isinstance(prompt, list):
        return check_messages(key, prompt)
    if not isinstance(prompt, str):
        raise Reject(Reason.WRONG_TYPE, f"expected a string or a message list: {key} is {type(prompt).__name__}")
    return prompt


def ranked_candidates(prompt: str | list, responses: list[str], ratings: list[float | None], options: PairingOptions,
                      system: Any = None, tools: str | None = None, as_messages: bool = False) -> list[Candidate]:
    """Pairs of a multi-response row by the configured strategy; scores are the ratings compared."""
    pairs = rank_pairs(ratings, options.pairing, options.min_rating_gap)
    strategy = options.pairing.value
    return [text_candidate(prompt, responses[i], responses[j], (ratings[i], ratings[j]), strategy, system, tools,
                           as_messages) for i, j in pairs]


def ranked(record: dict[str, Any], options: PairingOptions) -> list[Candidate]:
    """``prompt`` with ``responses`` (texts) and ``ratings`` (numbers, one per response)."""
    prompt = prompt_of(record)
    responses, ratings = require(record, ("responses", "ratings"), list, "lists")
    if len(responses) != len(ratings):
        raise Reject(Reason.WRONG_TYPE, f"{len(responses)} responses but {len(ratings)} ratings")
    usable = []
    for i, (response, rating) in enumerate(zip(responses, ratings, strict=True)):
        value = number(rating, f"ratings[{i}]")
        ok = isinstance(response, str) and bool(response.strip()) and value is not None and not math.isnan(value)
        usable.append(value if ok else None)
    return ranked_candidates(prompt, responses, usable, options, record.get("system"),
                             check_tools(record.get("tools")), as_messages="system" in record)
