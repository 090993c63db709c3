"""Ingestion: read sources, normalise to the pair schema, quarantine what cannot be a pair.

Accounting, per source. Every input row (a line, an array element, a CSV record, a Parquet or
hub row) either makes no candidate pair, and then has exactly one quarantine row saying why
(malformed_json, missing_field, tie, ...), or makes n >= 1 candidate pairs (n > 1 only for
multi-response shapes, e.g. openbmb/UltraFeedback under best-vs-rest). Each candidate is then
kept (a `pairs` row, numbered by `pair_index` within its row) or quarantined (one quarantine
row: empty_text, identical_sides, too_large, duplicate, contradiction). So, per source:

    rows_read   == rows_paired + rows_quarantined
    candidates  == pairs + (quarantined - rows_rejected)

where rows_paired counts rows with at least one kept pair, rows_quarantined rows with none
(each has one or more quarantine rows), rows_rejected rows that made no candidate, and
quarantined all quarantine rows. A row that makes one pair (every single-pair shape) keeps
the plain form, rows_read == pairs + quarantined. How many pairs a row made is
`count(*) ... GROUP BY source, source_row` over `pairs`; both identities are checked at the
end of every ingest (a failure is a bug in Winnow, never the user's data).

Rows stream through a staging table inside one catalog transaction; duplicates and
contradictions are resolved by SQL over the whole run at the end, so memory holds one
batch, not the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import duckdb
import polars as pl

from curation.config_fields import setting
from curation.errors import NoValidPairsError, TooManyBadRowsError, WinnowError
from curation.ingest.mapping import apply_columns, parse_columns
from curation.ingest.multi_response import Pairing, PairingOptions, PreferenceLabel, Rating
from curation.ingest.normalise import Layout, detect_layout, normalise_batch
from curation.ingest.readers import RawBatch, read_source
from curation.ingest.shapes import BY_NAME, Format
from curation.ingest.sources import Source, resolve_sources
from curation.ingest.validate import pair_keys, validate_rows
from curation.progress import progress_bar
from curation.schema import QUARANTINE_SCHEMA, Reason
from curation.store import Catalog, bounded_memory, fetch_arrow

__all__ = ["IngestOptions", "IngestResult", "ingest", "make_run_id", "resolve_sources"]


@dataclass(frozen=True)
class IngestOptions:
    """How sources are read and when a run refuses them."""

    format: Format = setting(Format.AUTO, help="Input shape (docs/datasets.md); detected per source when auto; "
                                               "scored: detect it and require ratings.")
    columns: dict[str, str] = setting(default_factory=dict, help="Read columns under other names, target=column "
                                      "(e.g. prompt=question,system=system); targets: prompt, chosen, rejected, "
                                      "system, score_chosen, score_rejected, tools, responses, ratings.")
    pairing: Pairing = setting(Pairing.BEST_VS_WORST, help="Multi-response rows to pairs: best-vs-worst, "
                                                           "best-vs-rest or all-pairs.")
    rating: Rating = setting(Rating.OVERALL, help="Which rating ranks openbmb/UltraFeedback completions: overall, "
                                                  "fine-grained, or one aspect (helpfulness, honesty, "
                                                  "instruction_following, truthfulness).")
    min_rating_gap: float = setting(0.0, help="Multi-response rows: pair two responses only when their ratings "
                                              "differ by at least this much (ties never pair).")
    preference_label: PreferenceLabel = setting(PreferenceLabel.BETTER, help="PKU-SafeRLHF: orient pairs by "
                                                "better_response_id (better) or safer_response_id (safer).")
    batch_size: int = setting(5000, help="Rows per streamed batch (memory holds one batch).")
    max_bytes: int = setting(200_000, help="Quarantine rows whose texts exceed this many bytes (protects memory "
                                           "and the tokenizer).")
    max_bad_fraction: float = setting(0.5, help="Fail the run when a larger share of rows is quarantined.")

    def __post_init__(self) -> None:
        """Refuse values that would silently disable a check (NaN compares false with everything) in one line."""
        import math

        from curation.errors import WinnowError

        try:
            object.__setattr__(self, "format", Format(self.format))
        except ValueError:
            raise WinnowError(f"unknown ingest format {self.format!r}; choose one of "
                              f"{', '.join(f.value for f in Format)}") from None
        for name in ("batch_size", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                where = " (--max-bytes, ingest.max_bytes)" if name == "max_bytes" else f" (ingest.{name})"
                raise WinnowError(f"{name}{where} must be a whole number >= 1, got {value!r}")
        fraction = self.max_bad_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not (
            math.isfinite(fraction) and 0.0 <= fraction <= 1.0
        ):
            raise WinnowError(f"max_bad_fraction (--max-bad-fraction, ingest.max_bad_fraction) must be a number "
                              f"in [0, 1], got {fraction!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}

    def pairing_options(self) -> PairingOptions:
        """What the shapes' pair makers read; a bad column mapping or gap fails here, in one line."""
        parse_columns(self.columns)
        if not self.min_rating_gap >= 0:
            raise WinnowError(f"ingest.min_rating_gap must be >= 0, got {self.min_rating_gap}")
        return PairingOptions(Pairing(self.pairing), float(self.min_rating_gap), Rating(self.rating),
                              PreferenceLabel(self.preference_label))


