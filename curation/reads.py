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


# -- gym and evaluation

__all__ += ["curated_pairs", "pairs_in_source_order"]

_PAIR_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "source", "source_row")


def pairs_in_source_order(catalog: Catalog, run_id: str,
                          columns: tuple[str, ...] = ("pair_id", "prompt", "chosen")) -> pl.DataFrame:
    """A run's pairs in input order (by ``source_row``): the gym warms its reference up on them."""
    if not set(columns) <= set(_PAIR_COLUMNS):
        raise ValueError(f"unknown pair columns {sorted(set(columns) - set(_PAIR_COLUMNS))}")
    cols = ", ".join(columns)
    return catalog.query(f"SELECT {cols} FROM pairs WHERE run_id = ? ORDER BY source_row", [run_id],
                         read_only=False)


def curated_pairs(catalog: Catalog, run_id: str) -> pl.DataFrame:
    """Every scored pair of a run with its reference log-probs, margin and curation decision, in input order.

    Columns: pair_id, prompt, chosen, rejected, ref_chosen_logps, ref_rejected_logps, margin,
    kept, reason, stage. The gym trains its raw-set arms on these and scores the filter's drops.
    """
    return catalog.query(
        """SELECT p.pair_id, p.prompt, p.chosen, p.rejected, s.ref_chosen_logps, s.ref_rejected_logps, s.margin,
                  d.kept, d.reason, d.stage
           FROM pairs p JOIN scores s USING (run_id, pair_id) JOIN decisions d USING (run_id, pair_id)
           WHERE p.run_id = ? ORDER BY p.source_row""", [run_id], read_only=False)
