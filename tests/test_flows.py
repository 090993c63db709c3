"""Prefect flows end to end on a cut-down demo: catalog rows, resume from cache, a real
Prefect server serving the deployment, and Dask workers giving the same scores as threads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from curation.store import Catalog
from training.sorting import TRUTH_COLUMNS, PreferenceSetConfig, generate_preferences

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("runs", "pairs", "quarantine", "scores", "margins", "decisions", "decision_rounds", "stages", "shards",
          "advice", "train_metrics", "evals")


def small_overrides(source: Path, workdir: Path) -> dict:
    """Settings that keep a whole run to seconds: a small tiny model, short training, few eval prompts."""
    return {
        "sources": [str(source)],
        "workdir": str(workdir),
        "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "sft_steps": 15, "sft_batch_size": 32},
        "train": {"batch_size": 32, "logging_steps": 2},
        "score": {"max_length": 64},
        "eval": {"prompts": 12, "heldout_pairs": 24, "max_new_tokens": 12, "task": "sorting"},
    }


@pytest.fixture(scope="module")
def small_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frame = generate_preferences(PreferenceSetConfig(size=240, seed=3)).drop(TRUTH_COLUMNS)
    lines = [json.dumps(r) for r in frame.to_dicts()]
    lines += [lines[0], '{"prompt": "broken', json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"})]
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    """One throwaway Prefect API for the module instead of a temporary server per flow run."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.prefect_env import configure_prefect

    configure_prefect()  # as the CLI does (importing flows sets nothing)
    os.environ["WINNOW_NO_PROGRESS"] = "1"
    with prefect_test_harness(server_startup_timeout=120):
        yield


def rows_per_table(workdir: Path, run_id: str) -> dict[str, int]:
    catalog = Catalog(workdir)
    return {t: catalog.query(f"SELECT count(*) AS n FROM {t} WHERE run_id = ?", [run_id]).item() for t in TABLES}


def test_curate_and_train_end_to_end(small_source: Path, tmp_path: Path) -> None:
    from flows.pipeline import curate_and_train_flow

    summary = curate_and_train_flow(overrides=small_overrides(small_source, tmp_path))
    counts = rows_per_table(tmp_path, summary["run_id"])
    assert all(n > 0 for n in counts.values()), counts
    assert counts["pairs"] + counts["quarantine"] == len(small_source.read_text().splitlines())  # every row
    assert counts["decisions"] == counts["pairs"] == counts["scores"]
    assert [s["stage"] for s in summary["stages"]] == [1, 2]
    assert summary["stages"][0]["reference_source"] == "curation"
    assert summary["stages"][1]["reference_source"] == "online"  # online curation (default): stage 1's policy
    assert {"gold_reward", "win_rate", "kl", "implicit_acc"} <= set(summary["eval"])
    assert Path(summary["report"]).is_file()