@dataclass
class _Counts:
    rows_read: int = 0
    rows_rejected: int = 0  # rows that made no candidate pair
    candidates: int = 0


_NO_RECORDS = Layout(BY_NAME["explicit"], False)  # a batch of reader rejects only, before any record was seen


@dataclass
class IngestResult:
    run_id: str
    # one row per source: shape, rows_read, pairs, quarantined, rows_paired, rows_quarantined, candidates,
    # rows_rejected (the module docstring states how they add up)
    accounting: pl.DataFrame
    reasons: pl.DataFrame  # source, reason, rows
    layouts: dict[str, str] = field(default_factory=dict)  # source -> shape label

    @property
    def pairs(self) -> int:
        return int(self.accounting["pairs"].sum())

    @property
    def quarantined(self) -> int:
        return int(self.accounting["quarantined"].sum())

    @property
    def rows_read(self) -> int:
        return int(self.accounting["rows_read"].sum())

    @property
    def rows_quarantined(self) -> int:
        """Rows that gave no pair (the quarantined share of the input)."""
        return int(self.accounting["rows_quarantined"].sum())

    @property
    def rows_paired(self) -> int:
        return int(self.accounting["rows_paired"].sum())


def make_run_id(sources: list[Source], config: dict[str, Any]) -> str:
    """Same inputs and settings -> same run id, so a re-run replaces instead of duplicating."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for source in sources:
        digest.update(source.fingerprint().encode())
    return f"run-{digest.hexdigest()[:12]}"


_STAGING = """
CREATE OR REPLACE TEMP TABLE staged (
    src_order INTEGER, source VARCHAR, source_row BIGINT, prompt VARCHAR, chosen VARCHAR, rejected VARCHAR,
    prompt_messages VARCHAR, chosen_messages VARCHAR, rejected_messages VARCHAR,
    score_chosen DOUBLE, score_rejected DOUBLE, tools VARCHAR, pairing VARCHAR, pair_index INTEGER,
    format VARCHAR, pair_id VARCHAR, unordered_key VARCHAR, is_dropped BOOLEAN
);
CREATE OR REPLACE TEMP TABLE staged_quarantine (
    src_order INTEGER, source VARCHAR, source_row BIGINT, pair_index INTEGER, reason VARCHAR, detail VARCHAR,
    raw VARCHAR
);
"""

# Column order of the staging tables: batches are appended by position.
_STAGED_COLUMNS = (
    "src_order", "source", "source_row", "prompt", "chosen", "rejected", "prompt_messages", "chosen_messages",
    "rejected_messages", "score_chosen", "score_rejected", "tools", "pairing", "pair_index", "format", "pair_id",
    "unordered_key", "is_dropped",
)
_STAGED_QUARANTINE_COLUMNS = ("src_order", "source", "source_row", "pair_index", "reason", "detail", "raw")


def _append(con: duckdb.DuckDBPyConnection, table: str, frame: pl.DataFrame) -> None:
    """Append a batch to a staging table through a relation, not `con.register`.

    A registered view dropped inside an open transaction stays in DuckDB's catalog, with the
    Arrow batch it holds, until the transaction ends: registering each batch kept a copy of
    the whole input in memory.
    """
    con.from_arrow(frame.to_arrow()).insert_into(table)


# Duplicates and contradictions are found on the key columns only, and only the rows to drop
# are kept (with what their quarantine row says); texts stay in `staged` until the writes.
_RESOLVE = """
CREATE OR REPLACE TEMP TABLE contradicted AS
    SELECT unordered_key FROM staged GROUP BY unordered_key HAVING count(DISTINCT pair_id) > 1;
