"""The registry of row shapes: how each is recognised from a row's keys, and how it makes pairs.

A shape is one small object (:class:`Shape`); a new one is one entry of :data:`SHAPES` (and its
maker, here or in formats.py). Detection takes, per record, the first shape in registry order
that recognises it, so specific public sets come before the generic layouts their rows would
also match (HuggingFaceH4 UltraFeedback before plain TRL conversational). Each public shape's
fields, nesting and types follow its dataset card; docs/datasets.md lists them (generated from
this registry by :func:`markdown_table`, and a test keeps the two equal).

Orientation of the label-style sets, from their cards:
- stanfordnlp/SHP: ``labels`` is 1 when ``human_ref_A`` is preferred, 0 when ``human_ref_B`` is;
- PKU-Alignment/PKU-SafeRLHF: ``better_response_id`` / ``safer_response_id`` is the index (0/1)
  of the preferred ``response_0`` / ``response_1``;
- nvidia/HelpSteer2 (preference) and HelpSteer3: the preference runs from -3 ("Response 1 is
  much better than Response 2") to 3 ("Response 2 is much better than Response 1"), 0 "about
  the same" (a tie). The strength |preference| is the score margin (score_chosen = strength,
  score_rejected = 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from curation.ingest import formats
from curation.ingest.candidates import Candidate, Reject
from curation.ingest.formats import GIVEN, number, ranked_candidates, require, text_candidate
from curation.ingest.messages import check_messages
from curation.ingest.multi_response import PairingOptions, PreferenceLabel, Rating, signed_preference
from curation.schema import Reason

Maker = Callable[[dict[str, Any], PairingOptions], list[Candidate]]


@dataclass(frozen=True)
class Shape:
    """One row shape: its name (stable: runs, accounting and `pairs.format` carry it), test and maker."""

    name: str
    recognise: Callable[[dict[str, Any]], bool]
    make: Maker
    recognised_by: str  # for docs/datasets.md
    pairs_made: str  # for docs/datasets.md
    reads: str = ""  # the public set(s) it is for
    generic: bool = False  # a generic layout: "+scored" when score columns come with it

    def label(self, scored: bool) -> str:
        return f"{self.name}+scored" if self.generic and scored else self.name


def _all(*keys: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: all(k in r for k in keys)


def _is_list(record: dict[str, Any], *keys: str) -> bool:
    return all(isinstance(record.get(k), list) for k in keys)


# -- public sets -----------------------------------------------------------------------------------------------


def _uf_rating(completion: dict[str, Any], rating: Rating) -> float | None:
    """One completion's rating; "N/A" and anything unreadable leave the completion out of the ranking."""
    if rating == Rating.OVERALL:
        value = completion.get("overall_score")
    elif rating == Rating.FINE_GRAINED:
        value = completion.get("fine-grained_score")
    else:
        annotations = completion.get("annotations") or {}
        aspect = annotations.get(rating.value) or annotations.get(rating.value.replace("_", "-")) or {}
        value = aspect.get("Rating") if isinstance(aspect, dict) else None
    try:
        value = number(value, "rating")
    except Reject:
        return None
    return None if value is None or value != value else value  # NaN is no rating


def ultrafeedback_raw(record: dict[str, Any], options: PairingOptions) -> list[Candidate]:
    (instruction,) = require(record, ("instruction",), str, "a string")
    (completions,) = require(record, ("completions",), list, "a list")
    responses, ratings = [], []
    for completion in completions:
        # an empty response cannot be a side of a pair: it is left out of the ranking, not paired and dropped
        ok = isinstance(completion, dict) and isinstance(completion.get("response"), str) \
            and bool(completion["response"].strip())
        responses.append(completion.get("response") if ok else None)
        ratings.append(_uf_rating(completion, options.rating) if ok else None)
    return ranked_candidates(instruction, responses, ratings, options)


def _binary_label(record: dict[str, Any], key: str) -> int:
    value = number(record.get(key), key)
    if value is None:
        raise Reject(Reason.MISSING_FIELD, f"missing field(s): {key}")
    if value not in (0.0, 1.0):
        raise Reject(Reason.WRONG_TYPE, f"expected 0 or 1: {key} is {value:g}")
    return int(value)


def shp(record: dict[str, Any], options: PairingOptions) -> list[Candidate]:
    """labels = 1: human_ref_A preferred. The Reddit scores are the ratings (their gap, the strength)."""
    history, a, b = require(record, ("history", "human_ref_A", "human_ref_B"), str, "strings")
    score_a, score_b = number(record.get("score_A"), "score_A"), number(record.get("score_B"), "score_B")
    if _binary_label(record, "labels") == 1:
        return [text_candidate(history, a, b, (score_a, score_b), "labels")]
    return [text_candidate(history, b, a, (score_b, score_a), "labels")]


