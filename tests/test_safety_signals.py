"""`winnow run` leaves no process behind, however it ends: SIGINT, SIGTERM or SIGKILL.

A real `winnow run curate-and-train` (small settings, its own Prefect home, no API URL, so it
starts Prefect's temporary API server) is signalled once its flow is running; then every
process it had started must be gone. Before the fix, SIGTERM and SIGKILL left the uvicorn
API server running (about 220 MB and a port).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["tiny.hidden_size=32", "tiny.intermediate_size=64", "tiny.num_layers=1", "tiny.sft_steps=400",
         "train.batch_size=32", "score.max_length=64", "eval.enabled=false"]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _start_run(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    rows = [{"prompt": f"Sort: {i} {i + 3} {i + 1}", "chosen": f"{i} {i + 1} {i + 3}", "rejected": f"{i + 3} {i}"}
            for i in range(60)]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    workdir = tmp_path / "ws"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(ROOT), WINNOW_NO_PROGRESS="1", PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    sets = [arg for item in SMALL for arg in ("--set", item)]
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115 - closed with the process
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "curate-and-train", "--source", str(source),
                            "-w", str(workdir), *sets], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return run, workdir


def _wait_until_flow_runs(run: subprocess.Popen[bytes], workdir: Path, log: Path, timeout: float = 240) -> None:
    """The flow body runs once it holds its run folder's lock, or ingest made the catalog (so the API
    server is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run.poll() is not None:
            pytest.fail(f"winnow run ended early ({run.returncode}):\n{log.read_text()[-3000:]}")
        if list(workdir.glob("*/.lock")) or (workdir / "catalog.duckdb").exists():
            return
        time.sleep(0.2)
    pytest.fail(f"the flow did not start within {timeout}s:\n{log.read_text()[-3000:]}")


# SIGKILL in the default suite: no handler of the run's can act, only the kernel (PR_SET_PDEATHSIG);
# SIGTERM takes the same path (Python's default action kills at once), SIGINT the atexit one. Each
# run starts a Prefect server (15-60 s on 2 cores), so those two are marked slow.
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow, id="INT"),
                                    pytest.param(signal.SIGTERM, marks=pytest.mark.slow, id="TERM"),
                                    pytest.param(signal.SIGKILL, id="KILL")])
def test_no_process_survives_a_signalled_run(signum: int, tmp_path: Path) -> None:
    run, workdir = _start_run(tmp_path)
    children: list[psutil.Process] = []
    try:
        _wait_until_flow_runs(run, workdir, tmp_path / "run.log")
        children = psutil.Process(run.pid).children(recursive=True)
        assert any("uvicorn" in " ".join(c.cmdline()) for c in children), "no API server child found"
        run.send_signal(signum)
        run.wait(timeout=120)
        deadline = time.monotonic() + 30
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = [" ".join(c.cmdline())[:160] for c in children if _alive(c)]
        assert not survivors, f"left behind after {signal.Signals(signum).name}: {survivors}"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for child in children:
            if _alive(child):
                child.kill()
