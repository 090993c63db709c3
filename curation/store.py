"""The DuckDB catalog: one file per workspace, every per-pair number queryable by users.

Every table carries `run_id`. Writers replace a run's rows inside one transaction, so a
crash leaves the previous state and a re-run never duplicates rows.

Read-only connections are the users' (``winnow query``): DuckDB runs them with external access
off and its configuration locked (:data:`USER_SQL_CONFIG`), so SQL reads this catalog and
nothing else. DuckDB lets one process write a file at a time, and a reader cannot open it
while a writer holds it: both wait, bounded (``WINNOW_CATALOG_WAIT``), then fail in one line.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from curation.env import environment
from curation.errors import WinnowError
from curation.paths import check_run_id
from curation.tables import TABLES, column_types, table_columns

DEFAULT_WORKDIR = Path("runs")
CATALOG_NAME = "catalog.duckdb"

# Columns of each table: curation/tables.py (later stages add their tables there, never elsewhere).


# A user's SQL reads the catalog and nothing else: no files, no network, no extensions, and no
# SET/PRAGMA/RESET can turn any of it back on (the configuration is locked once opened).
USER_SQL_CONFIG: dict[str, Any] = {
    "enable_external_access": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    "lock_configuration": True,
}


class CatalogBusyError(WinnowError):
    """Another process held the catalog for longer than WINNOW_CATALOG_WAIT (a transient condition)."""


def sql_literal(value: str) -> str:
    """The one quoting helper: a string as a SQL literal, for the rare text that cannot be a bound
    parameter (a query shown to the user to copy). Executed SQL binds its values instead."""
    return "'" + str(value).replace("'", "''") + "'"


def catalog_path(workdir: Path | str) -> Path:
    return Path(workdir) / CATALOG_NAME


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Catalog:
    """A thin handle on the catalog file; opens short-lived connections per operation.

    Short connections matter: DuckDB allows one writing process per file, and Prefect
    tasks or a user's notebook may want the file between two steps.
    """

    def __init__(self, workdir: Path | str = DEFAULT_WORKDIR, tables: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.path = catalog_path(self.workdir)
        self._tables = tables or TABLES

    # -- connections ---------------------------------------------------------------
    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; read-only ones are sandboxed (:data:`USER_SQL_CONFIG`)."""
        if read_only:
            if not self.path.is_file():
                raise WinnowError(f"no catalog at {self.path}: run `winnow ingest` first (or pass --workdir)")
            con = open_catalog(self.path, read_only=True)
        else:
            self.workdir.mkdir(parents=True, exist_ok=True)
            con = open_catalog(self.path)
            try:
                self._ensure_schema(con)
            except BaseException:
                con.close()
                raise
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """All writes inside commit together or not at all.

        On an error the rollback is attempted and the original error is what propagates: a
        failed rollback (the connection already broken) never replaces it.
        """
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error:
                    pass  # closing the connection discards the transaction anyway
                raise
            con.execute("COMMIT")

    def _ensure_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        """Create missing tables, and add the columns a newer Winnow declares to a workspace's older tables."""
        for name, columns in self._tables.items():
            con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")
        present = {(t, c) for t, c in con.execute(
            "SELECT table_name, column_name FROM duckdb_columns() WHERE schema_name = 'main' AND NOT internal").fetchall()}
        for name, columns in self._tables.items():
            for column, kind in column_types(columns):
                if (name, column) not in present:
                    con.execute(f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {column} {kind}")

    # -- writes --------------------------------------------------------------------
    def replace_slice(self, con: duckdb.DuckDBPyConnection, table: str, frame: pl.DataFrame | pa.Table,
                      **keys: Any) -> int:
        """Replace the rows of `table` matching `keys` (``run_id=..., stage=...``) with `frame`.

        The one writer of the catalog: every step deletes its own slice and inserts the new rows
        inside the caller's transaction, so a re-run replaces instead of duplicating. Key values
        are bound parameters and are also written into `frame` (a caller need not add them);
        table and column names come from :data:`TABLES`, never from user input.
        """
        if table not in self._tables:
            raise ValueError(f"unknown catalog table {table!r}")
        if not keys:
            raise ValueError("replace_slice needs at least one key (run_id=...)")
        columns = table_columns(self._tables[table])
        unknown = [k for k in keys if k not in columns]
        if unknown:
            raise ValueError(f"{table} has no column(s) {unknown}")
        where = " AND ".join(f'"{k}" = ?' for k in keys)
        con.execute(f"DELETE FROM {table} WHERE {where}", list(keys.values()))
        arrow = frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame
        if arrow.num_rows == 0:
            return 0
        for key, value in keys.items():
            if key in arrow.column_names:
                arrow = arrow.drop_columns([key])
            arrow = arrow.append_column(key, pa.array([value] * arrow.num_rows))
        names = [c for c in arrow.column_names if c in columns]
        extra = sorted(set(arrow.column_names) - set(columns))
        if extra:
            raise ValueError(f"{table} has no column(s) {extra}")
        cols = ", ".join(f'"{c}"' for c in names)
        # A relation, not `con.register`: a view registered inside an open transaction keeps its
        # Arrow data alive until the transaction ends.
        con.from_arrow(arrow.select(names)).query("_incoming", f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _incoming")
        return arrow.num_rows

    def replace_slice_from_parquet(self, con: duckdb.DuckDBPyConnection, table: str, files: list[str],
                                   columns: tuple[str, ...] | None = None, **keys: Any) -> int:
        """:meth:`replace_slice` for rows already on disk as parquet: DuckDB reads the files (memory flat).

        A key that is a column of the files filters them (``margin_source="reference"`` loads only
        those rows); any other key is written as a constant. `columns`: the file columns to load
        (default: all of them). Returns the rows inserted.
        """
        if table not in self._tables:
            raise ValueError(f"unknown catalog table {table!r}")
        wanted = table_columns(self._tables[table])
        in_files = [r[0] for r in con.execute("SELECT * FROM read_parquet(?) LIMIT 0", [files]).description]
        missing = sorted(set(columns or ()) - set(in_files))
        if missing:
            raise ValueError(f"the parquet files have no column(s) {missing}")
        file_columns = list(columns) if columns else in_files
        unknown = sorted(set(keys) - set(wanted)) + sorted(set(file_columns) - set(wanted))
        if unknown:
            raise ValueError(f"{table} has no column(s) {unknown}")
        where = " AND ".join(f'"{k}" = ?' for k in keys)
        con.execute(f"DELETE FROM {table} WHERE {where}", list(keys.values()))
        constants = [k for k in keys if k not in in_files]
        file_columns = [c for c in file_columns if c not in constants]
        names = [*constants, *file_columns]
        filters = [k for k in keys if k in in_files]
        select = ", ".join(["?" for _ in constants] + [f'"{c}"' for c in file_columns])
        file_where = (" WHERE " + " AND ".join(f'"{k}" = ?' for k in filters)) if filters else ""
        cols = ", ".join(f'"{c}"' for c in names)
        con.execute(f"INSERT INTO {table} ({cols}) SELECT {select} FROM read_parquet(?){file_where}",
                    [*(keys[k] for k in constants), files, *(keys[k] for k in filters)])
        return int(con.execute(f"SELECT count(*) FROM {table} WHERE {where}", list(keys.values())).fetchone()[0])

    @staticmethod
    def distinct_in_parquet(con: duckdb.DuckDBPyConnection, files: list[str], column: str) -> list[Any]:
        """The distinct values of one column of parquet files (e.g. the margin sources of score parts)."""
        if not column.replace("_", "").isalnum():
            raise ValueError(f"bad column name {column!r}")
        return [r[0] for r in con.execute(f'SELECT DISTINCT "{column}" FROM read_parquet(?) ORDER BY 1', [files]).fetchall()]

    def upsert_run(self, run_id: str, con: duckdb.DuckDBPyConnection | None = None, **fields: Any) -> None:
        """Create or update the `runs` row; dict fields are merged into the stored JSON.

        Every run enters the catalog here, so the run id is checked here (curation.paths).
        """
        check_run_id(run_id)
        if con is None:
            with self.transaction() as c:
                return self.upsert_run(run_id, c, **fields)
        rows = con.execute("SELECT config, timings, sources, accounting FROM runs WHERE run_id = ?", [run_id]).fetchall()
        row = rows[0] if rows else None
        now = _now()
        if row is None:
            con.execute("INSERT INTO runs (run_id, created_at, updated_at) VALUES (?, ?, ?)", [run_id, now, now])
            existing = {"config": {}, "timings": {}, "sources": None, "accounting": {}}
        else:
            existing = {
                "config": json.loads(row[0] or "{}"),
                "timings": json.loads(row[1] or "{}"),
                "sources": json.loads(row[2]) if row[2] else None,
                "accounting": json.loads(row[3] or "{}"),
            }
        columns = table_columns(self._tables["runs"])
        unknown = sorted(set(fields) - set(columns))
        if unknown:  # column names go into the SQL text: only the declared ones
            raise ValueError(f"runs has no column(s) {unknown}")
        sets, values = ["updated_at = ?"], [now]
        for key, value in fields.items():
            if key in ("config", "timings", "accounting") and isinstance(value, dict):
                value = {**existing[key], **value}
            if isinstance(value, dict | list):
                value = json.dumps(value, default=str)
            sets.append(f"{key} = ?")
            values.append(value)
        con.execute(f"UPDATE runs SET {', '.join(sets)} WHERE run_id = ?", [*values, run_id])

    # -- reads ---------------------------------------------------------------------
    def query(self, sql: str, params: list[Any] | None = None, read_only: bool = True) -> pl.DataFrame:
        """SQL to a polars frame. Users' queries go read-only and sandboxed: the catalog, nothing else.

        Library code passes read_only=False: DuckDB refuses a read-only connection while the
        same process holds a read-write one (Prefect tasks in threads do).
        """
        with self.connect(read_only=read_only) as con:
            try:
                return fetch_polars(con, sql, params)
            except duckdb.Error as exc:
                raise WinnowError(_query_error(exc, read_only)) from None

    def run_exists(self, run_id: str) -> bool:
        if not self.path.exists():
            return False
        return bool(self.query("SELECT count(*) AS n FROM runs WHERE run_id = ?", [run_id], read_only=False)["n"][0])


# DuckDB's default memory limit is 80% of RAM, and it keeps the staged run there when it
# can: a 1M-pair ingest grew past 10 GB. With a limit it spills staging, sorts and joins to
# `<catalog>.tmp` instead, so memory stays flat in the number of pairs (the cap: curation.env).


@contextmanager
def bounded_memory(con: duckdb.DuckDBPyConnection, threads: int | None = None) -> Iterator[None]:
    """Cap DuckDB's memory for a bulk step (WINNOW_DUCKDB_MEMORY, default 1GB), then restore it.

    `threads` caps DuckDB's threads as well: a sort of long texts needs a buffer per thread,
    and two threads ran out of a 1GB limit where one sorted 1M pairs fine. Both settings
    belong to the database instance, which other connections of this process may share,
    hence the restore. The values are bound parameters. When the block fails, its error is
    the one that propagates: inside an aborted transaction the restore cannot run, and its
    "transaction is aborted" must not hide the cause.
    """
    limit = environment().duckdb_memory
    previous = con.execute("SELECT current_setting('memory_limit'), current_setting('threads')").fetchall()[0]
    try:
        con.execute("SET memory_limit = ?", [limit])
    except duckdb.Error as exc:
        raise WinnowError(f"WINNOW_DUCKDB_MEMORY={limit!r} is not a memory size DuckDB accepts "
                          f"(e.g. 1GB, 512MB): {str(exc).splitlines()[0]}") from None
    if threads:
        con.execute("SET threads = ?", [int(threads)])
    try:
        yield
    except BaseException:
        try:
            _restore_settings(con, previous)
        except duckdb.Error:
            pass  # the transaction is aborted; the caller's rollback and close end it
        raise
    _restore_settings(con, previous)


def _restore_settings(con: duckdb.DuckDBPyConnection, previous: tuple[Any, Any]) -> None:
    con.execute("SET memory_limit = ?", [str(previous[0])])
    con.execute("SET threads = ?", [int(previous[1])])


def fetch_arrow(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> pa.Table:
    """Arrow out of DuckDB without a row loop (works across DuckDB 1.x and 2.x)."""
    relation = con.sql(sql, params=params or None)
    return relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()


def stream_arrow(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None, rows: int) -> Iterator[pa.RecordBatch]:
    """A query's rows as record batches of `rows`, streamed: memory holds a batch, not the result.

    A relation, not `execute`: DuckDB copies a DB-API result whole before handing it to Arrow.
    """
    relation = con.sql(sql, params=params or None)
    reader = relation.to_arrow_reader(rows) if hasattr(relation, "to_arrow_reader") else relation.fetch_arrow_reader(rows)
    yield from reader


def fetch_polars(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
    return pl.from_arrow(fetch_arrow(con, sql, params))  # type: ignore[return-value]


def open_catalog(path: Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the catalog, waiting (WINNOW_CATALOG_WAIT) while another process holds its lock.

    DuckDB allows one writing process per file, and no reader while it writes; a run holds
    the file for the length of a step. Read-only connections get :data:`USER_SQL_CONFIG`.
    """
    wait = environment().catalog_wait_s
    deadline = time.monotonic() + wait
    delay = 0.05
    config = dict(USER_SQL_CONFIG) if read_only else {}
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config)
        except duckdb.IOException as exc:
            first = str(exc).splitlines()[0]
            if "lock" not in first.lower():
                raise WinnowError(f"cannot open catalog {path}: {first}") from None
            if time.monotonic() >= deadline:
                pid = re.search(r"\(PID (\d+)\)", first)
                holder = f" (PID {pid.group(1)})" if pid else ""
                raise CatalogBusyError(
                    f"catalog {path} is held by another process{holder}, a run writing it; waited {wait:g} s "
                    "(WINNOW_CATALOG_WAIT): try again when it finishes") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        except duckdb.Error as exc:
            raise WinnowError(f"cannot open catalog {path}: {str(exc).splitlines()[0]}") from None


def _query_error(exc: duckdb.Error, sandboxed: bool) -> str:
    """One line for a failed query; for a user's (sandboxed) query, say what was refused and why."""
    first = str(exc).splitlines()[0]
    if sandboxed:
        if isinstance(exc, duckdb.PermissionException):
            return f"refused: `winnow query` reads the catalog only, no other file, network or extension ({first})"
        if "configuration has been locked" in first:
            return f"refused: `winnow query` cannot change DuckDB settings ({first})"
        if "read-only mode" in first or "read-only" in first.lower():
            return f"refused: `winnow query` is read-only ({first})"
    return f"query failed: {first}"
