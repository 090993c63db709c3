"""Tests for training/trainer.py: WinnowDPOTrainer against TRL, every preset, and 2-process beta-DPO.

Models are tiny and built here (a 1-layer winnow-tiny with a 10-step warm-up, or its copy with
perturbed weights), data is the synthetic sorting set, and every run is a handful of steps on the
CPU, so the module takes seconds (the distributed test ~20 s: two fresh Python processes).
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch
from transformers import TrainerCallback

from curation.lm.loading import load_model, load_tokenizer
from training.config import TrainConfig
from training.models import build_default_model
from training.objectives import PRESETS, Objective
from training.sorting import PreferenceSetConfig, generate_preferences
from training.stages import REFERENCE_LOGPS_FILE, train_stage
from training.tiny_config import TinyModelConfig
from training.trainer import REF_COLUMNS, WinnowDPOTrainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, sft_steps=10)
MAX_LENGTH = 128  # scoring and training must agree, or reused log-probs would be other numbers


# ------------------------------------------------------------------ helpers (test_stages uses them)


def pairs_frame(n: int, seed: int) -> pl.DataFrame:
    """n synthetic preference pairs in the shard layout (prompt, chosen, rejected, pair_id)."""
    frame = generate_preferences(PreferenceSetConfig(size=n + n // 4 + 8, seed=seed)).head(n)
    assert frame.height == n
    return frame.select("prompt", "chosen", "rejected").with_columns(
        pair_id=pl.format("s{}-{}", pl.lit(seed), pl.int_range(pl.len()))
    )


def tiny_model(workdir: Path, seed: int = 3) -> Path:
    """A 1-layer winnow-tiny (own BPE tokenizer, 10 warm-up steps) saved under workdir."""
    frame = generate_preferences(PreferenceSetConfig(size=240, seed=seed))
    return build_default_model(frame["prompt"].to_list(), frame["chosen"].to_list(), workdir, TINY, progress=False)


def with_reference(frame: pl.DataFrame, model: Any, tokenizer: Any) -> pl.DataFrame:
    """frame plus ref_chosen_logps/ref_rejected_logps from the fast scorer, as curation writes them."""
    from curation.lm.logprobs import reference_logprobs

    ref = reference_logprobs(model, tokenizer, frame["prompt"].to_list(), frame["chosen"].to_list(),
                             frame["rejected"].to_list(), max_length=MAX_LENGTH, progress=False)
    return frame.drop(REF_COLUMNS, strict=False).hstack(ref.select(REF_COLUMNS))


def state_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


class LogRecorder(TrainerCallback):
    """Every training `on_log` dict of a Trainer run."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:  # noqa: ANN001 - TrainerCallback API
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def frame(model_dir: Path) -> pl.DataFrame:
    """64 pairs with reference log-probs of the model itself (stage 1 of an sDPO run)."""
    return with_reference(pairs_frame(64, seed=11), load_model(model_dir, device="cpu"), load_tokenizer(model_dir))


# --------------------------------------------------------------- reused == live reference


def _dpo_args(out: Path, precompute: bool, steps: int) -> Any:
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(out), per_device_train_batch_size=8, max_steps=steps, logging_steps=1,
        learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, max_length=MAX_LENGTH,
        loss_type=["sigmoid"], beta=0.1, precompute_ref_log_probs=precompute, seed=0, use_cpu=True,
        bf16=False,  # TRL's default is bf16 autocast even on the CPU: ~5e-4 nats per token off fp32
        report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )


