"""Named reads of the catalog: every query that flows, the CLI, the report and training run.

Why one module: SQL lives next to the schema it reads (curation/store.py), so a column
rename touches one place, and the orchestration layer (flows/) holds no SQL at all. Every
value is a bound parameter; table names come from the schema, never from user input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from curation.errors import WinnowError
from curation.schema import DecisionReason
from curation.store import TABLES, Catalog, bounded_memory, fetch_polars

PAIR_TEXT_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "source", "source_row")

# "Why was pair X dropped?" -- one query; a pair_id prefix is enough.
WHY_SQL = """SELECT pair_id, kept, reason, detail, weight, stage, stage_position
FROM decisions WHERE run_id = ? AND pair_id LIKE ? || '%' ORDER BY pair_id"""


# -- runs ---------------------------------------------------------------------------------------


def latest_run_id(catalog: Catalog) -> str | None:
    """The most recently updated run that did not fail."""
    frame = catalog.query("SELECT run_id FROM runs WHERE status != 'failed' ORDER BY updated_at DESC LIMIT 1")
    return frame.item() if frame.height else None


def run_config(catalog: Catalog, run_id: str) -> dict[str, Any] | None:
    """The run's recorded settings (None when there is no such run)."""
    rows = catalog.query("SELECT config FROM runs WHERE run_id = ?", [run_id], read_only=False)
    if rows.height == 0:
        return None
    return json.loads(rows["config"][0] or "{}")


def has_rows(catalog: Catalog, table: str, run_id: str) -> bool:
    if table not in TABLES:
        raise ValueError(f"unknown catalog table {table!r}")
    return bool(catalog.query(f"SELECT count(*) AS n FROM {table} WHERE run_id = ?", [run_id], read_only=False)["n"][0])


# -- pairs and scores ---------------------------------------------------------------------------


def run_pair_texts(catalog: Catalog, run_id: str, columns: tuple[str, ...] = ("prompt", "chosen")) -> pl.DataFrame:
    """Texts of a run's pairs, in ingest order (the tiny model's tokenizer and warm-up read them)."""
    if not set(columns) <= set(PAIR_TEXT_COLUMNS):
        raise ValueError(f"unknown pair columns {sorted(set(columns) - set(PAIR_TEXT_COLUMNS))}")
    cols = ", ".join(columns)
    return catalog.query(f"SELECT {cols} FROM pairs WHERE run_id = ?", [run_id], read_only=False)


def unrated_pairs(catalog: Catalog, run_id: str) -> tuple[int, int]:
    """(pairs lacking a rating on either side, all pairs) of a run."""
    row = catalog.query(
        "SELECT count(*) FILTER (WHERE score_chosen IS NULL OR score_rejected IS NULL) AS n, count(*) AS total "
        "FROM pairs WHERE run_id = ?", [run_id], read_only=False).row(0)
    return int(row[0]), int(row[1])


EXPORT_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected")


def export_pairs_parquet(catalog: Catalog, run_id: str, path: Path, row_group_size: int = 20_000) -> Path:
    """Write the run's pairs to one parquet file (in ingest order) through DuckDB, memory flat.

    The path goes to DuckDB's writer as an argument, never spliced into SQL text.
    """
    tmp = Path(path).with_suffix(".tmp")
    with catalog.connect() as con, bounded_memory(con, threads=1):  # the sort spills: memory flat in pairs
        relation = con.sql(f"SELECT {', '.join(EXPORT_COLUMNS)} FROM pairs WHERE run_id = ? ORDER BY source, source_row",
                           params=[run_id])
        relation.write_parquet(str(tmp), row_group_size=row_group_size)
    tmp.replace(path)
    return Path(path)


def scored_pairs(catalog: Catalog, run_id: str) -> pl.DataFrame:
    """Every pair of the run with its scores (null when unscored, `_scored` says), sorted by pair_id."""
    return catalog.query(
        """SELECT p.pair_id, p.source, p.source_row, s.pair_id IS NOT NULL AS _scored,
                  s.* EXCLUDE (run_id, pair_id)
           FROM pairs p LEFT JOIN scores s ON s.run_id = p.run_id AND s.pair_id = p.pair_id
           WHERE p.run_id = ? ORDER BY p.pair_id""", [run_id], read_only=False)


