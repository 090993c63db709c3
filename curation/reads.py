"""Named reads of the catalog: every query that flows, the CLI, the report and training run.

Why one module: SQL lives next to the schema it reads (curation/store.py), so a column
rename touches one place, and the orchestration layer (flows/) holds no SQL at all. Every
value is a bound parameter; table names come from the schema, never from user input.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from curation.errors import WinnowError
from curation.schema import DecisionReason
from curation.store import TABLES, Catalog, bounded_memory, fetch_polars, sql_literal, stream_arrow

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


EXPORT_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected",
                  "prompt_messages::VARCHAR AS prompt_messages", "chosen_messages::VARCHAR AS chosen_messages",
                  "rejected_messages::VARCHAR AS rejected_messages", "tools::VARCHAR AS tools")


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
    """Every pair of the run with its scores (null when unscored, `_scored` says), sorted by pair_id.

    `prompt_key` identifies the prompt (its message list for conversations, else its text): the
    held-out split groups pairs by it.
    """
    return catalog.query(
        """SELECT p.pair_id, p.source, p.source_row, s.pair_id IS NOT NULL AS _scored,
                  md5(coalesce(p.prompt_messages::VARCHAR, p.prompt)) AS prompt_key,
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
                   p.rejected_messages::VARCHAR AS rejected_messages, p.tools::VARCHAR AS tools,
                   s.ref_chosen_logps, s.ref_rejected_logps
            FROM _order o
            JOIN pairs p ON p.run_id = ? AND p.pair_id = o.pair_id
            LEFT JOIN scores s ON s.run_id = p.run_id AND s.pair_id = p.pair_id
            ORDER BY o.stage, o.stage_position""", [run_id])


def run_export_pairs(catalog: Catalog, run_id: str) -> pl.DataFrame:
    """All pairs of a run with the columns the scorer exports (texts, ratings, message lists), by pair_id."""
    return catalog.query(f"SELECT {', '.join(EXPORT_COLUMNS)} FROM pairs WHERE run_id = ? ORDER BY pair_id",
                         [run_id], read_only=False)


def run_is_conversational(catalog: Catalog, run_id: str) -> bool:
    """Whether any pair of the run came as a conversation (then the whole run trains as conversations)."""
    return bool(catalog.query("SELECT count(prompt_messages) > 0 AS c FROM pairs WHERE run_id = ?", [run_id],
                              read_only=False)["c"][0])


def heldout_pairs(catalog: Catalog, run_id: str) -> pl.DataFrame:
    """The pairs curation held out for evaluation (decision reason `heldout`), sorted by pair_id.

    Texts and message lists (JSON strings, null for plain text), as the scorer exports them.
    """
    return catalog.query(
        f"""SELECT {', '.join('p.' + c for c in EXPORT_COLUMNS)}
            FROM pairs p JOIN decisions d USING (run_id, pair_id)
            WHERE p.run_id = ? AND d.reason = ? ORDER BY p.pair_id""", [run_id, DecisionReason.HELDOUT.value],
        read_only=False)


# -- export ------------------------------------------------------------------------------------


def kept_order(catalog: Catalog, run_id: str, stage: int | None = None) -> pl.DataFrame:
    """pair_id, stage and stage_position of the kept pairs (all stages, or one), in teaching order."""
    return catalog.query(
        """SELECT pair_id, stage, stage_position FROM decisions
           WHERE run_id = ? AND kept AND (CAST(? AS INTEGER) IS NULL OR stage = ?)
           ORDER BY stage, stage_position""", [run_id, stage, stage], read_only=False)


EXPORT_CURATION_COLUMNS = ("pair_id", "stage", "stage_position", "source", "source_row", "score_chosen",
                           "score_rejected", "margin", "margin_source", "weight", "chosen_tokens", "rejected_tokens",
                           "token_edit_distance", "token_edit_norm", "length_gap", "ref_chosen_logps",
                           "ref_rejected_logps")


def kept_curation_columns(catalog: Catalog, run_id: str) -> pl.DataFrame:
    """Per kept pair, what curation knows of it (EXPORT_CURATION_COLUMNS), keyed by pair_id."""
    return catalog.query(
        """SELECT d.pair_id, d.stage, d.stage_position, p.source, p.source_row, p.score_chosen, p.score_rejected,
                  s.margin, s.margin_source, d.weight, s.chosen_tokens, s.rejected_tokens, s.token_edit_distance,
                  s.token_edit_norm, s.length_gap, s.ref_chosen_logps, s.ref_rejected_logps
           FROM decisions d JOIN pairs p USING (run_id, pair_id) LEFT JOIN scores s USING (run_id, pair_id)
           WHERE d.run_id = ? AND d.kept""", [run_id], read_only=False)


# -- decisions and the report -------------------------------------------------------------------


def why_example(run_id: str) -> str:
    """The "why was this pair dropped" query as a user types it into `winnow query` (for reports)."""
    return (f"SELECT kept, reason, detail, weight, stage FROM decisions WHERE run_id = {sql_literal(run_id)} "
            "AND pair_id LIKE '<prefix>%';")


def screen_examples(run_id: str) -> list[str]:
    """The queries listing a run's near-duplicate clusters and contamination hits (for reports)."""
    return [f"SELECT * FROM clusters WHERE run_id = '{run_id}' ORDER BY size DESC, cluster_id;",
            f"SELECT * FROM contamination WHERE run_id = '{run_id}' ORDER BY benchmark, pair_id;"]


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
                                 s.token_edit_norm, s.length_gap, s.prompt_tokens, s.chosen_tokens, s.rejected_tokens
                          FROM decisions d LEFT JOIN scores s USING (run_id, pair_id) WHERE d.run_id = ?"""),
            "stages": q("SELECT * FROM stages WHERE run_id = ? ORDER BY stage"),
            "shards": q("SELECT * FROM shards WHERE run_id = ? ORDER BY stage"),
            "advice": q("SELECT * FROM advice WHERE run_id = ?"),
            "by_reason": q("""SELECT reason, stage, count(*) AS pairs FROM decisions WHERE run_id = ?
                              GROUP BY reason, stage ORDER BY (reason = 'kept') DESC, stage, pairs DESC, reason"""),
            "rounds": q(ROUND_SUMMARY_SQL),  # online curation rounds, if training ran them
        }


def drop_examples(catalog: Catalog, run_id: str, per_reason: int = 3) -> pl.DataFrame:
    """A few dropped pairs per decision reason, with texts, margin, weight and the decision's detail.

    Held-out pairs are not dropped (evaluation uses them): they are left out.

    The most telling first: lowest beta weight (the farthest outliers), then the largest
    absolute margin, then pair_id (deterministic).
    """
    return catalog.query(
        """SELECT d.reason, d.pair_id, d.detail, d.weight, s.margin, p.prompt, p.chosen, p.rejected,
                  count(*) OVER (PARTITION BY d.reason) AS reason_pairs
           FROM decisions d JOIN pairs p USING (run_id, pair_id) LEFT JOIN scores s USING (run_id, pair_id)
           WHERE d.run_id = ? AND NOT d.kept AND d.reason != ?
           QUALIFY row_number() OVER (PARTITION BY d.reason
                                      ORDER BY d.weight ASC NULLS LAST, abs(s.margin) DESC NULLS LAST, d.pair_id) <= ?
           ORDER BY reason_pairs DESC, d.reason, d.weight ASC NULLS LAST, abs(s.margin) DESC NULLS LAST, d.pair_id""",
        [run_id, DecisionReason.HELDOUT.value, per_reason], read_only=False)


def train_curves(catalog: Catalog, run_id: str) -> pl.DataFrame:
    """Every logged training step of the run (train_metrics), by stage and step."""
    return catalog.query("SELECT * EXCLUDE (run_id) FROM train_metrics WHERE run_id = ? ORDER BY stage, step",
                         [run_id], read_only=False)


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


# -- near-duplicates and contamination (curation/screen.py) -----------------------------------------------


SCAN_SIDES = ("prompt", "chosen", "rejected")
SCAN_MEMORY = "256MB"  # DuckDB's cap during the scan session (the texts stream; temporary tables spill)


class PairTextScan:
    """One connection over a run's pair texts for the near-duplicate and contamination step.

    On entry it numbers the run's pairs in first-seen order (``idx``: by source, source_row) in a
    temporary table, marking the pairs in `excluded` (rule drops) as not clusterable. Then:
    :meth:`batches` streams every pair's texts (DuckDB streams the join, memory holds one batch),
    :meth:`load_nodes` copies the texts of the pairs that met in an LSH bucket into a temporary
    table and :meth:`edge_texts` streams both ends of edges from it. Temporary tables die with the
    connection; nothing is written to the catalog.
    """

    def __init__(self, catalog: Catalog, run_id: str, excluded: pl.Series | None = None) -> None:
        self.catalog, self.run_id = catalog, run_id
        self._excluded = pl.DataFrame({"pair_id": excluded if excluded is not None else pl.Series([], dtype=pl.String)})
        self._stack: Any = None
        self._sides: tuple[str, ...] = ()
        self._keep_order = ""

    def __enter__(self) -> PairTextScan:
        from contextlib import ExitStack

        self._stack = ExitStack()
        self.con = self._stack.enter_context(self.catalog.connect())
        self._stack.enter_context(bounded_memory(self.con))  # restores the memory limit on exit
        # Memory flat in the number of pairs: DuckDB caches the pages of `pairs` it scans (capped here)
        self.con.execute(f"SET memory_limit = '{SCAN_MEMORY}'")
        known = {r[0] for r in self.con.execute("SELECT name FROM duckdb_optimizers()").fetchall()}
        self._keep_order = ",".join(o for o in ("join_order", "build_side_probe_side") if o in known)
        self.con.register("_scan_excluded_view", self._excluded.to_arrow())
        self.con.execute("CREATE OR REPLACE TEMP TABLE _scan_excluded AS SELECT DISTINCT pair_id FROM _scan_excluded_view")
        self.con.unregister("_scan_excluded_view")
        with self._written_order():
            self.con.execute(
                """CREATE OR REPLACE TEMP TABLE _scan_ids AS
                   SELECT (row_number() OVER (ORDER BY p.source, p.source_row, p.pair_id) - 1)::BIGINT AS idx,
                          p.pair_id, x.pair_id IS NULL AS clusterable
                   FROM pairs p LEFT JOIN _scan_excluded x USING (pair_id) WHERE p.run_id = ?""", [self.run_id])
        self.pairs, self.clusterable = (int(v or 0) for v in self.con.execute(
            "SELECT count(*), sum(clusterable::INT) FROM _scan_ids").fetchall()[0])
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @contextmanager
    def _written_order(self) -> Iterator[None]:
        """Joins of `pairs` with a small table keep the written order, building on the small table.

        DuckDB's optimiser, misjudging the run filter, would build the hash table on the texts of
        `pairs` (all of them in memory) instead of on the ids it joins them to.
        """
        self.con.execute(f"SET disabled_optimizers = '{self._keep_order}'")  # DuckDB's own names
        try:
            yield
        finally:
            self.con.execute("RESET disabled_optimizers")

    def batches(self, rows: int) -> Iterator[pa.RecordBatch]:
        """idx, clusterable, prompt, chosen, rejected of every pair of the run, `rows` at a time (any order)."""
        with self._written_order():
            yield from stream_arrow(self.con, """SELECT i.idx, i.clusterable, p.prompt, p.chosen, p.rejected
                                                 FROM pairs p JOIN _scan_ids i USING (pair_id) WHERE p.run_id = ?""",
                                    [self.run_id], rows)

    def _register_idx(self, name: str, idx: Any) -> None:
        self.con.register(f"{name}_view", pa.table({"idx": pa.array(idx, pa.int64())}))
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT DISTINCT idx FROM {name}_view")
        self.con.unregister(f"{name}_view")

    def load_nodes(self, idx: Any, sides: tuple[str, ...] = SCAN_SIDES) -> None:
        """Copy the normalised `sides` of pairs `idx` into a temporary table for :meth:`edge_texts`.

        Normalised as :func:`curation.shingles.normalise` does (lower case, runs of punctuation,
        symbols and whitespace to one space, trimmed), once per pair rather than once per edge.
        """
        from curation.shingles import SEPARATORS

        if not sides or not set(sides) <= set(SCAN_SIDES):
            raise ValueError(f"sides must be among {SCAN_SIDES}, got {sides}")
        self._register_idx("_scan_node_list", idx)
        columns = ", ".join(f"trim(regexp_replace(lower(coalesce(p.{side}, '')), ?, ' ', 'g')) AS {side}"
                            for side in sides)
        with self._written_order():
            self.con.execute(
                f"""CREATE OR REPLACE TEMP TABLE _scan_nodes AS
                    SELECT i.idx, {columns}
                    FROM pairs p JOIN _scan_ids i USING (pair_id) JOIN _scan_node_list n ON n.idx = i.idx
                    WHERE p.run_id = ?""", [*([SEPARATORS] * len(sides)), self.run_id])
        self._sides = sides

    def edge_texts(self, a: Any, b: Any, rows: int) -> Iterator[pa.RecordBatch]:
        """a, b and the loaded sides of both ends (`<side>_a`, `<side>_b`) of edges between loaded nodes."""
        self.con.register("_scan_edges_view", pa.table({"a": pa.array(a, pa.int64()), "b": pa.array(b, pa.int64())}))
        self.con.execute("CREATE OR REPLACE TEMP TABLE _scan_edges AS SELECT * FROM _scan_edges_view")
        self.con.unregister("_scan_edges_view")
        columns = ", ".join(f"{end}.{side} AS {side}_{tag}" for end, tag in (("x", "a"), ("y", "b")) for side in self._sides)
        yield from stream_arrow(self.con, f"""
            SELECT e.a, e.b, {columns}
            FROM _scan_edges e JOIN _scan_nodes x ON x.idx = e.a JOIN _scan_nodes y ON y.idx = e.b""", None, rows)

    def pair_ids(self, idx: Any) -> pl.DataFrame:
        """idx, pair_id of the given pairs."""
        self._register_idx("_scan_wanted", idx)
        return fetch_polars(self.con, "SELECT i.idx, i.pair_id FROM _scan_ids i JOIN _scan_wanted w USING (idx)")

    def margins(self, idx: Any) -> pl.DataFrame:
        """idx, margin of the given pairs that are scored."""
        self._register_idx("_scan_wanted", idx)
        return fetch_polars(self.con, """SELECT t.idx, s.margin FROM scores s
                                         JOIN (SELECT i.idx, i.pair_id FROM _scan_ids i JOIN _scan_wanted w USING (idx)) t
                                         ON s.pair_id = t.pair_id WHERE s.run_id = ?""", [self.run_id])


def near_duplicate_clusters(catalog: Catalog, run_id: str) -> pl.DataFrame:
    """Every member of the run's near-duplicate clusters with its decision, largest clusters first."""
    return catalog.query(
        """SELECT c.cluster_id, c.size, c.pair_id, c.representative, c.duplicate_of, c.prompt_similarity,
                  c.response_similarity, c.orientation, c.contradiction, d.kept, d.reason
           FROM clusters c LEFT JOIN decisions d USING (run_id, pair_id)
           WHERE c.run_id = ? ORDER BY c.size DESC, c.cluster_id, c.representative DESC, c.pair_id""",
        [run_id], read_only=False)


def cluster_size_counts(catalog: Catalog, run_id: str) -> pl.DataFrame:
    """size, clusters, pairs, contradiction clusters: the cluster-size histogram of a run."""
    return catalog.query(
        """SELECT size, count(DISTINCT cluster_id) AS clusters, count(*) AS pairs,
                  count(DISTINCT cluster_id) FILTER (WHERE contradiction) AS contradictions
           FROM clusters WHERE run_id = ? GROUP BY size ORDER BY size""", [run_id], read_only=False)


def contamination_by_benchmark(catalog: Catalog, run_id: str) -> pl.DataFrame:
    """benchmark, pairs hit, hits by pair field, benchmark rows hit, and an example span."""
    return catalog.query(
        """SELECT benchmark, count(DISTINCT pair_id) AS pairs,
                  count(*) FILTER (WHERE field = 'prompt') AS prompt, count(*) FILTER (WHERE field = 'chosen') AS chosen,
                  count(*) FILTER (WHERE field = 'rejected') AS rejected,
                  count(DISTINCT benchmark_row) AS benchmark_rows, min(span) AS example_span
           FROM contamination WHERE run_id = ? GROUP BY benchmark ORDER BY pairs DESC, benchmark""",
        [run_id], read_only=False)


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
