"""Run ids, paths under the workdir, file-system faults and the run-folder lock.

Run ids reach folder names and SQL: `../../victim` wrote and deleted outside the workdir,
and `x' (FORMAT csv) --` was spliced into a COPY. One pattern now guards them, at the CLI,
in the flow config and in the library entry points; a disk-full, read-only or forbidden
workdir, and a run that does not exist, get one line; a run folder is locked by one process.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from curation.errors import WinnowError
from curation.store import Catalog
from tests.test_safety_query import cli

ROOT = Path(__file__).resolve().parents[1]
HOSTILE_RUN_IDS = ["../victim", "../../victim", "/tmp/abs", "x' (FORMAT csv) --", "a/b", ".hidden", "a" * 129,
                   "run\n2"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(12)]
    path = tmp_path_factory.mktemp("src") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("run_id", HOSTILE_RUN_IDS)
def test_hostile_run_ids_are_refused_everywhere(run_id: str, source: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from curation.ingest import ingest
    from curation.score.scoring import export_pairs, scores_dir
    from flows.config import PipelineConfig, parse_set

    ws = tmp_path / "outer" / "ws"
    before = files_under(tmp_path)
    code, _, err = cli(["ingest", str(source), "-w", str(ws), "--run-id", run_id], capsys)  # the CLI
    assert code == 2 and "invalid run id" in err and "Traceback" not in err, err
    with pytest.raises(WinnowError, match="invalid run id"):  # --set run_id=... (the flow config)
        PipelineConfig.load(None, parse_set([f"run_id={run_id}"]) if "\n" not in run_id else {"run_id": run_id})
    with pytest.raises(WinnowError, match="invalid run id"):  # the library entry points
        ingest([str(source)], Catalog(ws), run_id=run_id, progress=False)
    with pytest.raises(WinnowError, match="invalid run id"):
        export_pairs(Catalog(ws), run_id)
    with pytest.raises(WinnowError, match="invalid run id"):
        scores_dir(ws, run_id)
    assert files_under(tmp_path) - before <= {"outer", "outer/ws", "outer/ws/catalog.duckdb",
                                             "outer/ws/catalog.duckdb.wal"}
    if Catalog(ws).path.exists():
        assert Catalog(ws).query("SELECT count(*) FROM runs").item() == 0


def test_a_good_run_id_and_a_quote_in_the_workdir_work(source: Path, tmp_path: Path) -> None:
    """The export binds its path: a workdir named with a quote is just a name."""
    import polars as pl

    from curation.ingest import ingest
    from curation.score.scoring import export_pairs

    ws = tmp_path / "it's a ws"
    result = ingest([str(source)], Catalog(ws), run_id="Run_1.v2-x", progress=False)
    out = export_pairs(Catalog(ws), result.run_id)
    assert out == ws / "Run_1.v2-x" / "pairs.parquet"
    assert pl.read_parquet(out).height == 12


def test_paths_stay_inside_the_workdir(tmp_path: Path) -> None:
    from curation.paths import check_run_id, contained, inside, run_dir

    with pytest.raises(WinnowError, match="invalid run id"):
        check_run_id("")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "escape").symlink_to(tmp_path)
    assert run_dir(ws, "run-1") == ws / "run-1"
    with pytest.raises(WinnowError, match="outside the workspace"):
        inside(ws, "escape", "x")  # a planted symlink leads out
    with pytest.raises(WinnowError, match="outside the workspace"):
        contained(ws, tmp_path / "elsewhere" / "pairs.parquet")
    assert contained(ws, ws / "run-1" / "pairs.parquet") == ws / "run-1" / "pairs.parquet"


def test_a_manifest_cannot_send_training_outside_the_workdir(tmp_path: Path) -> None:
    from flows.config import PipelineConfig
    from flows.tasks import train_output_dir

    config = PipelineConfig.load(None, {"sources": ["x"], "workdir": str(tmp_path / "ws")})
    with pytest.raises(WinnowError, match="invalid run id"):  # a manifest's run_id names the training folder
        train_output_dir(config, "../../victim", str(tmp_path), "m")


def test_score_of_a_missing_run_is_one_line(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["ingest", str(source), "-w", str(tmp_path)], capsys)
    assert code == 0, err
    for args in (["score", "no-such-run"], ["report", "no-such-run"]):
        code, _, err = cli([*args, "-w", str(tmp_path)], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "no run 'no-such-run'" in lines[0], err


def test_disk_full_is_one_line(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from a write deep inside a command: exit code 2 and one line, not a traceback."""
    ws = tmp_path / "ws"
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self == ws:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, _, err = cli(["ingest", str(source), "-w", str(ws)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "no space left on device" in lines[0], err


def test_fault_messages() -> None:
    import duckdb

    from curation.paths import fault_message, faults_in_one_line

    assert "read-only file system" in fault_message(OSError(errno.EROFS, "Read-only file system", "/x"))
    assert "permission denied (/x)" in fault_message(PermissionError(errno.EACCES, "Permission denied", "/x"))
    assert "no space" in fault_message(duckdb.IOException('IO Error: Could not write file "x": No space left on device'))
    assert fault_message(OSError(errno.ENOENT, "No such file")) is None
    assert fault_message(ValueError("no space left on device")) is None
    with pytest.raises(WinnowError, match="no space left on device"), faults_in_one_line():
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(KeyError), faults_in_one_line():
        raise KeyError("not a fault")


def _without_root_powers() -> None:
    """preexec_fn: root ignores file modes; drop CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and
    CAP_FOWNER from the bounding set so that the exec'd command obeys them like anyone."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2, 3):
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                os._exit(99)


def test_a_read_only_new_workdir_is_one_line(source: Path) -> None:
    parent = Path(tempfile.mkdtemp(prefix="winnow-ro-"))  # not under pytest's 0700 tmp folders
    try:
        data = parent / "pairs.jsonl"
        data.write_bytes(source.read_bytes())
        parent.chmod(0o555)
        run = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", str(data), "-w", str(parent / "new")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=_without_root_powers,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "WINNOW_NO_PROGRESS": "1"})
        if run.returncode == 99:
            pytest.skip("cannot drop root's file-permission powers here")
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode == 2 and len(lines) == 1, run.stderr
        assert "permission denied" in lines[0] or "read-only" in lines[0], run.stderr
        assert not (parent / "new").exists()
    finally:
        parent.chmod(0o755)
        for p in parent.iterdir():
            p.unlink()
        parent.rmdir()


HOLD_LOCK = """
import sys, time
from curation.locks import run_lock
with run_lock(sys.argv[1], wait_s=0):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_run_lock(folder: Path, seconds: float) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder), str(seconds)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_a_run_folder_is_locked_by_one_process(tmp_path: Path) -> None:
    from curation.locks import RunLockedError, run_lock

    folder = tmp_path / "run-1"
    holder = _hold_run_lock(folder, 60)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by another Winnow process \(PID {holder.pid}\)"):
            with run_lock(folder, wait_s=0.3):
                pass
        holder.send_signal(signal.SIGKILL)  # a killed run leaves no stale lock
        holder.wait()
        with run_lock(folder, wait_s=5) as lock, run_lock(folder, wait_s=0):  # re-entrant in one thread
            assert lock.read_text().strip() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_waits_for_the_first(tmp_path: Path) -> None:
    from curation.locks import RunLockedError, run_lock

    folder = tmp_path / "run-1"
    holder = _hold_run_lock(folder, 1.5)
    try:
        with pytest.raises(RunLockedError):  # held right now
            with run_lock(folder, wait_s=0):
                pass
        with run_lock(folder, wait_s=60):  # waits for the holder instead of failing
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_planted_lock_symlink_is_not_followed(tmp_path: Path) -> None:
    from curation.locks import run_lock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = tmp_path / "run-1"
    folder.mkdir()
    (folder / ".lock").symlink_to(victim)
    with pytest.raises(WinnowError, match="symbolic link"):
        with run_lock(folder, wait_s=0):
            pass
    assert victim.read_text() == "precious\n"
