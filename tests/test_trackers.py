"""train.report_to reaches TRL: a real sDPO stage writes tensorboard event files with the DPO metrics,
and training reports its steps through curation.progress instead of tqdm and printed log dicts."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from curation.errors import WinnowError
from curation.progress import StepEvent, use_sink
from tests.test_stages import config, model_dir, shard_dir  # noqa: F401 - fixtures
from training.config import trackers
from training.stages import TRACKER_LOGS, train_stages


class RecordingBar:
    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def update(self, n: int = 1) -> None:
        self.record["done"] += n

    def set_postfix(self, **values: Any) -> None:
        self.record["postfix"].append(values)

    def close(self) -> None:
        self.record["closed"] = True


class RecordingSink:
    """A ProgressSink that keeps what it was told (thread-safe, as the protocol asks)."""

    def __init__(self) -> None:
        self.bars: list[dict[str, Any]] = []
        self.steps: list[StepEvent] = []
        self.lock = threading.Lock()

    def open_bar(self, description: str, total: int | None, unit: str) -> RecordingBar:
        record = {"description": description, "total": total, "unit": unit, "done": 0, "postfix": [], "closed": False}
        with self.lock:
            self.bars.append(record)
        return RecordingBar(record)

    def step(self, event: StepEvent) -> None:
        with self.lock:
            self.steps.append(event)


def _scalars(logs: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[float]] = {}
    for events in logs.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return found


def test_tensorboard_gets_the_dpo_metrics_and_the_sink_gets_the_steps(
    model_dir: Path, shard_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
    bars_on: None,
) -> None:
    pytest.importorskip("tensorboard", reason="the dev extra installs tensorboard")
    sink = RecordingSink()
    with use_sink(sink):
        results = train_stages(shard_dir, model_dir, tmp_path / "out", config(report_to="tensorboard", max_stages=1))
    logs = results[0].model_dir.parent / TRACKER_LOGS
    assert list(logs.rglob("events.out.tfevents.*")), f"no event files under {logs}"
    scalars = _scalars(logs)
    for tag in ("train/loss", "train/rewards/margins", "train/rewards/accuracies", "train/beta",
                "train/kept_fraction", "train/logps/chosen", "train/learning_rate"):
        assert scalars.get(tag), f"{tag} missing from the event files: {sorted(scalars)}"
    assert all(v == pytest.approx(0.1) for v in scalars["train/beta"])  # dpo's beta, logged as is
    # progress: one bar for the stage's optimizer steps, filled, closed, with the loss beside it
    training = [b for b in sink.bars if b["description"].startswith("train stage 1")]
    assert len(training) == 1 and training[0]["unit"] == "step"
    assert training[0]["total"] and training[0]["done"] == training[0]["total"] and training[0]["closed"]
    assert any("loss" in p for p in training[0]["postfix"])
    out = capsys.readouterr()  # no printed log dicts, no tqdm bar of the steps (library bars are the display's)
    assert "{'loss'" not in out.out + out.err and f"/{training[0]['total']} [" not in out.err


def test_report_to_parsing_and_missing_trackers() -> None:
    assert trackers("none") == [] and trackers([]) == [] and trackers("all") == ["all"]
    assert trackers("tensorboard") == trackers(["tensorboard"]) == ["tensorboard"]
    from transformers.integrations import get_available_reporting_integrations

    if "wandb" in get_available_reporting_integrations():
        pytest.skip("wandb is installed here")
    with pytest.raises(WinnowError, match="wandb not installed"):
        trackers("tensorboard, wandb")


def test_report_to_is_a_documented_setting() -> None:
    from curation.config_fields import help_of
    from training.config import TrainConfig

    assert TrainConfig().report_to == "none"
    assert "tensorboard" in help_of(TrainConfig, "report_to")
