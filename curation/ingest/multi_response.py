"""Rows with several rated responses to pairs, by a named strategy.

A strategy turns the ratings of one row into (chosen, rejected) index pairs:

- ``best-vs-worst`` (default): the highest rated against the lowest rated, one pair per row;
- ``best-vs-rest``: the highest rated against every response rated lower;
- ``all-pairs``: every two responses whose ratings differ, the higher one chosen.

A pair is made only when the chosen rating is higher than the rejected one by at least
``min_rating_gap`` (and by more than nothing: ties never become a pair). When several responses
share the top (or bottom) rating, the first of them in the row's order is taken, so the
result is deterministic. Responses without a usable rating (missing, "N/A") or with an empty
text are left out of the ranking. A row that makes no pair says why: ``too_few_responses``
(fewer than two usable responses), ``tie`` (all rated alike) or ``below_min_gap``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from curation.ingest.candidates import Reject
from curation.schema import Reason


class Pairing(StrEnum):
    BEST_VS_WORST = "best-vs-worst"
    BEST_VS_REST = "best-vs-rest"
    ALL_PAIRS = "all-pairs"


class Rating(StrEnum):
    """Which rating ranks openbmb/UltraFeedback's completions: overall, the fine-grained mean, or one aspect."""

    OVERALL = "overall"  # overall_score (the critique's 1-10 score)
    FINE_GRAINED = "fine-grained"  # fine-grained_score (mean of the four aspect ratings)
    HELPFULNESS = "helpfulness"
    HONESTY = "honesty"
    INSTRUCTION_FOLLOWING = "instruction_following"
    TRUTHFULNESS = "truthfulness"


class PreferenceLabel(StrEnum):
    """Which label orients a two-label set (PKU-SafeRLHF: better_response_id or safer_response_id)."""

    BETTER = "better"
    SAFER = "safer"


@dataclass(frozen=True)
class PairingOptions:
    """The options a shape's pair maker reads (built from IngestOptions once per run)."""

    pairing: Pairing = Pairing.BEST_VS_WORST
    min_rating_gap: float = 0.0
    rating: Rating = Rating.OVERALL
    preference_label: PreferenceLabel = PreferenceLabel.BETTER
    require_scores: bool = False


def rank_pairs(ratings: list[float | None], pairing: Pairing, min_gap: float = 0.0) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs of one row; None ratings are left out of the ranking."""
    usable = [(i, r) for i, r in enumerate(ratings) if r is not None]
    if len(usable) < 2:
        raise Reject(Reason.TOO_FEW_RESPONSES, f"{len(usable)} of {len(ratings)} responses carry a usable rating; "
                                               "a pair needs two")
    best_i, best = max(usable, key=lambda x: x[1])  # max/min return the first of equals
    worst_i, worst = min(usable, key=lambda x: x[1])
    if best == worst:
        raise Reject(Reason.TIE, f"all {len(usable)} rated responses tie at {best:g}")

    def wins(a: float, b: float) -> bool:
        return a > b and a - b >= min_gap

    if pairing == Pairing.BEST_VS_WORST:
        pairs = [(best_i, worst_i)] if wins(best, worst) else []
    elif pairing == Pairing.BEST_VS_REST:
        pairs = [(best_i, j) for j, r in usable if wins(best, r)]
    else:
        pairs = []
        for a, (i, ri) in enumerate(usable):
            for j, rj in usable[a + 1:]:
                if wins(ri, rj):
                    pairs.append((i, j))
                elif wins(rj, ri):
                    pairs.append((j, i))
    if not pairs:
        raise Reject(Reason.BELOW_MIN_GAP, f"no rating gap reaches min_rating_gap={min_gap:g} "
                                           f"(best {best:g}, worst {worst:g})")
    return pairs


def signed_preference(value: float, first: str, second: str) -> tuple[int, float]:
    """HelpSteer's preference: negative means the first response is better, positive the second, 0 a tie.

    Returns (index of the chosen response, strength |value|).
    """
    if value == 0:
        raise Reject(Reason.TIE, f"preference 0: {first} and {second} are about the same")
    return (0 if value < 0 else 1), abs(value)