def score_summary(catalog: Catalog, run_id: str) -> pl.DataFrame:
    """One row: pairs, margin source and the mean of the headline statistics."""
    return catalog.query(
        """SELECT count(*) AS pairs, any_value(margin_source) AS margin_source, round(avg(margin), 4) AS mean_margin,
                  round(avg(char_edit_norm), 4) AS char_edit, round(avg(token_edit_norm), 4) AS token_edit,
                  round(avg(length_gap), 2) AS length_gap, sum(uneven_truncation::INT) AS uneven_truncation
           FROM scores WHERE run_id = ?""", [run_id], read_only=False)


def kept_pair_rows(catalog: Catalog, run_id: str, order: pl.DataFrame) -> pl.DataFrame:
    """Texts, messages and reference log-probs of the kept pairs, in teaching order (stage, position)."""
    with catalog.connect() as con:  # its own connection, no open transaction: the view dies with it
        con.register("_order", order.select("pair_id", "stage", "stage_position").to_arrow())
        return fetch_polars(con, """
            SELECT o.stage, o.stage_position, p.pair_id, p.prompt, p.chosen, p.rejected,
                   p.prompt_messages::VARCHAR AS prompt_messages, p.chosen_messages::VARCHAR AS chosen_messages,
                   p.rejected_messages::VARCHAR AS rejected_messages,
                   s.ref_chosen_logps, s.ref_rejected_logps
            FROM _order o
            JOIN pairs p ON p.run_id = ? AND p.pair_id = o.pair_id
            LEFT JOIN scores s ON s.run_id = p.run_id AND s.pair_id = p.pair_id
            ORDER BY o.stage, o.stage_position""", [run_id])


# -- decisions and the report -------------------------------------------------------------------


def why_example(run_id: str) -> str:
    """The "why was this pair dropped" query as a user types it into `winnow query` (for reports)."""
    return (f"SELECT kept, reason, detail, weight, stage FROM decisions WHERE run_id = '{run_id}' "
            "AND pair_id LIKE '<prefix>%';")


def why(catalog: Catalog, run_id: str, pair_id: str) -> pl.DataFrame:
    """The decision row(s) of a pair (a pair_id prefix is enough): reason, detail, weight, stage."""
    return catalog.query(WHY_SQL, [run_id, pair_id], read_only=False)


def decision_counts(catalog: Catalog, run_id: str) -> pl.DataFrame:
    """Pairs by decision reason and stage ('-' for dropped pairs), kept first."""
    return catalog.query(
        """SELECT reason, coalesce(CAST(stage AS VARCHAR), '-') AS stage, count(*) AS pairs
           FROM decisions WHERE run_id = ? GROUP BY 1, 2 ORDER BY reason = 'kept' DESC, reason, stage""",
        [run_id], read_only=False)


def report_tables(catalog: Catalog, run_id: str) -> dict[str, Any]:
    """What the curation report draws: the curate record, per-pair numbers, stages, shards, advice, counts."""
    config = run_config(catalog, run_id)
    if config is None:
        raise WinnowError(f"no run {run_id!r} in {catalog.path}")
    with catalog.connect() as con:
        def q(sql: str) -> pl.DataFrame:
            return fetch_polars(con, sql, [run_id])

        return {
            "curate": config.get("curate"),
            "pairs": q("""SELECT d.pair_id, d.kept, d.reason, d.weight, d.stage, s.margin, s.token_edit_distance,
                                 s.token_edit_norm, s.length_gap, s.chosen_tokens, s.rejected_tokens
                          FROM decisions d LEFT JOIN scores s USING (run_id, pair_id) WHERE d.run_id = ?"""),
            "stages": q("SELECT * FROM stages WHERE run_id = ? ORDER BY stage"),
            "shards": q("SELECT * FROM shards WHERE run_id = ? ORDER BY stage"),
            "advice": q("SELECT * FROM advice WHERE run_id = ?"),
            "by_reason": q("""SELECT reason, stage, count(*) AS pairs FROM decisions WHERE run_id = ?
                              GROUP BY reason, stage ORDER BY (reason = 'kept') DESC, stage, pairs DESC, reason"""),
            "rounds": q(ROUND_SUMMARY_SQL),  # online curation rounds, if training ran them
        }


