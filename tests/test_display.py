"""The live display, the plain lines off a terminal, tables that never cut a value, quiet libraries,
and the CLI as a user runs it: one screen of output, and one JSON document with --json."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
import yaml
from rich.console import Console

from curation.progress import NullBar, StepEvent, current_sink, progress_bar, report_step, use_sink
from flows.display import Output, RunDisplay, print_frame, quiet_libraries, render_summary

ROOT = Path(__file__).resolve().parents[1]
LONG_PATH = "/very/long/workspace/runs/run-04f33f4e8688/train/2e69b645db0c/stage-2/model"


def _console(terminal: bool, width: int = 100) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=width, color_system=None if not terminal else "standard",
                   highlight=False), buffer


def _events(display: RunDisplay) -> None:
    display.step(StepEvent("ingest", "started"))
    display.step(StepEvent("ingest", "finished", 1.0, {"rows_read": 10, "pairs": 9, "quarantined": 1}))
    for name in ("export-pairs", "score-shard"):
        display.step(StepEvent(name, "started"))
        display.step(StepEvent(name, "cached", 0.1, None))
    display.step(StepEvent("score", "started"))
    display.step(StepEvent("score", "finished", 0.2, 9))
    display.step(StepEvent("curate", "started"))
    display.step(StepEvent("curate", "cached", 0.1, {"kept": 7, "pairs": 9, "stage_sizes": [4, 3]}))


def test_plain_lines_one_per_finished_step_no_carriage_returns() -> None:
    console, buffer = _console(terminal=False)
    with RunDisplay(console, live=False, show_starting=True) as display:
        assert isinstance(display.open_bar("score", 10, "pair"), NullBar)  # no redrawn bars off a terminal
        _events(display)
    out = buffer.getvalue()
    lines = out.splitlines()
    assert "\r" not in out and "\x1b" not in out
    assert [line.split()[1] for line in lines] == ["start", "ingest", "score", "curate"]  # the score row groups 3 tasks
    assert "10 rows: 9 pairs, 1 quarantined" in lines[1]
    assert "from cache" in lines[3] and "from cache" not in lines[2]  # score had a task that ran


def test_live_display_shows_bars_and_ends_with_every_step(bars_on: None) -> None:
    console, buffer = _console(terminal=True)
    with RunDisplay(console, live=True) as display, use_sink(display):
        assert current_sink() is display
        with progress_bar("winnow-tiny SFT warm-up", total=4, unit="step") as bar:
            bar.update(3)
            bar.set_postfix(loss="1.234")
            assert display.progress.tasks[0].completed == 3
            display._live.refresh()  # draw a frame now (the live display redraws 8 times a second)
            assert "winnow-tiny SFT warm-up" in buffer.getvalue() and "3/4" in buffer.getvalue()
            assert "loss=1.234" in buffer.getvalue()
        assert not display.progress.tasks  # a closed bar leaves the display
        report_step("ingest", "started")
        report_step("ingest", "failed", 0.5)
    assert current_sink() is None
    out = buffer.getvalue()
    assert "ingest" in out and "✗" in out


def test_failure_before_any_step_prints_no_step_line() -> None:
    console, buffer = _console(terminal=False)
    with pytest.raises(RuntimeError), RunDisplay(console, live=False, show_starting=True):
        raise RuntimeError("bad settings")
    assert buffer.getvalue() == ""


@pytest.mark.parametrize("width", [200, 40])
def test_tables_never_cut_a_value(width: int) -> None:
    frame = pl.DataFrame({"stage": [1, 2], "reference_source": ["curation", "recomputed"],
                          "train_loss": [0.902231, 1.3131], "model_dir": [LONG_PATH, LONG_PATH + "-2"]})
    console, buffer = _console(terminal=False, width=width)
    print_frame(frame, console, title="sDPO stages")
    out = buffer.getvalue()
    assert "…" not in out
    for value in ("reference_source", "recomputed", "0.9022", "1.313", LONG_PATH, LONG_PATH + "-2"):
        assert value in out, (value, out)
    if width == 40:  # too narrow for a table: key/value lines
        assert f"model_dir         {LONG_PATH}" in out


def test_summary_has_the_paths_uncut_and_fits_a_screen(tmp_path: Path) -> None:
    report = tmp_path / "report" / "report.md"
    report.parent.mkdir()
    report.write_text("# r")
    report.with_suffix(".html").write_text("<html></html>")
    summary = {"run_id": "run-04f33f4e8688", "pairs": 2974, "kept": 2355, "stage_sizes": [1178, 1177],
               "dropped": {"beta_outlier_low": 440, "heldout": 30, "beta_outlier_high": 149},
               "advice": {"objective": "beta-dpo", "params": {"beta": 2.0}, "rationale": "Noisy margins."},
               "shard_dir": str(tmp_path / "shards"), "report": str(report), "final_model": LONG_PATH,
               "stages": [{"stage": 1, "objective": "beta-dpo", "pairs": 1178, "reference_source": "curation",
                           "train_loss": 0.9, "seconds": 22.8, "resumed": False}],
               "eval": {"gold_reward": 0.9425, "gold_reward_ref": 0.9213, "kl": 0.18, "kl_se": 0.04},
               "cached_tasks": ["ingest"]}
    console, buffer = _console(terminal=False, width=60)
    render_summary(summary, console, catalog=tmp_path / "catalog.duckdb")
    out = buffer.getvalue()
    for value in (LONG_PATH, str(report.with_suffix(".html")), str(tmp_path / "shards"), "gold_reward 0.9425 (ref 0.9213)",
                  "beta_outlier_low 440", "30 held out for evaluation", "589 dropped"):
        assert value in out.replace("\n", " ") if " " in value else value in out, (value, out)
    assert len(out.splitlines()) < 25


def test_quiet_libraries_silences_and_restores() -> None:
    import datasets.utils.logging as ds_logging
    import transformers.utils.logging as tf_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    handler = PrefectConsoleHandler()
    logging.getLogger().addHandler(handler)
    ds_before, tf_before = ds_logging.is_progress_bar_enabled(), tf_logging.is_progress_bar_enabled()
    ds_logging.enable_progress_bar()  # another module may have turned them off for good (tests do)
    tf_logging.enable_progress_bar()
    try:
        before = handler.level
        with quiet_libraries():
            assert not tf_logging.is_progress_bar_enabled() and not ds_logging.is_progress_bar_enabled()
            assert handler.level == logging.WARNING
            assert os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] == "WARNING"
            with warnings.catch_warnings(record=True) as caught:
                warnings.warn("hidden", FutureWarning, stacklevel=1)
            assert not caught or all("hidden" not in str(w.message) for w in caught)
        assert tf_logging.is_progress_bar_enabled() and ds_logging.is_progress_bar_enabled()
        assert handler.level == before and "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL" not in os.environ
    finally:
        logging.getLogger().removeHandler(handler)
        if not ds_before:
            ds_logging.disable_progress_bar()
        if not tf_before:
            tf_logging.disable_progress_bar()


def test_json_output_is_one_document_and_work_output_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    out = Output(json_mode=True)
    with out.work(steps=False):
        print("stray library print")
        report_step("ingest", "finished", 0.1, {"rows_read": 1, "pairs": 1, "quarantined": 0})
    out.result({"run_id": "run-x", "value": float("nan"), "path": Path("/a")}, lambda c: None)
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"run_id": "run-x", "value": None, "path": "/a"}
    assert "stray library print" in captured.err


# -- the CLI, as a user runs it -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_api_url() -> Iterator[str]:
    """One Prefect API for the module's CLI runs (each would start a temporary one otherwise)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.prefect_env import configure_prefect

    configure_prefect()
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def _cli(args: list[str], cwd: Path, api: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "100"}
    if api:
        env["PREFECT_API_URL"] = api
    env.pop("WINNOW_NO_PROGRESS", None)
    env.pop("TQDM_DISABLE", None)  # set by other test modules at import; a user's shell has neither
    env.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def small_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_flows import small_overrides
    from training.sorting import TRUTH_COLUMNS, PreferenceSetConfig, generate_preferences

    root = tmp_path_factory.mktemp("display-run")
    frame = generate_preferences(PreferenceSetConfig(size=200, seed=5)).drop(TRUTH_COLUMNS)
    source = root / "pairs.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in frame.to_dicts()) + "\n")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(small_overrides(source, root / "ws")))
    return recipe


