"""Named reads of the catalog: every query that flows, the CLI, the report and the gym run.

Why one module: SQL lives next to the schema it reads (curation/store.py), so a column
rename touches one place, and the orchestration layer (flows/) holds no SQL at all. Every
value is a bound parameter.
"""

from __future__ import annotations

import polars as pl

from curation.store import Catalog

__all__ = ["run_pair_texts"]


def run_pair_texts(catalog: Catalog, run_id: str, columns: tuple[str, ...] = ("prompt", "chosen")) -> pl.DataFrame:
    """Texts of a run's pairs (the tiny model's tokenizer and warm-up read them)."""
    allowed = {"pair_id", "prompt", "chosen", "rejected", "source", "source_row"}
    if not set(columns) <= allowed:
        raise ValueError(f"unknown pair columns {sorted(set(columns) - allowed)}")
    cols = ", ".join(columns)
    return catalog.query(f"SELECT {cols} FROM pairs WHERE run_id = ?", [run_id],
                         read_only=False)