def pku_saferlhf(record: dict[str, Any], options: PairingOptions) -> list[Candidate]:
    """better_response_id (or safer_response_id, by ingest.preference_label) indexes the chosen response."""
    prompt, first, second = require(record, ("prompt", "response_0", "response_1"), str, "strings")
    key = "safer_response_id" if options.preference_label == PreferenceLabel.SAFER else "better_response_id"
    chosen, rejected = (first, second) if _binary_label(record, key) == 0 else (second, first)
    return [text_candidate(prompt, chosen, rejected, (None, None), key)]


EXTRA_ID = "<extra_id_1>"


def _helpsteer2_prompt(text: str) -> list[dict[str, str]]:
    """HelpSteer2's multi-turn prompt text, ``turn 1<extra_id_1>Assistant\\n...<extra_id_1>User\\n...``, as messages."""
    first, *turns = text.split(EXTRA_ID)
    messages = [{"role": "user", "content": first.strip("\n")}]
    for turn in turns:
        role, sep, content = turn.partition("\n")
        if not sep or role.strip() not in ("User", "Assistant"):
            raise Reject(Reason.WRONG_TYPE, f"prompt turn after {EXTRA_ID} is not 'User' or 'Assistant': {role[:30]!r}")
        messages.append({"role": role.strip().lower(), "content": content.strip("\n")})
    return messages


def helpsteer2(record: dict[str, Any], options: PairingOptions) -> list[Candidate]:
    prompt, first, second = require(record, ("prompt", "response_1", "response_2"), str, "strings")
    value = number(record.get("preference_strength"), "preference_strength")
    if value is None:
        raise Reject(Reason.MISSING_FIELD, "missing field(s): preference_strength")
    index, strength = signed_preference(value, "response_1", "response_2")
    chosen, rejected = (first, second) if index == 0 else (second, first)
    return [text_candidate(_helpsteer2_prompt(prompt), chosen, rejected, (strength, 0.0), "preference_strength")]


def helpsteer3(record: dict[str, Any], options: PairingOptions) -> list[Candidate]:
    (context,) = require(record, ("context",), list, "a message list")
    context = check_messages("context", context)
    first, second = require(record, ("response1", "response2"), str, "strings")
    value = number(record.get("overall_preference"), "overall_preference")
    if value is None:
        raise Reject(Reason.MISSING_FIELD, "missing field(s): overall_preference")
    index, strength = signed_preference(value, "response1", "response2")
    chosen, rejected = (first, second) if index == 0 else (second, first)
    return [text_candidate(context, chosen, rejected, (strength, 0.0), "overall_preference")]


def _renamed(maker: Maker, **renames: str) -> Maker:
    """A maker reading a generic layout whose columns have other names (Orca's `question`)."""

    def make(record: dict[str, Any], options: PairingOptions) -> list[Candidate]:
        mapped = {k: v for k, v in record.items() if k not in renames.values()}
        for target, column in renames.items():
            mapped[target] = record.get(column)
        return maker(mapped, options)

    return make


def orca_distilabel(record: dict[str, Any], options: PairingOptions) -> list[Candidate]:
    """argilla's relabelled Orca pairs: `status` "tie" is a tie; chosen_score and `rating` give the scores."""
    if record.get("status") == "tie":
        raise Reject(Reason.TIE, "status 'tie': the labelling model rated both responses alike")
    prompt, chosen, rejected = require(record, ("input", "chosen", "rejected"), str, "strings")
    score_chosen, score_rejected = number(record.get("chosen_score"), "chosen_score"), None
    rating = record.get("rating")
    if score_chosen is not None and isinstance(rating, list) and len(rating) == 2 and score_chosen in rating:
        score_rejected = number(rating[1] if rating[0] == score_chosen else rating[0], "rating")
    return [text_candidate(prompt, chosen, rejected, (score_chosen, score_rejected), GIVEN, record.get("system"),
                           as_messages=True)]


def _rated_pairs(record: dict[str, Any], options: PairingOptions) -> list[Candidate]:
    """Binarized UltraFeedback: chosen is the higher rated response, so equal ratings are a tie."""
    candidates = formats.conversational(record, options)
    for candidate in candidates:
        if candidate[6] is not None and candidate[6] == candidate[7]:
            raise Reject(Reason.TIE, f"chosen and rejected are both rated {candidate[6]:g}")
    return candidates


# -- the registry, in detection order (specific shapes first) ---------------------------------------------------