def test_cli_run_output_fits_one_screen_and_json_is_one_document(small_recipe: Path, prefect_api_url: str) -> None:
    """Off a terminal: plain step lines and the summary, nothing from Prefect or the libraries."""
    done = _cli(["run", "curate-and-train", "-c", str(small_recipe)], small_recipe.parent, prefect_api_url)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    lines = output.splitlines()
    assert len(lines) <= 40, output
    assert "\r" not in output and "\x1b" not in output
    for noise in ("INFO", "Loading weights", "Adding EOS", "FutureWarning", "{'loss'", "…"):
        assert noise not in output, (noise, output)
    for step in ("ingest", "build model", "score", "curate", "train", "evaluate"):
        assert any(line.startswith("✓ " + step) for line in lines), (step, output)
    paths = {line.split()[0]: line.split(None, 1)[1] for line in lines if line.split()[:1] in (["report"], ["shards"],
                                                                                               ["model"], ["catalog"])}
    assert set(paths) == {"report", "shards", "model", "catalog"}, output
    for path in paths.values():
        assert (small_recipe.parent / path).exists() or Path(path).exists(), path
    # the same run again with --json (in this process, against the same API: cached): stdout is one JSON document
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from typer.testing import CliRunner

    from flows.cli import app

    with temporary_settings({PREFECT_API_URL: prefect_api_url}):
        done = CliRunner().invoke(app, ["run", "curate-and-train", "-c", str(small_recipe), "--json"])
    assert done.exit_code == 0, done.output[-3000:]
    document = json.loads(done.stdout)
    assert document["kept"] > 0 and len(document["stages"]) == 2 and "gold_reward" in document["eval"]
    assert "ingest" in document["cached_tasks"]
    # query and ingest answer in JSON too
    ws = small_recipe.parent / "ws"
    done = _cli(["query", "SELECT reason, count(*) AS n FROM decisions GROUP BY 1 ORDER BY 1", "-w", str(ws), "--json"],
                small_recipe.parent)
    rows = json.loads(done.stdout)["rows"]
    assert sum(r["n"] for r in rows) == document["pairs"]