def test_reused_reference_logps_give_the_live_reference_loss(model_dir: Path, tmp_path: Path) -> None:
    """Same policy, reference, batches and seed, three ways: TRL's DPOTrainer with a live reference
    model; WinnowDPOTrainer with the same live reference; WinnowDPOTrainer reading the reference
    log-probs the fast scorer wrote into the dataset. Per-step loss and rewards agree to 1e-5."""
    from datasets import Dataset
    from trl import DPOTrainer

    tokenizer = load_tokenizer(model_dir)
    reference = load_model(model_dir, device="cpu")
    policy = load_model(model_dir, device="cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # policy != reference, or every loss would start at log 2 whatever the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    pairs = pairs_frame(48, seed=5)
    plain = Dataset.from_polars(pairs.drop("pair_id"))
    reused = Dataset.from_polars(with_reference(pairs, reference, tokenizer).drop("pair_id"))
    steps = 4

    def run(trainer_cls: type, dataset: Any, precompute: bool, name: str, **kwargs: Any) -> tuple[list, dict]:
        recorder = LogRecorder()
        trainer = trainer_cls(model=copy.deepcopy(policy), args=_dpo_args(tmp_path / name, precompute, steps),
                              train_dataset=dataset, processing_class=tokenizer, callbacks=[recorder], **kwargs)
        trainer.train()
        return recorder.logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    dpo = Objective.from_preset("dpo")
    trl_logs, trl_state = run(DPOTrainer, plain, False, "trl", ref_model=copy.deepcopy(reference))
    live_logs, live_state = run(WinnowDPOTrainer, plain, False, "live", ref_model=copy.deepcopy(reference),
                                objective=copy.deepcopy(dpo))
    reuse_logs, reuse_state = run(WinnowDPOTrainer, reused, True, "reused", objective=copy.deepcopy(dpo))

    assert len(trl_logs) == len(live_logs) == len(reuse_logs) == steps
    # The reference matters here: at step 1 the loss is far from log 2 (policy == reference).
    assert abs(trl_logs[0]["loss"] - math.log(2)) > 1e-3
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        trl_curve = [row[key] for row in trl_logs]
        for other in (live_logs, reuse_logs):
            assert [row[key] for row in other] == pytest.approx(trl_curve, abs=1e-5, rel=0), key
    assert state_diff(trl_state, live_state) < 1e-5
    assert state_diff(trl_state, reuse_state) < 1e-4  # 4 Adam steps from ~1e-7 apart inputs
    assert state_diff(trl_state, policy.state_dict()) > 1e-4  # and training did move the weights


def test_reused_columns_skip_the_reference_pass(model_dir: Path, frame: pl.DataFrame, tmp_path: Path) -> None:
    """With the columns present, no reference forward runs: the dataset keeps the curated numbers
    (not recomputed ones) and TRL's precompute pass is never entered."""
    from datasets import Dataset
    from trl import DPOTrainer

    tokenizer = load_tokenizer(model_dir)
    marked = frame.with_columns(pl.col("ref_chosen_logps") - 1000.0)  # numbers no model would produce
    calls: list[str] = []
    original = DPOTrainer._precompute_ref_logps

    def spy(self, dataset, name, batch_size):  # noqa: ANN001, ANN202
        calls.append(name)
        return original(self, dataset, name, batch_size)

    DPOTrainer._precompute_ref_logps = spy
    try:
        trainer = WinnowDPOTrainer(model=load_model(model_dir, device="cpu"), args=_dpo_args(tmp_path, True, 1),
                                   train_dataset=Dataset.from_polars(marked.drop("pair_id")),
                                   processing_class=tokenizer, objective=Objective.from_preset("dpo"))
    finally:
        DPOTrainer._precompute_ref_logps = original
    assert calls == []
    assert trainer.train_dataset["ref_chosen_logps"] == pytest.approx(marked["ref_chosen_logps"].to_list())
    # and without the columns the trainer falls back to TRL's own pass
    DPOTrainer._precompute_ref_logps = spy
    try:
        WinnowDPOTrainer(model=load_model(model_dir, device="cpu"), args=_dpo_args(tmp_path / "b", True, 1),
                         train_dataset=Dataset.from_polars(frame.drop("pair_id", *REF_COLUMNS)),
                         processing_class=tokenizer, objective=Objective.from_preset("dpo"))
    finally:
        DPOTrainer._precompute_ref_logps = original
    assert calls == ["train"]


# ------------------------------------------------------------------------- every preset


@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_preset_trains_a_stage(preset: str, model_dir: Path, frame: pl.DataFrame, tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = []
    config = TrainConfig(objective=preset, batch_size=8, logging_steps=2, max_length=MAX_LENGTH,
                         learning_rate=1e-3, num_epochs=1)
    result = train_stage(1, frame, model_dir, tmp_path / "stage-1", config, None, reference_source="curation",
                         metrics_sink=lambda stage, r: rows.extend(r), progress=False)

    assert result.objective == preset and result.pairs == 64
    assert result.train_loss is not None and math.isfinite(result.train_loss)
    assert (tmp_path / "stage-1" / "COMPLETE").is_file()
    # the stage trained against the curated numbers it was handed, and saved them
    saved = pl.read_parquet(tmp_path / "stage-1" / REFERENCE_LOGPS_FILE)
    assert saved.equals(frame.select("pair_id", *REF_COLUMNS))
    # parameters moved
    trained = load_model(result.model_dir, device="cpu").state_dict()
    assert state_diff(trained, load_model(model_dir, device="cpu").state_dict()) > 1e-4
    # 64 pairs / 8 per step = 8 steps, logged every 2
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert {r["objective"] for r in rows} == {preset} and {r["stage"] for r in rows} == {1}
    for r in rows:
        for key in ("loss", "beta", "kept_fraction", "rewards_chosen", "rewards_margins", "logps_chosen"):
            assert r[key] is not None and math.isfinite(r[key]), (key, r)
    betas = [r["beta"] for r in rows]
    kept = [r["kept_fraction"] for r in rows]
    beta0 = PRESETS[preset].get("beta", Objective.beta)
    if preset == "beta-dpo":
        assert kept == pytest.approx([6 / 8] * 4)  # floor(8 * (1 - 0.2)) of 8 pairs per step
        # beta moves with the running gap statistics (the first steps, policy == reference, sit at beta0)
        assert len(set(betas)) > 1 and any(b != pytest.approx(beta0, abs=1e-4) for b in betas)
    else:
        assert kept == pytest.approx([1.0] * 4)
        assert betas == pytest.approx([beta0] * 4)


# -------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_beta_dpo_two_gloo_processes(model_dir: Path, frame: pl.DataFrame, tmp_path: Path) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine: two DDP processes on
    gloo (`--cpu --num_processes 2` would start ONE process in accelerate 1.x: its simple launcher
    only forks several through mpirun). Each rank records the gaps it had and the gaps the
    objective gathered; the running statistics, beta and kept set must come from both ranks."""
    data = tmp_path / "pairs.parquet"
    frame.write_parquet(data)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "tests" / "distributed_beta_dpo.py"),
           "--model", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "6",
           "--steps", "3", "--max-length", str(MAX_LENGTH)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    for r, rank in enumerate(ranks):
        assert (rank["rank"], rank["world_size"], rank["backend"]) == (r, 2, "gloo")
        assert rank["distributed_type"] == "MULTI_CPU"
    steps0, steps1 = ranks[0]["steps"], ranks[1]["steps"]
    assert len(steps0) == len(steps1) == 3
    obj = Objective.from_preset("beta-dpo")
    mean = std = 0.0
    for s0, s1 in zip(steps0, steps1, strict=True):
        assert len(s0["local_gaps"]) == len(s1["local_gaps"]) == 6
        both = s0["local_gaps"] + s1["local_gaps"]  # all_gather concatenates in rank order
        assert s0["gathered_gaps"] == pytest.approx(both, abs=1e-6)
        assert s1["gathered_gaps"] == pytest.approx(both, abs=1e-6)
        g = torch.tensor(both, dtype=torch.float64)
        mean = 0.9 * mean + 0.1 * g.mean().item()
        std = 0.9 * std + 0.1 * g.std().item()
        for s in (s0, s1):
            assert (s["gap_mean"], s["gap_std"]) == pytest.approx((mean, std), rel=1e-6, abs=1e-9)
        # one kept set over 12 pairs: floor(12 * 0.8) = 9, split unevenly across ranks (a per-rank
        # selection would keep floor(6 * 0.8) = 4 on each, 8 in all)
        kept = s0["mask"] + s1["mask"]
        assert sum(kept) == 9
        assert s0["beta"] == s1["beta"]
        kept_gaps = g[torch.tensor(kept, dtype=torch.bool)]
        expected_beta = max(obj.beta * (1 + obj.beta_alpha * (kept_gaps.mean().item() - mean)), obj.beta_min)
        assert s0["beta"] == pytest.approx(expected_beta, rel=1e-6)
    # the gaps really differ between ranks (each saw its own slice of the batch)
    assert steps0[0]["local_gaps"] != steps1[0]["local_gaps"]
    # DDP kept the replicas identical, and rank 0 logged the gathered kept fraction
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-9)
    assert [row["kept_fraction"] for row in ranks[0]["metrics"]] == pytest.approx([9 / 12] * 3)
    assert ranks[1]["metrics"] == []  # only the main process records train_metrics rows