def eval_table(catalog: Catalog, run_id: str) -> pl.DataFrame:
    return catalog.query("SELECT model, metric, round(value, 4) AS value, n FROM evals WHERE run_id = ? ORDER BY 1, 2",
                         [run_id], read_only=False)


# -- gym and evaluation



def pairs_in_source_order(catalog: Catalog, run_id: str,
                          columns: tuple[str, ...] = ("pair_id", "prompt", "chosen")) -> pl.DataFrame:
    """A run's pairs in input order (by ``source_row``): the gym warms its reference up on them."""
    if not set(columns) <= set(PAIR_TEXT_COLUMNS):
        raise ValueError(f"unknown pair columns {sorted(set(columns) - set(PAIR_TEXT_COLUMNS))}")
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


# -- online curation (decision_rounds) ----------------------------------------------------------

# How a pair's margin and fate moved: round 0 is curation (`decisions` with the `scores` margin),
# round k >= 1 the online round after sDPO stage k (`decision_rounds`). A pair_id prefix is enough.
PAIR_ROUNDS_SQL = """SELECT 0 AS round, d.pair_id, s.margin_source, s.margin, d.weight, d.kept, d.reason, d.stage,
       d.detail
FROM decisions d JOIN scores s USING (run_id, pair_id) WHERE d.run_id = ? AND d.pair_id LIKE ? || '%'
UNION ALL
SELECT round, pair_id, margin_source, margin, weight, kept, reason, stage, detail
FROM decision_rounds WHERE run_id = ? AND pair_id LIKE ? || '%'
ORDER BY pair_id, round"""


def pair_rounds(catalog: Catalog, run_id: str, pair_id: str) -> pl.DataFrame:
    """Every round's margin and decision for a pair (a pair_id prefix is enough), round 0 first."""
    return catalog.query(PAIR_ROUNDS_SQL, [run_id, pair_id, run_id, pair_id], read_only=False)


def beta_dropped_pairs(catalog: Catalog, run_id: str) -> pl.DataFrame:
    """Texts and reference log-probs of the pairs curation's beta filter dropped (candidates for online rounds),
    sorted by pair_id. Pairs dropped by a rule stay dropped: the rules judge structure, not the label."""
    return catalog.query(
        """SELECT p.pair_id, p.prompt, p.chosen, p.rejected, s.ref_chosen_logps, s.ref_rejected_logps
           FROM decisions d JOIN pairs p USING (run_id, pair_id) JOIN scores s USING (run_id, pair_id)
           WHERE d.run_id = ? AND d.reason IN (?, ?) ORDER BY p.pair_id""",
        [run_id, DecisionReason.BETA_OUTLIER_LOW.value, DecisionReason.BETA_OUTLIER_HIGH.value], read_only=False)


ROUND_SUMMARY_SQL = """SELECT round, any_value(scoring_model) AS scoring_model, count(*) AS pairs,
       count(*) FILTER (WHERE kept) AS kept, count(*) FILTER (WHERE NOT kept) AS dropped,
       count(*) FILTER (WHERE kept AND NOT previous_kept) AS readmitted,
       count(*) FILTER (WHERE previous_kept AND NOT kept) AS newly_dropped
FROM decision_rounds WHERE run_id = ? GROUP BY round ORDER BY round"""


def round_summary(catalog: Catalog, run_id: str) -> pl.DataFrame:
    """Per online round: pairs re-decided, kept, dropped, re-admitted (dropped before, kept now), newly dropped."""
    return catalog.query(ROUND_SUMMARY_SQL, [run_id], read_only=False)


def round_placements(catalog: Catalog, run_id: str, round_no: int) -> pl.DataFrame:
    """(pair_id, stage, stage_position) of the pairs an online round kept, in teaching order."""
    return catalog.query("""SELECT pair_id, stage, stage_position FROM decision_rounds
                            WHERE run_id = ? AND round = ? AND kept ORDER BY stage, stage_position""",
                         [run_id, round_no], read_only=False)
