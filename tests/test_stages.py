"""Tests for training/stages.py: the sDPO loop, its references, and resuming after a crash.

The shard folder is written here the way curation writes it (manifest.json with the scoring
tokenizer and max_length, one stage-k.parquet per stage carrying the base model's reference
log-probs), for a 1-layer tiny model, so two stages train in a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch
from transformers import TrainerCallback

import training.stages as stages
from curation.lm.loading import load_model, load_tokenizer
from curation.manifest import ReferenceInfo, ShardManifest, StageShard
from tests.test_trainer import MAX_LENGTH, pairs_frame, state_diff, tiny_model, with_reference
from training.config import TrainConfig
from training.stages import COMPLETE, REFERENCE_LOGPS_FILE, train_stages
from training.trainer import REF_COLUMNS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PAIRS_PER_STAGE = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def shard_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two stages of 32 pairs; every pair carries the base model's log-probs, as curation scores them."""
    root = tmp_path_factory.mktemp("run") / "shards"
    root.mkdir()
    model, tokenizer = load_model(model_dir, device="cpu"), load_tokenizer(model_dir)
    entries = []
    for stage in (1, 2):
        frame = with_reference(pairs_frame(PAIRS_PER_STAGE, seed=20 + stage), model, tokenizer)
        frame.select("prompt", "chosen", "rejected", *REF_COLUMNS, "pair_id").write_parquet(root / f"stage-{stage}.parquet")
        path = root / f"stage-{stage}.parquet"
        entries.append(StageShard(stage=stage, path=path.name, rows=frame.height, bytes=path.stat().st_size,
                                  sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    reference = ReferenceInfo(model=str(model_dir), tokenizer=str(model_dir), max_length=MAX_LENGTH)
    ShardManifest(run_id="run-stages-test", reference=reference, stages=entries,
                  columns=["prompt", "chosen", "rejected", *REF_COLUMNS, "pair_id"], ref_logps_included=True).write(root)
    return root


def config(**overrides: Any) -> TrainConfig:
    settings = {"objective": "dpo", "batch_size": 8, "logging_steps": 2,
                "learning_rate": 1e-3, "num_epochs": 1.0}
    return TrainConfig(**{**settings, **overrides})


def stage_frame(shard_dir: Path, stage: int) -> pl.DataFrame:
    return pl.read_parquet(shard_dir / f"stage-{stage}.parquet")


def scored_by(model_path: Path, frame: pl.DataFrame) -> pl.DataFrame:
    """The stage's pairs scored directly by the fast scorer with the model at model_path."""
    return with_reference(frame, load_model(model_path, device="cpu"), load_tokenizer(model_path))


def max_gap(a: pl.DataFrame, b: pl.DataFrame) -> float:
    assert a["pair_id"].to_list() == b["pair_id"].to_list()
    return max((a[c] - b[c]).abs().max() for c in REF_COLUMNS)


def files_digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir()) if p.is_file()}


class StartWeights(TrainerCallback):
    """The weights each stage's trainer starts from (one entry per train() call)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:  # noqa: ANN001
        self.states.append({k: v.detach().clone() for k, v in model.state_dict().items()})


class Crash(TrainerCallback):
    """Raises at a given global step: a process killed in the middle of a stage."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001
        if state.global_step >= self.at_step:
            raise RuntimeError("simulated crash")


def test_stage_two_is_referenced_against_stage_one_model(model_dir: Path, shard_dir: Path, tmp_path: Path) -> None:
    rows: dict[int, list[dict[str, Any]]] = {}
    starts = StartWeights()
    results = train_stages(shard_dir, model_dir, tmp_path, config(), metrics_sink=rows.__setitem__,
                           callbacks=[starts], progress=False)

    assert [(r.stage, r.reference_source, r.resumed) for r in results] == [(1, "curation", False),
                                                                          (2, "recomputed", False)]
    stage1_model = tmp_path / "stage-1" / "model"
    # stage 1 trained against the curated log-probs, unchanged
    ref1 = pl.read_parquet(tmp_path / "stage-1" / REFERENCE_LOGPS_FILE)
    assert ref1.equals(stage_frame(shard_dir, 1).select("pair_id", *REF_COLUMNS))
    # stage 2's reference log-probs are the stage-1 model's (the fast scorer run on it directly) ...
    ref2 = pl.read_parquet(tmp_path / "stage-2" / REFERENCE_LOGPS_FILE)
    assert max_gap(ref2, scored_by(stage1_model, stage_frame(shard_dir, 2))) < 1e-4
    # ... and not the base model's, which the shard carries: stage 1 moved them well beyond 1e-4
    assert max_gap(ref2, stage_frame(shard_dir, 2)) > 1e-2
    # stage 2 also starts from the stage-1 model, with a fresh learning-rate schedule
    assert len(starts.states) == 2
    assert state_diff(starts.states[0], load_model(model_dir, device="cpu").state_dict()) == 0
    assert state_diff(starts.states[1], load_model(stage1_model, device="cpu").state_dict()) == 0
    assert state_diff(starts.states[1], starts.states[0]) > 1e-4
    lrs = {stage: [r["learning_rate"] for r in stage_rows] for stage, stage_rows in rows.items()}
    assert sorted(lrs) == [1, 2] and len(lrs[1]) == 2 and lrs[2] == pytest.approx(lrs[1])
    for stage in (1, 2):
        summary = json.loads((tmp_path / f"stage-{stage}" / "stage.json").read_text())
        assert summary["pairs"] == PAIRS_PER_STAGE and (tmp_path / f"stage-{stage}" / COMPLETE).is_file()


