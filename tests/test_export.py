"""`winnow export`: kept pairs as a datasets folder and JSONL (all, per stage, one stage, with the
curation columns), conversational pairs as message lists, and a one-line failure for hf:NAME without
a token or a hub."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import polars as pl
import pytest

from curation.errors import WinnowError
from curation.export import ExportOptions, export_run
from curation.store import Catalog
from tests.synthetic_run import curated_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalog, str]:
    catalog, run_id, _ = curated_run(tmp_path_factory.mktemp("export-run"), report=False)
    return catalog, run_id


def _kept(catalog: Catalog, run_id: str) -> pl.DataFrame:
    return catalog.query("SELECT d.pair_id, d.stage, d.stage_position, p.prompt, p.chosen, p.rejected, s.margin, "
                         "d.weight FROM decisions d JOIN pairs p USING (run_id, pair_id) JOIN scores s "
                         "USING (run_id, pair_id) WHERE d.run_id = ? AND d.kept ORDER BY d.stage, d.stage_position",
                         [run_id])


def test_export_all_kept_pairs_in_teaching_order(run, tmp_path: Path) -> None:
    from datasets import load_dataset, load_from_disk

    catalog, run_id = run
    result = export_run(catalog, run_id, str(tmp_path / "out"))
    kept = _kept(catalog, run_id)
    dataset = load_from_disk(str(tmp_path / "out" / "dataset"))
    assert dataset.column_names == ["prompt", "chosen", "rejected"] == result.columns
    assert dataset.num_rows == result.rows == kept.height > 0
    assert dataset["chosen"] == kept["chosen"].to_list()  # stage 1 first, then by position
    lines = load_dataset("json", data_files=str(tmp_path / "out" / "pairs.jsonl"), split="train")
    assert lines["prompt"] == kept["prompt"].to_list()
    assert json.loads((tmp_path / "out" / "export.json").read_text())["rows"] == kept.height
    # a second export over the first replaces it
    again = export_run(catalog, run_id, str(tmp_path / "out"), ExportOptions(stage=2))
    assert load_from_disk(str(tmp_path / "out" / "dataset")).num_rows == again.rows == kept["stage"].eq(2).sum()


def test_export_per_stage_with_curation_columns(run, tmp_path: Path) -> None:
    from datasets import load_from_disk

    catalog, run_id = run
    export_run(catalog, run_id, str(tmp_path / "out"), ExportOptions(per_stage=True, curation_columns=True))
    kept = _kept(catalog, run_id)
    splits = load_from_disk(str(tmp_path / "out" / "dataset"))
    assert sorted(splits) == ["stage_1", "stage_2"]
    for name, split in splits.items():
        stage = int(name.split("_")[1])
        expected = kept.filter(pl.col("stage") == stage)
        assert split["pair_id"] == expected["pair_id"].to_list()
        assert split["margin"] == pytest.approx(expected["margin"].to_list())
        assert split["weight"] == pytest.approx(expected["weight"].to_list())
        assert {"source", "source_row", "stage_position", "token_edit_distance"} <= set(split.column_names)
        jsonl = pl.read_ndjson(tmp_path / "out" / f"stage-{stage}.jsonl")
        assert jsonl["pair_id"].to_list() == expected["pair_id"].to_list()
    assert not (tmp_path / "out" / "pairs.jsonl").exists()


def test_export_refuses_a_foreign_folder_and_an_uncurated_run(run, tmp_path: Path) -> None:
    catalog, run_id = run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(WinnowError, match="not an earlier export"):
        export_run(catalog, run_id, str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(WinnowError, match="no run"):
        export_run(catalog, "run-nope", str(tmp_path / "x"))
    with pytest.raises(WinnowError, match="no pairs in stage 9"):
        export_run(catalog, run_id, str(tmp_path / "x"), ExportOptions(stage=9))


def test_conversational_pairs_export_as_message_lists(tmp_path: Path) -> None:
    from datasets import load_from_disk

    from curation.decide import curate
    from tests.test_curation_decisions import QUICK, flipped_set, make_catalog, synthetic_scores

    margins, _ = flipped_set(200)
    catalog = make_catalog(tmp_path, synthetic_scores(margins), conversational=True)
    curate(catalog, "run-synthetic", QUICK)
    export_run(catalog, "run-synthetic", str(tmp_path / "out"))
    row = load_from_disk(str(tmp_path / "out" / "dataset"))[0]
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    first = json.loads((tmp_path / "out" / "pairs.jsonl").read_text().splitlines()[0])
    assert first["rejected"][0]["content"].startswith("rejected answer")


def test_tool_schemas_ride_with_conversations(tmp_path: Path) -> None:
    """A conversational run whose pairs carry `tools` exports them, as its shards do (TRL's layout)."""
    from datasets import load_from_disk

    from curation.decide import curate
    from tests.test_curation_decisions import QUICK, flipped_set, make_catalog, synthetic_scores

    margins, _ = flipped_set(120)
    catalog = make_catalog(tmp_path, synthetic_scores(margins), conversational=True)
    tools = json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    pairs = catalog.query("SELECT * EXCLUDE (run_id) FROM pairs WHERE run_id = ?", ["run-synthetic"])
    with catalog.transaction() as con:
        catalog.replace_slice(con, "pairs", pairs.with_columns(tools=pl.lit(tools)), run_id="run-synthetic")
    curate(catalog, "run-synthetic", QUICK)
    result = export_run(catalog, "run-synthetic", str(tmp_path / "out"))
    assert result.columns == ["prompt", "chosen", "rejected", "tools"]
    row = load_from_disk(str(tmp_path / "out" / "dataset"))[0]
    assert json.loads(row["tools"])[0]["function"]["name"] == "get_weather"


def test_hub_export_fails_in_one_line_without_a_token_or_a_hub(run, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from curation.env import override_environment

    catalog, run_id = run
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(WinnowError, match="no Hugging Face token"):
        export_run(catalog, run_id, "hf:someone/curated")
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    with socket.socket() as s:  # a port nobody listens on: the hub is unreachable
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with override_environment(hf_endpoint=f"http://127.0.0.1:{closed}"), pytest.raises(WinnowError,
                                                                                      match="offline or unreachable"):
        export_run(catalog, run_id, "hf:someone/curated")
    with pytest.raises(WinnowError, match="not a hub dataset name"):
        export_run(catalog, run_id, "hf:../etc")


def test_cli_export_error_is_one_line_and_json_stdout_stays_empty(run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import huggingface_hub.constants

    from flows import cli
    from flows.prefect_env import PREFECT_DEFAULTS

    catalog, run_id = run
    for name, value in PREFECT_DEFAULTS.items():  # main() sets them; keep this process's environment as it was
        monkeypatch.setenv(name, os.environ.get(name, value))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(sys, "argv", ["winnow", "export", run_id, "--to", "hf:someone/curated", "-w",
                                      str(catalog.workdir), "--json"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    captured = capsys.readouterr()
    assert info.value.code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and "no Hugging Face token" in captured.err and "Traceback" not in captured.err
    monkeypatch.setattr(sys, "argv", ["winnow", "export", run_id, "--to", str(tmp_path / "out"), "-w",
                                      str(catalog.workdir), "--json"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 0 and json.loads(capsys.readouterr().out)["rows"] > 0
