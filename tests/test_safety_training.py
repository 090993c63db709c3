"""Training trusts shards and checkpoints only as far as their recorded hashes: a truncated shard
is one line before polars sees it, a damaged stage checkpoint is retrained (with a log line)
instead of resumed into a SafetensorError, and `refresh` retrains completed stages."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from curation.errors import WinnowError
from curation.lm.loading import load_model
from tests.test_stages import config, model_dir, shard_dir  # noqa: F401 - the fixtures
from training.stages import train_stages


def copy_of(shard_dir: Path, tmp_path: Path) -> Path:  # noqa: F811
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    return out


def test_a_truncated_shard_is_refused_before_use(model_dir: Path, shard_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    shards = copy_of(shard_dir, tmp_path)
    shard = shards / "stage-1.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(WinnowError, match="does not match the size and sha256 its manifest recorded"):
        train_stages(shards, model_dir, tmp_path / "out", config(max_stages=1), progress=False)
    assert not (tmp_path / "out" / "stage-1" / "model").exists()


def test_an_edited_shard_of_the_same_size_is_refused(model_dir: Path, shard_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    shards = copy_of(shard_dir, tmp_path)
    shard = shards / "stage-1.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(WinnowError, match="sha256"):
        train_stages(shards, model_dir, tmp_path / "out", config(max_stages=1), progress=False)


def test_a_damaged_checkpoint_is_retrained_and_refresh_retrains(model_dir: Path, shard_dir: Path,  # noqa: F811
                                                               tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    settings = config(max_stages=1)
    first = train_stages(shard_dir, model_dir, out, settings, progress=False)
    assert [r.resumed for r in first] == [False]
    assert [r.resumed for r in train_stages(shard_dir, model_dir, out, settings, progress=False)] == [True]

    weights = out / "stage-1" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a checkpoint cut short
    with caplog.at_level(logging.WARNING, logger="training.stages"):
        again = train_stages(shard_dir, model_dir, out, settings, progress=False)
    assert [r.resumed for r in again] == [False]
    assert any("differs from the digest recorded" in r.getMessage() for r in caplog.records), caplog.text
    load_model(again[0].model_dir, device="cpu")  # the retrained checkpoint loads

    refreshed = train_stages(shard_dir, model_dir, out, settings, progress=False, refresh=True)
    assert [r.resumed for r in refreshed] == [False]
    assert [r.resumed for r in train_stages(shard_dir, model_dir, out, settings, progress=False)] == [True]
