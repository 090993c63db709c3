"""Flows on a shared workspace: a planted cache file is never executed, a run folder has one
writer, and file-system faults end a flow in one line. Real Prefect (one test API for the module)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, model_validator

from curation.errors import WinnowError
from curation.store import Catalog

ROOT = Path(__file__).resolve().parents[1]
MARKER_ENV = "WINNOW_TEST_TRIPWIRE"


class Tripwire(BaseModel):
    """Writes the marker file the moment anything builds one: proof that workspace data ran code."""

    note: str = ""

    @model_validator(mode="after")
    def _trip(self) -> Tripwire:
        Path(os.environ[MARKER_ENV]).write_text("ran\n")
        return self


class PickleBomb:
    """Unpickling it writes the marker file (what a planted cloudpickle result did)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    from flows.prefect_env import configure_prefect

    configure_prefect()
    os.environ["WINNOW_NO_PROGRESS"] = "1"
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "score_chosen": 2.0,
             "score_rejected": 1.0} for i in range(16)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def export_once(overrides: dict[str, Any]) -> dict[str, Any]:
    """One real pipeline step (export-pairs) through the flows' own step runner, in a flow."""
    from prefect import flow

    from flows import tasks
    from flows.config import PipelineConfig
    from flows.pipeline import _Steps

    @flow(name="safety-export")
    def export_flow(overrides: dict[str, Any]) -> dict[str, Any]:
        config = PipelineConfig.load(None, overrides)
        steps = _Steps(config)
        result = steps.run("export-pairs", tasks.export_task, config=config, run_id=config.run_id)
        return {"result": result, "cached": steps.cached}

    return export_flow(overrides)


