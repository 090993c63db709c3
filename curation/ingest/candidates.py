"""Candidate pairs as the shapes make them, gathered column by column for one polars frame per batch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from curation.schema import Reason

# What a shape makes of one row: one tuple per candidate pair,
# (prompt, chosen, rejected, prompt_messages, chosen_messages, rejected_messages,
#  score_chosen, score_rejected, tools_json, pairing). Plain tuples: a row costs no object.
Candidate = tuple[str, str, str, Any, Any, Any, float | None, float | None, str | None, str]

COLUMNS = ("prompt", "chosen", "rejected", "prompt_messages", "chosen_messages", "rejected_messages",
           "score_chosen", "score_rejected", "tools", "pairing")


class Reject(Exception):
    """A row (or a candidate) that cannot be a pair, with its quarantine reason."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Normalised:
    """Candidate pairs of one batch, by column; `pair_index` numbers the pairs of a row from 0."""

    columns: dict[str, list[Any]] = field(default_factory=lambda: {n: [] for n in (*COLUMNS, "source_row",
                                                                                   "pair_index")})

    def add(self, row: int, candidates: list[Candidate]) -> None:
        c = self.columns
        dumps = json.dumps
        for index, candidate in enumerate(candidates):
            c["source_row"].append(row)
            c["pair_index"].append(index)
            c["prompt"].append(candidate[0])
            c["chosen"].append(candidate[1])
            c["rejected"].append(candidate[2])
            for name, value in zip(("prompt_messages", "chosen_messages", "rejected_messages"), candidate[3:6],
                                   strict=True):
                c[name].append(dumps(value, ensure_ascii=False) if value is not None else None)
            c["score_chosen"].append(candidate[6])
            c["score_rejected"].append(candidate[7])
            c["tools"].append(candidate[8])
            c["pairing"].append(candidate[9])

    def __len__(self) -> int:
        return len(self.columns["source_row"])

    @property
    def rows(self) -> int:
        """Input rows that made at least one candidate."""
        rows = self.columns["source_row"]
        return len(set(rows)) if rows else 0