def test_resume_after_crash_in_stage_two(model_dir: Path, shard_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real_train_stage = stages.train_stage
    calls: list[int] = []

    def crashing(stage: int, *args: Any, callbacks: Any = (), **kwargs: Any) -> Any:
        calls.append(stage)
        if stage == 2:  # dies after its reference pass, two steps into training
            callbacks = [*callbacks, Crash(at_step=2)]
        return real_train_stage(stage, *args, callbacks=callbacks, **kwargs)

    monkeypatch.setattr(stages, "train_stage", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_stages(shard_dir, model_dir, tmp_path, config(), progress=False)
    assert calls == [1, 2]
    assert (tmp_path / "stage-1" / COMPLETE).is_file()
    assert (tmp_path / "stage-2" / REFERENCE_LOGPS_FILE).is_file()  # a half-done stage 2 is left behind
    assert not (tmp_path / "stage-2" / COMPLETE).exists() and not (tmp_path / "stage-2" / "model").exists()
    stage1_files = files_digest(tmp_path / "stage-1" / "model")

    def counting(stage: int, *args: Any, **kwargs: Any) -> Any:
        calls.append(stage)
        return real_train_stage(stage, *args, **kwargs)

    calls.clear()
    monkeypatch.setattr(stages, "train_stage", counting)
    results = train_stages(shard_dir, model_dir, tmp_path, config(), progress=False)

    assert calls == [2]  # stage 1 was not trained again
    assert [(r.stage, r.resumed) for r in results] == [(1, True), (2, False)]
    assert results[0].reference_source == "curation" and results[1].reference_source == "recomputed"
    assert results[0].model_dir == tmp_path / "stage-1" / "model"
    assert files_digest(tmp_path / "stage-1" / "model") == stage1_files  # bytes and mtimes untouched
    assert (tmp_path / "stage-2" / COMPLETE).is_file()
    ref2 = pl.read_parquet(tmp_path / "stage-2" / REFERENCE_LOGPS_FILE)
    assert max_gap(ref2, scored_by(tmp_path / "stage-1" / "model", stage_frame(shard_dir, 2))) < 1e-4
    stage2_files = files_digest(tmp_path / "stage-2" / "model")

    # a third run finds both stages complete and trains nothing
    calls.clear()
    again = train_stages(shard_dir, model_dir, tmp_path, config(), progress=False)
    assert calls == [] and [r.resumed for r in again] == [True, True]
    assert files_digest(tmp_path / "stage-2" / "model") == stage2_files


def test_max_stages_trains_only_the_first(model_dir: Path, shard_dir: Path, tmp_path: Path) -> None:
    results = train_stages(shard_dir, model_dir, tmp_path, config(max_stages=1, objective="minor-dpo"),
                           progress=False)
    assert [(r.stage, r.objective) for r in results] == [(1, "minor-dpo")]
    assert not (tmp_path / "stage-2").exists()


@pytest.mark.slow
def test_winnow_train_cli_trains_both_stages(model_dir: Path, shard_dir: Path, tmp_path: Path) -> None:
    """`winnow train --shards RUN_DIR --objective beta-dpo` end to end (a Prefect flow with its temporary server: ~40 s on 2 cores)."""
    run_dir = shard_dir.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WINNOW_NO_PROGRESS": "1"}
    cmd = [str(Path(sys.executable).parent / "winnow"), "train", "--shards", str(run_dir), "--objective", "beta-dpo",
           "--model", str(model_dir), "-w", str(tmp_path), "--set", "eval.enabled=false",
           "--set", "train.batch_size=8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    completes = sorted(p.parent.name for p in (tmp_path / "run-stages-test" / "train").glob("*/stage-*/COMPLETE"))
    assert completes == ["stage-1", "stage-2"], proc.stdout[-3000:]
    assert "beta-dpo" in proc.stdout and "recomputed" in proc.stdout


def test_training_takes_its_token_budget_from_the_manifest(model_dir: Path, shard_dir: Path) -> None:
    """One owner: unset TrainConfig lengths mean curation's; a different max_length is honoured and recomputes."""
    manifest = ShardManifest.load(shard_dir)
    inherited = stages.training_lengths(config(), manifest)
    assert inherited == stages.TrainingLengths(MAX_LENGTH, "keep_start")
    frame = stage_frame(shard_dir, 1)
    assert stages._reference_plan(frame, 1, model_dir, model_dir, manifest, config(), inherited) == "curation"
    other = stages.training_lengths(config(max_length=MAX_LENGTH // 2), manifest)
    assert other.max_length == MAX_LENGTH // 2
    assert stages._reference_plan(frame, 1, model_dir, model_dir, manifest, config(), other) == "recomputed"