def plant(kind: str, workdir: Path, key: str, marker: Path) -> list[Path]:
    """Hostile records at the task's exact cache location, in each layout Prefect reads."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import JSONSerializer, PickleSerializer

    folder = workdir / ".prefect-results"
    (folder / "keys").mkdir(parents=True, exist_ok=True)
    if kind == "pickle":
        serializer, payload = PickleSerializer(), PickleBomb(marker)
    else:  # Prefect's own "json" serializer imports and builds any class a record names
        serializer, payload = JSONSerializer(), Tripwire(note="x")
    os.environ.pop(MARKER_ENV, None)
    combined = folder / key  # one file holding record and result (Prefect's default layout)
    record = ResultRecord(metadata=ResultRecordMetadata(serializer=serializer, storage_key=str(combined)),
                          result=payload)
    combined.write_bytes(record.serialize())
    split = folder / "keys" / key  # the record under the key, its result in another file
    result_file = folder / f"{key}.planted"
    result_file.write_bytes(record.serialize_result())
    split_record = ResultRecord(metadata=ResultRecordMetadata(serializer=serializer, storage_key=str(result_file)),
                                result=None)
    split.write_bytes(split_record.serialize_metadata())
    os.environ[MARKER_ENV] = str(marker)
    return [combined, split]


@pytest.mark.parametrize("kind", ["pickle", "prefect-json"])
def test_a_planted_cache_file_is_never_executed(kind: str, source: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from curation.ingest import ingest
    from flows import tasks
    from flows.config import PipelineConfig

    workdir = tmp_path / "ws"
    ingest([str(source)], Catalog(workdir), run_id="run-shared", progress=False)
    overrides = {"sources": [str(source)], "workdir": str(workdir), "run_id": "run-shared"}
    config = PipelineConfig.load(None, overrides)
    key = tasks._export_key(None, {"config": config, "run_id": "run-shared"})
    marker = tmp_path / "pwned"
    planted = plant(kind, workdir, key, marker)
    monkeypatch.setenv(MARKER_ENV, str(marker))
    assert all(p.is_file() for p in planted)

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("prefect.winnow.cache")
    logger.addHandler(handler)
    try:
        out = export_once(overrides)
    finally:
        logger.removeHandler(handler)
    assert not marker.exists(), "a planted cache file ran code"
    assert out["cached"] == []  # recomputed, not read from the planted file
    assert Path(out["result"]["pairs_path"]).is_file() and out["result"]["margin_source"] == "scores"
    assert any("not a data-only record" in r.getMessage() for r in records)
    again = export_once(overrides)  # the recomputed entry is a good one: the next run uses it
    assert again["cached"] == ["export-pairs"] and again["result"] == out["result"]
    assert not marker.exists()


def test_cached_results_are_plain_json(source: Path, tmp_path: Path) -> None:
    from flows.caching import DataOnlySerializer, NotDataError

    serializer = DataOnlySerializer()
    assert serializer.loads(serializer.dumps({"a": [1, 2.5, None, "x"]})) == {"a": [1, 2.5, None, "x"]}
    for bad in ({1: "int key"}, (1, 2), {"a": float("nan")}, Path("x"), {"f": print}):
        with pytest.raises(NotDataError):
            serializer.dumps(bad)
    assert serializer.loads(b'{"__class__": "os.system", "data": "echo"}') == {"__class__": "os.system",
                                                                              "data": "echo"}


def test_a_second_run_of_the_same_run_id_fails_in_one_line(source: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.pipeline import curate_flow

    workdir = tmp_path / "ws"
    hold = ("import sys, time\nfrom curation.locks import run_lock\nwith run_lock(sys.argv[1], wait_s=0):\n"
            "    print('locked', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(workdir / "run-busy")], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("WINNOW_RUN_LOCK_WAIT", "0.5")
        with pytest.raises(WinnowError, match="in use by another Winnow process"):
            curate_flow(overrides={"sources": [str(source)], "workdir": str(workdir), "run_id": "run-busy"})
        assert not Catalog(workdir).path.exists()  # it stopped before ingest touched anything
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("fault", ["disk-full", "read-only"])
def test_file_system_faults_end_a_flow_in_one_line(fault: str, source: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import curation.ingest
    from flows.pipeline import curate_flow

    workdir = tmp_path / "ws"
    if fault == "disk-full":  # a write inside a task (ingest's)
        def full(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(workdir / "catalog.duckdb"))

        monkeypatch.setattr(curation.ingest, "ingest", full)
        expected = "no space left on device"
    else:  # a read-only new workdir: the first folder the flow makes
        real_mkdir = Path.mkdir

        def mkdir(self: Path, *args: object, **kwargs: object) -> None:
            if self == workdir or workdir in self.parents:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
        expected = "read-only file system"
    with pytest.raises(WinnowError, match=expected) as caught:
        curate_flow(overrides={"sources": [str(source)], "workdir": str(workdir), "run_id": "run-fault"})
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_a_damaged_shard_is_curated_again_and_refresh_retrains(tmp_path: Path) -> None:
    """curate-and-train twice; between the runs a shard is cut short: the second run writes the
    shards again (log line) and trains on them; --refresh then retrains every stage."""
    from flows.pipeline import curate_and_train_flow
    from tests.test_flows import small_overrides
    from training.sorting import TRUTH_COLUMNS, PreferenceSetConfig, generate_preferences

    frame = generate_preferences(PreferenceSetConfig(size=160, seed=5)).drop(TRUTH_COLUMNS)
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dicts()))
    overrides = {**small_overrides(source, tmp_path / "ws"), "eval": {"enabled": False}}
    first = curate_and_train_flow(overrides=overrides)
    shard = Path(first["shard_dir"]) / "stage-1.parquet"
    shard.write_bytes(shard.read_bytes()[:200])
    second = curate_and_train_flow(overrides=overrides)
    assert shard.stat().st_size > 200  # written again by curation
    assert [s["resumed"] for s in second["stages"]] == [True, True]  # the shards' bytes are the same again
    refreshed = curate_and_train_flow(overrides={**overrides, "refresh": True})
    assert [s["resumed"] for s in refreshed["stages"]] == [False, False]
