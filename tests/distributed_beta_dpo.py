"""A short beta-DPO run on two processes, launched by tests/test_trainer.py:

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/distributed_beta_dpo.py \
        --model DIR --data pairs.parquet --out DIR

On a machine without GPUs, accelerate's `--multi_gpu` launcher (torchrun) starts two processes and
`use_cpu=True` makes them a MULTI_CPU group on gloo. (`--cpu --num_processes 2` looks right but starts
a single process: accelerate 1.x forks CPU workers only through mpirun.) Each rank writes
rank<N>.json: per training step the gaps it computed, the gaps the objective gathered from every
rank, the running statistics, beta and its part of the kept mask; plus a checksum of its weights
and the train_metrics rows it recorded. The test checks them against each other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import training.objectives as objectives  # noqa: E402
from curation.lm.loading import load_model, load_tokenizer  # noqa: E402
from training.objectives import Objective  # noqa: E402
from training.trainer import MetricsRecorder, WinnowDPOTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="parquet with prompt/chosen/rejected and ref_*_logps")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=6, help="per process")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--perturb", type=float, default=0.05, help="policy != reference, so gaps are not ~0")
    args = parser.parse_args()

    from datasets import Dataset
    from trl import DPOConfig

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.model)
    policy = load_model(args.model, device="cpu")
    gen = torch.Generator().manual_seed(1)  # same perturbation on every rank
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(args.perturb * torch.randn(p.shape, generator=gen))
    frame = pl.read_parquet(args.data).drop("pair_id", strict=False)

    objective = Objective.from_preset("beta-dpo", seed=0)
    steps: list[dict[str, Any]] = []
    gather = objectives._gather

    def recording_gather(local: torch.Tensor) -> tuple[torch.Tensor, int]:
        everything, rank = gather(local)
        steps.append({"local_gaps": local.tolist(), "gathered_gaps": everything.tolist()})
        return everything, rank

    objectives._gather = recording_gather
    loss = objective.loss

    def recording_loss(*a: Any, **kw: Any) -> Any:
        out, stats = loss(*a, **kw)
        steps[-1].update(beta=float(stats["beta"]), mask=stats["mask"].tolist(), gap_mean=objective.gap_mean,
                         gap_std=objective.gap_std, update_stats=kw.get("update_stats", True))
        return out, stats

    objective.loss = recording_loss

    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    trainer = WinnowDPOTrainer(
        model=policy,
        args=DPOConfig(
            output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            logging_steps=1, learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0,
            max_length=args.max_length, precompute_ref_log_probs=True, beta=objective.beta, seed=0, use_cpu=True, bf16=False,
            ddp_backend="gloo", dataloader_drop_last=True, report_to=[], save_strategy="no", disable_tqdm=True,
        ),
        train_dataset=Dataset.from_polars(frame),
        processing_class=tokenizer,
        objective=objective,
        callbacks=[MetricsRecorder(1, objective.name, rows.extend)],
    )
    trainer.train()

    model = trainer.accelerator.unwrap_model(trainer.model)
    checksum = sum(float(p.detach().double().sum() + p.detach().double().pow(2).sum()) for p in model.parameters())
    state = trainer.accelerator.state
    result = {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "distributed_type": state.distributed_type.name,
        "steps": [s for s in steps if s.get("update_stats")],
        "param_checksum": checksum,
        "metrics": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result, default=str))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