def test_resume_after_failure_uses_cache_and_keeps_rows_unique(small_source: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.pipeline import FAIL_AFTER_ENV, InjectedFailure, curate_and_train_flow

    overrides = small_overrides(small_source, tmp_path)
    monkeypatch.setenv(FAIL_AFTER_ENV, "curate")  # dies after scoring and curation, before training
    with pytest.raises(InjectedFailure):
        curate_and_train_flow(overrides=overrides)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    summary = curate_and_train_flow(overrides=overrides)
    assert {"ingest", "build-model", "export-pairs", "score-shard", "score", "curate"} <= set(summary["cached_tasks"])
    assert "train-stages" not in summary["cached_tasks"]
    catalog = Catalog(tmp_path)
    for table in ("pairs", "scores", "decisions"):
        total, unique = catalog.query(f"SELECT count(*), count(DISTINCT pair_id) FROM {table}").row(0)
        assert total == unique, table
    assert catalog.query("SELECT count(*) FROM runs").item() == 1
    # a third run with --refresh recomputes instead of reading the cache
    overrides["refresh"] = True
    overrides["eval"] = {"enabled": False}
    refreshed = curate_and_train_flow(overrides=overrides)
    assert refreshed["cached_tasks"] == []


def test_dask_workers_score_like_threads(small_source: Path, tmp_path: Path) -> None:
    pytest.importorskip("prefect_dask", reason="install the dask extra: pip install 'winnow[dask]'")
    from flows.pipeline import run_flow

    scores = {}
    for runner in ("threads", "dask"):
        workdir = tmp_path / runner
        overrides = {**small_overrides(small_source, workdir), "score_shards": 2}
        summary = run_flow("curate", None, overrides, task_runner=runner)
        scores[runner] = Catalog(workdir).query(
            "SELECT * EXCLUDE (run_id, tokenizer) FROM scores WHERE run_id = ? ORDER BY pair_id", [summary["run_id"]]
        )
    threads, dask = scores["threads"], scores["dask"]
    assert threads.height == dask.height > 200
    logps = [c for c in threads.columns if c.startswith("ref_")]
    # text/token statistics and the margin are exact; float32 log-probs may differ in the last
    # bits because a worker process runs torch with another thread count (summation order)
    assert threads.drop(logps).equals(dask.drop(logps))
    for column in logps:
        assert (threads[column] - dask[column]).abs().max() < 1e-5, column


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def test_real_server_serves_deployment_and_run_completes(small_source: Path, tmp_path: Path) -> None:
    """prefect server start -> winnow serve -> prefect deployment run --watch reaches Completed."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "WINNOW_NO_PROGRESS": "1"}
    env.pop("PREFECT_API_KEY", None)
    recipe = tmp_path / "recipe.yaml"
    overrides = small_overrides(small_source, tmp_path / "ws")
    overrides["eval"] = {"enabled": False}
    recipe.write_text(yaml.safe_dump(overrides))
    bin_dir = Path(sys.executable).parent
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    served = None
    try:
        _wait_for(f"{api}/health", 120)
        served = subprocess.Popen([str(bin_dir / "winnow"), "serve", "--config", str(recipe)], env=env, cwd=ROOT,
                                  stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.monotonic() + 90
        while "on-demand" not in (logs / "serve.log").read_text() and time.monotonic() < deadline:
            time.sleep(1)
        run = subprocess.run([str(bin_dir / "prefect"), "deployment", "run", "curate-and-train/on-demand", "--watch",
                              "--watch-timeout", "400"], env=env, capture_output=True, text=True, timeout=450)
        output = run.stdout + run.stderr
        assert run.returncode == 0 and "Completed" in output, output[-3000:] + (logs / "serve.log").read_text()[-3000:]
        catalog = Catalog(tmp_path / "ws")
        run_id = catalog.query("SELECT run_id FROM runs").item()
        counts = rows_per_table(tmp_path / "ws", run_id)
        assert all(counts[t] > 0 for t in TABLES if t != "evals"), counts
    finally:
        for proc in (served, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
    assert server.poll() is not None


def test_artifact_keys_follow_prefect_rules() -> None:
    from flows.artifacts import artifact_key

    key = artifact_key("run-04F33f4e8688", "Training_Progress")
    assert key == "run-04f33f4e8688-training-progress"
    assert all(c.islower() or c.isdigit() or c == "-" for c in key)


def test_recipes_load(tmp_path: Path) -> None:
    from flows.config import PipelineConfig

    for recipe in sorted((ROOT / "flows" / "recipes").glob("*.yaml")):
        if recipe.name.startswith("accelerate"):
            continue
        config = PipelineConfig.load(recipe)
        # one owner of the token budget: scoring's; training inherits it through the manifest
        assert config.train.max_length is None and config.score.max_length, recipe
    assert PipelineConfig.load(overrides={"score": {"max_length": 64}}).score.max_length == 64


def test_settings_have_one_owner() -> None:
    """Defaults are stated once: TRL's max_length for user data, and the CLI reads the library's fields."""
    import dataclasses

    from trl import DPOConfig

    from curation.config_fields import default_of
    from curation.ingest import IngestOptions
    from curation.score.scoring import ScoreOptions
    from flows.cli import app
    from flows.config import PipelineConfig

    trl_default = {f.name: f.default for f in dataclasses.fields(DPOConfig)}["max_length"]
    assert ScoreOptions().max_length == trl_default == 1024
    assert PipelineConfig.load(overrides={"sources": ["x.jsonl"]}).score.max_length == 1024
    import typer.main

    command = typer.main.get_command(app)
    options = {p.name: p for p in command.commands["ingest"].params}
    assert options["max_bytes"].default == default_of(IngestOptions, "max_bytes")
    assert options["max_bad_fraction"].default == default_of(IngestOptions, "max_bad_fraction")
    assert {p.name: p for p in command.commands["score"].params}["max_length"].default == ScoreOptions().max_length