SHAPES: tuple[Shape, ...] = (
    Shape("ultrafeedback-raw", _all("instruction", "completions"), ultrafeedback_raw,
          "`instruction` and a `completions` list of {response, overall_score, fine-grained_score, annotations}",
          "completions ranked by `ingest.rating` (overall, fine-grained or one aspect), then `ingest.pairing`",
          "openbmb/UltraFeedback"),
    Shape("shp", _all("human_ref_A", "human_ref_B", "labels"), shp,
          "`history`, `human_ref_A`, `human_ref_B`, `labels`, `score_A`, `score_B`",
          "`labels` 1: A chosen, 0: B chosen; scores are the Reddit scores", "stanfordnlp/SHP, SHP-2"),
    Shape("pku-saferlhf", lambda r: "response_0" in r and "response_1" in r
          and ("better_response_id" in r or "safer_response_id" in r), pku_saferlhf,
          "`prompt`, `response_0`, `response_1`, `better_response_id`, `safer_response_id`",
          "the response at `better_response_id` (or `safer_response_id`: `ingest.preference_label`) is chosen; "
          "no scores", "PKU-Alignment/PKU-SafeRLHF"),
    Shape("helpsteer2", _all("response_1", "response_2", "preference_strength"), helpsteer2,
          "`prompt` (multi-turn joined by `<extra_id_1>`), `response_1`, `response_2`, `preference_strength`",
          "negative: response_1 chosen, positive: response_2, 0: tie (quarantined); "
          "score_chosen = abs(strength), score_rejected = 0", "nvidia/HelpSteer2 (preference)"),
    Shape("helpsteer3", _all("context", "response1", "response2", "overall_preference"), helpsteer3,
          "`context` (messages), `response1`, `response2`, `overall_preference`",
          "negative: response1 chosen, positive: response2, 0: tie (quarantined); "
          "score_chosen = abs(preference), score_rejected = 0", "nvidia/HelpSteer3 (preference)"),
    Shape("ranked", lambda r: "prompt" in r and _is_list(r, "responses", "ratings"), formats.ranked,
          "`prompt`, `responses` (list) and `ratings` (list, one per response)",
          "ranked by `ratings`, then `ingest.pairing`", "any multi-response set (or via --columns)"),
    Shape("orca-dpo", lambda r: "prompt" not in r and _all("question", "chosen", "rejected")(r),
          _renamed(formats.explicit, prompt="question"),
          "`system`, `question`, `chosen`, `rejected` (strings)",
          "as given; `system` becomes the first message", "Intel/orca_dpo_pairs"),
    Shape("orca-distilabel", lambda r: "prompt" not in r and _all("input", "chosen", "rejected")(r),
          orca_distilabel, "`system`, `input`, `chosen`, `rejected`, `status`, `chosen_score`, `rating`",
          "as given; `status` tie quarantined; `system` becomes the first message",
          "argilla/distilabel-intel-orca-dpo-pairs"),
    Shape("ultrafeedback-binarized", lambda r: isinstance(r.get("prompt"), str) and _is_list(r, "chosen", "rejected")
          and "score_chosen" in r and ("prompt_id" in r or "messages" in r), _rated_pairs,
          "`prompt` text, `prompt_id`, `chosen`/`rejected` message lists, `score_chosen`/`score_rejected`",
          "prompt = the shared leading messages (TRL's `maybe_extract_prompt`); equal scores quarantined as tie",
          "HuggingFaceH4/ultrafeedback_binarized"),
    Shape("ultrafeedback-argilla", lambda r: isinstance(r.get("prompt"), str) and _is_list(r, "chosen", "rejected")
          and "chosen-rating" in r, _rated_pairs,
          "`prompt` text, `chosen`/`rejected` message lists, `chosen-rating`/`rejected-rating`",
          "prompt = the shared leading messages; equal ratings quarantined as tie",
          "argilla/ultrafeedback-binarized-preferences-cleaned"),
    Shape("trl-style", lambda r: isinstance(r.get("prompt"), str) and _is_list(r, "chosen", "rejected"),
          formats.conversational, "`prompt` text next to `chosen`/`rejected` full message lists",
          "prompt = the shared leading messages, as TRL's `maybe_extract_prompt` (the text is not added twice)",
          "TRL's trl-style HH (trl-lib/hh-rlhf-helpful-base)", generic=True),
    Shape("conversational", lambda r: _is_list(r, "chosen", "rejected"), formats.conversational,
          "`chosen`/`rejected` message lists, `prompt` a message list or absent; optional `tools`, `system`",
          "as given; no prompt: the shared leading messages", "TRL conversational (explicit or implicit prompt)",
          generic=True),
    Shape("explicit", _all("prompt", "chosen", "rejected"), formats.explicit,
          "`prompt`, `chosen`, `rejected` strings; optional `system`", "as given", "TRL standard", generic=True),
    Shape("implicit", _all("chosen", "rejected"), formats.implicit,
          "`chosen`, `rejected` transcripts only", "split after the last shared `\\n\\nAssistant:`",
          "Anthropic/hh-rlhf", generic=True),
)
BY_NAME: dict[str, Shape] = {s.name: s for s in SHAPES}

# --format values: auto, every shape by name, and `scored` (detect the shape, require ratings).
Format = StrEnum("Format", [("AUTO", "auto"), *((s.name.upper().replace("-", "_"), s.name) for s in SHAPES),
                            ("SCORED", "scored")], module=__name__)


def recognise(record: dict[str, Any]) -> Shape | None:
    return next((s for s in SHAPES if s.recognise(record)), None)


def markdown_table() -> str:
    """The supported shapes as the table docs/datasets.md and the README show."""
    lines = ["| shape | recognised by | pairs made | for |", "|---|---|---|---|"]
    lines += [f"| `{s.name}` | {s.recognised_by} | {s.pairs_made} | {s.reads} |" for s in SHAPES]
    return "\n".join(lines)