CREATE OR REPLACE TEMP TABLE dropped AS
WITH repeated AS (SELECT pair_id FROM staged GROUP BY pair_id HAVING count(*) > 1),
candidates AS (
    SELECT src_order, source, source_row, pair_index, pair_id, unordered_key FROM staged
    WHERE pair_id IN (SELECT pair_id FROM repeated) OR unordered_key IN (SELECT unordered_key FROM contradicted)
),
ranked AS (
    SELECT src_order, source_row, pair_index,
        unordered_key IN (SELECT unordered_key FROM contradicted) AS is_contradiction,
        row_number() OVER w AS copy_no,
        first_value(source || ':' || source_row || CASE WHEN pair_index > 0 THEN '#' || pair_index ELSE '' END)
            OVER w AS first_seen
    FROM candidates
    WINDOW w AS (PARTITION BY pair_id ORDER BY src_order, source_row, pair_index)
)
SELECT src_order, source_row, pair_index, is_contradiction, first_seen FROM ranked
WHERE is_contradiction OR copy_no > 1;
UPDATE staged SET is_dropped = true FROM dropped d
WHERE staged.src_order = d.src_order AND staged.source_row = d.source_row AND staged.pair_index = d.pair_index;
"""

_FRAME_TYPES = {"score_chosen": pl.Float64, "score_rejected": pl.Float64, "pair_index": pl.Int32}


def _stage_batch(
    con: duckdb.DuckDBPyConnection, raw: RawBatch, layout: Layout, pairing: PairingOptions, order: int, label: str,
    max_bytes: int,
) -> tuple[int, int]:
    """Stage one batch; returns (rows that made no candidate, candidates made)."""
    normalised, rejects = normalise_batch(raw, layout, pairing)
    frame = pl.DataFrame(normalised.frame_columns(), schema_overrides=_FRAME_TYPES)
    frame = frame.with_columns(
        *(pl.col(c).cast(pl.String) for c in ("prompt_messages", "chosen_messages", "rejected_messages", "tools",
                                              "pairing"))
    )
    good, bad = validate_rows(frame, max_bytes) if frame.height else (frame, pl.DataFrame())
    if good.height:
        pair_ids, unordered = pair_keys(good)
        good = good.with_columns(
            src_order=pl.lit(order), source=pl.lit(label), format=pl.lit(layout.label),
            pair_id=pl.Series(pair_ids, dtype=pl.String), unordered_key=pl.Series(unordered, dtype=pl.String),
            is_dropped=pl.lit(False),
        )
        _append(con, "staged", good.select(_STAGED_COLUMNS))
    quarantine = pl.DataFrame(rejects.rejects, schema={k: v for k, v in QUARANTINE_SCHEMA.items() if k != "source"})
    quarantine = quarantine.with_columns(pair_index=pl.lit(-1, pl.Int32))  # -1: the row itself, not one of its pairs
    if bad.height:
        quarantine = pl.concat([quarantine, bad.select(quarantine.columns)], how="vertical_relaxed")
    if quarantine.height:
        quarantine = quarantine.with_columns(src_order=pl.lit(order), source=pl.lit(label))
        _append(con, "staged_quarantine", quarantine.select(_STAGED_QUARANTINE_COLUMNS))
    return len(rejects.rejects), len(normalised)


def ingest(
    specs: list[str],
    catalog: Catalog,
    options: IngestOptions | None = None,
    run_id: str | None = None,
    progress: bool = True,
) -> IngestResult:
    options = options or IngestOptions()
    pairing = options.pairing_options()
    columns = parse_columns(options.columns)
    sources = resolve_sources(specs)
    run_id = run_id or make_run_id(sources, {"ingest": options.to_dict()})
    layouts: dict[str, str] = {}
    counts: dict[str, _Counts] = {}
    with catalog.transaction() as con, bounded_memory(con):
        con.execute(_STAGING)
        for order, source in enumerate(sources):
            layout: Layout | None = None
            count = counts[source.label] = _Counts()
            with progress_bar(desc=f"ingest {source.label}", unit="rows", enabled=progress) as bar:
                for raw in read_source(source, options.batch_size, options.max_bytes):
                    raw = apply_columns(raw, columns)
                    if layout is None and raw.records:
                        layout = detect_layout([r for _, r in raw.records], Format(options.format), source.label)
                        layouts[source.label] = layout.label
                    count.rows_read += len(raw)
                    rejected, candidates = _stage_batch(con, raw, layout or _NO_RECORDS, pairing, order, source.label,
                                                        options.max_bytes)
                    count.rows_rejected += rejected
                    count.candidates += candidates
                    bar.update(len(raw))
        con.execute(_RESOLVE)
        accounting, reasons = _write(con, catalog, run_id, sources, counts, layouts)
        result = IngestResult(run_id, accounting, reasons, layouts)
        error = _check_thresholds(result, options)
        catalog.upsert_run(
            run_id,
            con,
            status="failed" if error else "ingested",
            stage="ingest",
            config={"ingest": options.to_dict()},
            sources=[{"source": s.label, "kind": s.kind, "shape": layouts.get(s.label), "format": layouts.get(s.label),
                      **({"columns": columns} if columns else {})} for s in sources],
            accounting={"ingest": result.accounting.to_dicts()},
            versions=_versions(),
            error=str(error) if error else None,
        )
        if error:
            con.execute("DELETE FROM pairs WHERE run_id = ?", [run_id])
    if error:
        raise error
    return result


def _write(
    con: duckdb.DuckDBPyConnection, catalog: Catalog, run_id: str, sources: list[Source], counts: dict[str, _Counts],
    layouts: dict[str, str],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Replace the run's `pairs` and `quarantine` rows inside DuckDB (no copy of the texts through Python).

    `staged` holds the rows in source order (src_order, source_row, pair_index), and a filtered
    scan keeps DuckDB's insertion order, so the pairs need no sort (sorting 1M texts spilled and
    took 100 s).
    """
    con.execute("DELETE FROM pairs WHERE run_id = ?", [run_id])
    con.execute(
        """INSERT INTO pairs (run_id, pair_id, prompt, chosen, rejected, prompt_messages, chosen_messages,
                              rejected_messages, tools, score_chosen, score_rejected, source, source_row,
                              pair_index, format, pairing)
           SELECT ?, pair_id, prompt, chosen, rejected, prompt_messages, chosen_messages,
                  rejected_messages, tools, score_chosen, score_rejected, source, source_row,
                  pair_index, format, pairing
           FROM staged WHERE NOT is_dropped""",
        [run_id],
    )
    con.execute("DELETE FROM quarantine WHERE run_id = ?", [run_id])
    con.execute(
        f"""INSERT INTO quarantine (run_id, source, source_row, reason, detail, raw)
            SELECT ?, source, source_row, reason, detail, raw FROM (
              SELECT src_order, source, source_row, pair_index, reason, detail, raw FROM staged_quarantine
              UNION ALL
              SELECT s.src_order, s.source, s.source_row, s.pair_index,
                     CASE WHEN d.is_contradiction THEN '{Reason.CONTRADICTION.value}' ELSE '{Reason.DUPLICATE.value}' END,
                     CASE WHEN d.is_contradiction THEN 'the same prompt holds this pair in both orientations'
                          ELSE 'exact copy of ' || d.first_seen END,
                     left(s.prompt || ' | ' || s.chosen || ' | ' || s.rejected, 300)
              FROM staged s JOIN dropped d
                ON s.src_order = d.src_order AND s.source_row = d.source_row AND s.pair_index = d.pair_index
            ) ORDER BY src_order, source_row, pair_index""",
        [run_id],
    )
    pair_counts = pl.from_arrow(fetch_arrow(
        con, """SELECT source, count(*) AS pairs, count(DISTINCT source_row) AS rows_paired
                FROM pairs WHERE run_id = ? GROUP BY source""", [run_id]))
    quarantine_frame = pl.from_arrow(
        fetch_arrow(con, "SELECT source, reason, count(*) AS rows FROM quarantine WHERE run_id = ? GROUP BY ALL",
                    [run_id])
    ).with_columns(pl.col("rows").cast(pl.UInt32))
    # Rows with no kept pair: their quarantine rows, counted once per row.
    unpaired = pl.from_arrow(fetch_arrow(
        con, """SELECT q.source, count(DISTINCT q.source_row) AS rows_quarantined FROM quarantine q
                WHERE q.run_id = ? AND NOT EXISTS (
                    SELECT 1 FROM pairs p WHERE p.run_id = q.run_id AND p.source = q.source AND p.source_row = q.source_row)
                GROUP BY q.source""", [run_id]))
    quarantine_counts = quarantine_frame.group_by("source").agg(quarantined=pl.col("rows").sum())
    reasons = quarantine_frame.sort("source", "reason")
    labels = list(counts)
    accounting = (
        pl.DataFrame({
            "source": labels,
            "shape": [layouts.get(s) for s in labels],
            "rows_read": [counts[s].rows_read for s in labels],
        }, schema_overrides={"shape": pl.String})
        .join(pair_counts, on="source", how="left")
        .join(quarantine_counts, on="source", how="left")
        .join(unpaired, on="source", how="left")
        .with_columns(candidates=pl.Series([counts[s].candidates for s in labels]),
                      rows_rejected=pl.Series([counts[s].rows_rejected for s in labels]))
        .with_columns(pl.col("pairs", "quarantined", "rows_paired", "rows_quarantined", "candidates",
                             "rows_rejected").fill_null(0).cast(pl.Int64))
        .select("source", "shape", "rows_read", "pairs", "quarantined", "rows_paired", "rows_quarantined",
                "candidates", "rows_rejected")
    )
    broken = accounting.filter(
        (pl.col("rows_read") != pl.col("rows_paired") + pl.col("rows_quarantined"))
        | (pl.col("candidates") != pl.col("pairs") + pl.col("quarantined") - pl.col("rows_rejected"))
    )
    if broken.height:  # a bug in Winnow, never the user's data: fail loudly
        raise AssertionError(f"accounting broken: {broken.to_dicts()}")
    return accounting, reasons


def _check_thresholds(result: IngestResult, options: IngestOptions) -> Exception | None:
    if result.pairs == 0:
        return NoValidPairsError(
            f"no valid pairs in {result.rows_read} rows read ({result.rows_quarantined} quarantined); "
            f"see `winnow query \"SELECT reason, count(*) FROM quarantine WHERE run_id = '{result.run_id}' GROUP BY 1\"`"
        )
    share = result.rows_quarantined / max(result.rows_read, 1)
    if share > options.max_bad_fraction:
        return TooManyBadRowsError(
            f"{share:.0%} of rows quarantined, above --max-bad-fraction={options.max_bad_fraction}; "
            f"run {result.run_id} kept its quarantine rows for inspection"
        )
    return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("winnow", "polars", "duckdb", "rapidfuzz", "torch", "transformers", "trl", "prefect"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
