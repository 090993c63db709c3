"""The pair schema and the quarantine reason codes shared by every stage."""

from __future__ import annotations

from enum import StrEnum

import polars as pl


class Reason(StrEnum):
    """Why a row never became a pair. Values are stable: users query them."""

    MALFORMED_JSON = "malformed_json"
    MALFORMED_ROW = "malformed_row"
    UNDECODABLE_BYTES = "undecodable_bytes"
    TOO_LARGE = "too_large"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    EMPTY_TEXT = "empty_text"
    IDENTICAL_SIDES = "identical_sides"
    NO_SHARED_PROMPT = "no_shared_prompt"
    DUPLICATE = "duplicate"
    CONTRADICTION = "contradiction"
    # multi-response and label-style sets (curation/ingest/multi_response.py, shapes.py)
    TIE = "tie"  # the ratings or the label say neither response is better
    BELOW_MIN_GAP = "below_min_gap"  # every rating gap is under ingest.min_rating_gap
    TOO_FEW_RESPONSES = "too_few_responses"  # fewer than two responses carry a usable rating
    # conversations (curation/ingest/messages.py)
    UNKNOWN_ROLE = "unknown_role"  # a message role TRL's chat templates do not know
    CONFLICTING_SYSTEM = "conflicting_system"  # a system column and a different system turn in the prompt


class DecisionReason(StrEnum):
    """Why curation kept or dropped a scored pair (the `decisions.reason` column). Values are stable."""

    KEPT = "kept"
    HELDOUT = "heldout"  # prompt held out of training for evaluation (curation/heldout.py)
    TOO_LONG = "too_long"
    OVER_MAX_LENGTH = "over_max_length"  # length_policy drop: prompt + completion exceed max_length
    TRUNCATED = "truncated"
    LOW_EDIT_DISTANCE = "low_edit_distance"
    LENGTH_RATIO = "length_ratio"
    LOW_MARGIN = "low_margin"
    NO_MARGIN = "no_margin"
    CONTAMINATED = "contaminated"  # an n-gram of an evaluation set the user named (curation/decontam.py)
    NEAR_CONTRADICTION = "near_contradiction"  # a near-duplicate cluster that disagrees on the winner
    NEAR_DUPLICATE = "near_duplicate"  # a near-duplicate of a kept pair (curation/near_dup.py)
    BETA_OUTLIER_LOW = "beta_outlier_low"
    BETA_OUTLIER_HIGH = "beta_outlier_high"

    @property
    def is_beta_outlier(self) -> bool:
        return self in (DecisionReason.BETA_OUTLIER_LOW, DecisionReason.BETA_OUTLIER_HIGH)


# One row per candidate pair, before cross-row checks (duplicates, contradictions).
CANDIDATE_SCHEMA: dict[str, pl.DataType] = {
    "prompt": pl.String(),
    "chosen": pl.String(),
    "rejected": pl.String(),
    "prompt_messages": pl.String(),
    "chosen_messages": pl.String(),
    "rejected_messages": pl.String(),
    "score_chosen": pl.Float64(),
    "score_rejected": pl.Float64(),
    "source": pl.String(),
    "source_row": pl.Int64(),
    "format": pl.String(),
    "tools": pl.String(),
    "pairing": pl.String(),
    "pair_index": pl.Int32(),
}

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.String(),
    "source_row": pl.Int64(),
    "reason": pl.String(),
    "detail": pl.String(),
    "raw": pl.String(),
}

RAW_PREVIEW_CHARS = 300


def __getattr__(name: str):  # noqa: ANN202 - module attribute hook
    """`Format` (auto, every shape name, scored) is built from the shape registry; kept importable from here."""
    if name == "Format":
        from curation.ingest.shapes import Format

        return Format
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
