"""Train curated shards without Prefect, for `accelerate launch` (multi-GPU, FSDP, DeepSpeed).

    accelerate launch --config_file flows/recipes/accelerate_multi_gpu.yaml \\
        -m training.launch --shards runs/RUN_ID/shards --output runs/RUN_ID/train-multi

Every process runs the same sDPO loop; TRL/accelerate split the batches, beta-DPO gathers
its gap statistics across processes, and only the main process writes checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from curation.errors import WinnowError
from curation.manifest import ShardManifest
from training.config import TrainConfig
from training.stages import train_stages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, type=Path, help="Shard folder with manifest.json.")
    parser.add_argument("--output", required=True, type=Path, help="Where stage checkpoints go.")
    parser.add_argument("--model", default=None, help="Start/reference model; default: the one curation used.")
    parser.add_argument("--objective", default="auto", help="auto or a preset: dpo, dpop, ln-dpo, minor-dpo, beta-dpo.")
    parser.add_argument("--train-config", default="{}", help="JSON of TrainConfig fields, e.g. '{\"batch_size\": 8}'.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        fields = json.loads(args.train_config)
        config = TrainConfig(**{**fields, "objective": args.objective})
        manifest = ShardManifest.load(args.shards)
        model = args.model or manifest.reference.model
        if model is None:
            raise WinnowError("the manifest names no model; pass --model")
        results = train_stages(args.shards, model, args.output, config)
    except (WinnowError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for result in results:
        print(json.dumps({"stage": result.stage, "model_dir": str(result.model_dir), "pairs": result.pairs,
                          "objective": result.objective, "train_loss": result.train_loss, "resumed": result.resumed}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
