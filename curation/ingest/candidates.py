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
    """Candidate pairs of one batch; `pair_index` numbers the pairs of a row from 0.

    Rows append their tuples; :meth:`frame_columns` turns them into columns in one transposition
    (``zip(*...)`` runs in C), which keeps the per-row cost of a big single-pair ingest down.
    """

    source_rows: list[int] = field(default_factory=list)
    pair_indexes: list[int] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)

    def add(self, row: int, candidates: list[Candidate]) -> None:
        if len(candidates) == 1:
            self.source_rows.append(row)
            self.pair_indexes.append(0)
            self.candidates.append(candidates[0])
            return
        self.source_rows.extend([row] * len(candidates))
        self.pair_indexes.extend(range(len(candidates)))
        self.candidates.extend(candidates)

    def frame_columns(self) -> dict[str, list[Any]]:
        """Column name -> values; message lists as JSON text."""
        values = list(zip(*self.candidates, strict=True)) if self.candidates else [() for _ in COLUMNS]
        columns = {name: list(v) for name, v in zip(COLUMNS, values, strict=True)}
        dumps = json.dumps
        for name in ("prompt_messages", "chosen_messages", "rejected_messages"):
            column = columns[name]
            if any(m is not None for m in column):
                columns[name] = [dumps(m, ensure_ascii=False) if m is not None else None for m in column]
        columns["source_row"] = self.source_rows
        columns["pair_index"] = self.pair_indexes
        return columns

    def __len__(self) -> int:
        return len(self.source_rows)
