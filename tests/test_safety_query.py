"""`winnow query` reads the catalog and nothing else; readers wait for a writer, bounded; SQL values are bound.

Each escape an adversarial pass found (COPY TO a path, ATTACH READ_WRITE then DELETE,
read_csv of /etc/passwd, glob of /root, and SET/PRAGMA/RESET trying to turn access back on)
is run through the real CLI entry point: it is refused in one line (exit code 2, no traceback),
nothing is written, and the catalog is unchanged.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from curation.env import override_environment
from curation.errors import WinnowError
from curation.store import Catalog, CatalogBusyError, bounded_memory, sql_literal

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog with two runs of pairs (written the way the library writes them), built once."""
    import polars as pl

    ws = tmp_path_factory.mktemp("built")
    catalog = Catalog(ws)
    frame = pl.DataFrame({"pair_id": ["a", "b"], "prompt": ["p", "q"], "chosen": ["x", "y"], "rejected": ["z", "w"]})
    for run_id in ("run-1", "run-2"):
        with catalog.transaction() as con:
            catalog.replace_slice(con, "pairs", frame, run_id=run_id)
            catalog.upsert_run(run_id, con, status="ingested")
    return catalog.path


@pytest.fixture()
def workdir(built_catalog: Path, tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(built_catalog, ws / built_catalog.name)
    return ws


def pair_count(ws: Path) -> int:
    return Catalog(ws).query("SELECT count(*) FROM pairs", read_only=False).item()


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """flows.cli.main in this process, as `winnow ARGS` runs it: (exit code, stdout, stderr)."""
    from flows.cli import main

    argv = sys.argv
    sys.argv = ["winnow", *args]
    try:
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_refusal(code: int, err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: refused"), err
    assert "Traceback" not in err


def test_query_reads_the_catalog(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["query", "SELECT run_id, count(*) AS n FROM pairs GROUP BY 1 ORDER BY 1", "-w",
                          str(workdir), "--csv"], capsys)
    assert code == 0, err
    assert out.splitlines() == ["run_id,n", "run-1,2", "run-2,2"]


def test_copy_to_a_path_is_refused(workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "stolen.csv"
    code, _, err = cli(["query", f"COPY (SELECT * FROM pairs) TO {sql_literal(str(target))}", "-w", str(workdir)],
                       capsys)
    assert_one_line_refusal(code, err)
    assert not target.exists()


def test_attach_read_write_and_delete_are_refused(workdir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.duckdb"
    code, _, err = cli(["query", f"ATTACH {sql_literal(str(other))} AS o (READ_WRITE); SELECT 1", "-w",
                        str(workdir)], capsys)
    assert_one_line_refusal(code, err)
    assert not other.exists()
    # and the catalog itself, attached read-only, refuses the DELETE
    code, _, err = cli(["query", "DELETE FROM pairs", "-w", str(workdir)], capsys)
    assert_one_line_refusal(code, err)
    assert pair_count(workdir) == 4


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM glob('/root/*')",
    "SELECT * FROM read_text('/etc/hostname')",
    "INSTALL httpfs",
    "LOAD httpfs",
])
def test_files_network_and_extensions_are_refused(workdir: Path, sql: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["query", sql, "-w", str(workdir)], capsys)
    assert_one_line_refusal(code, err)
    assert "root:" not in out


@pytest.mark.parametrize("sql", [
    "SET enable_external_access = true",
    "PRAGMA enable_external_access = true",
    "RESET enable_external_access",
    "SET lock_configuration = false",
    "SET allow_community_extensions = true",
    "SET autoinstall_known_extensions = true",
])
def test_settings_cannot_turn_access_back_on(workdir: Path, tmp_path: Path, sql: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "after.csv"
    code, _, err = cli(["query", f"{sql}; COPY (SELECT 1) TO {sql_literal(str(target))}", "-w", str(workdir)],
                       capsys)
    assert_one_line_refusal(code, err)
    assert not target.exists()


def _hold_catalog(ws: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process writing the catalog: it holds DuckDB's file lock for `seconds`."""
    code = ("import sys, time, duckdb; con = duckdb.connect(sys.argv[1]); con.execute('BEGIN'); "
            "print('held', flush=True); time.sleep(float(sys.argv[2])); con.execute('COMMIT'); con.close()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(ws / "catalog.duckdb"), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_reader_waits_for_a_writer_then_reads(workdir: Path) -> None:
    holder = _hold_catalog(workdir, 1.5)
    try:
        with override_environment(catalog_wait_s=60.0):
            started = time.monotonic()
            assert Catalog(workdir).query("SELECT count(*) FROM pairs").item() == 4
            assert time.monotonic() - started > 0.5  # it did wait for the writer
    finally:
        holder.wait(timeout=60)


def test_reader_gives_up_in_one_line(workdir: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    holder = _hold_catalog(workdir, 20)
    try:
        monkeypatch.setenv("WINNOW_CATALOG_WAIT", "0.5")
        code, _, err = cli(["query", "SELECT count(*) FROM pairs", "-w", str(workdir)], capsys)
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "held by another process" in lines[0] and "WINNOW_CATALOG_WAIT" in lines[0], err
        with pytest.raises(CatalogBusyError):  # writers wait the same bounded time
            Catalog(workdir).upsert_run("run-3", status="ingested")
    finally:
        holder.kill()
        holder.wait()


def test_the_first_error_is_the_one_raised_inside_bounded_memory(workdir: Path) -> None:
    """An error aborts the transaction; restoring the memory limit must not replace it."""
    catalog = Catalog(workdir)
    with pytest.raises(duckdb.ConstraintException):
        with catalog.transaction() as con, bounded_memory(con):
            con.execute("INSERT INTO runs (run_id) VALUES (?)", ["run-1"])  # duplicate primary key
    assert catalog.query("SELECT count(*) FROM runs", read_only=False).item() == 2


def test_bounded_memory_binds_its_values(workdir: Path) -> None:
    """A memory setting is a value, never SQL text: a quote in it cannot run a second statement."""
    with Catalog(workdir).connect() as con:
        threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
        with override_environment(duckdb_memory="512MB'; SET threads = 1; --"):
            with pytest.raises(WinnowError, match="WINNOW_DUCKDB_MEMORY"):
                with bounded_memory(con):
                    pass
        assert con.execute("SELECT current_setting('threads')").fetchone()[0] == threads
        with override_environment(duckdb_memory="512MB"), bounded_memory(con, threads=1):
            assert con.execute("SELECT current_setting('threads')").fetchone()[0] == 1


def test_the_quoting_helper_quotes() -> None:
    from curation.reads import why_example

    assert sql_literal("it's") == "'it''s'"
    assert "run_id = 'a''b'" in why_example("a'b")
    con = duckdb.connect()
    assert con.execute(f"SELECT {sql_literal(chr(39) + ' OR 1=1 --')}").fetchone()[0] == "' OR 1=1 --"
