"""The gym's arms, as a registry: each arm is a trainer registered under its name with its description.

An arm turns one seed's data into a trained policy under the seed's step budget and says how
many pairs it trained on. Adding an arm is one registration here (``@register_arm``); the
config, the runner, the tables and the report pick it up by name. ``ARMS`` lists them in
registration order (the order of the report's rows).

Every arm starts from the seed's SFT'd reference, with the same batch size, learning rate,
schedule and training seed; ``ArmRun.counter`` counts the optimizer steps it actually made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from training.gym.budget import epochs_for_steps, split_steps
from training.gym.prepare import TRAIN_COLUMNS

if TYPE_CHECKING:
    from training.gym.config import GymConfig
    from training.gym.prepare import SeedData


@dataclass
class ArmRun:
    """What an arm's trainer gets."""

    config: GymConfig
    data: SeedData
    raw: pl.DataFrame  # the seed's scored raw set: TRAIN_COLUMNS + margin, in input order
    out: Path  # the arm's own (empty) folder
    counter: Any  # a TrainerCallback counting optimizer steps; pass it to every Trainer


# An arm's trainer: (policy folder, pairs it trained on).
ArmTrainer = Callable[[ArmRun], tuple[Path, int]]


@dataclass(frozen=True)
class Arm:
    name: str
    description: str  # one line, shown in the report's setup
    train: ArmTrainer
    curation: str = "default"  # which curation of the seed's pairs it trains on (training.gym.prepare.CURATIONS)


_REGISTRY: dict[str, Arm] = {}

REFERENCE_DESCRIPTION = "the SFT'd start model itself (no preference training)"


def register_arm(name: str, description: str, curation: str = "default") -> Callable[[ArmTrainer], ArmTrainer]:
    """Register the decorated trainer as arm ``name`` (``curation``: the curation it trains on)."""

    def add(train: ArmTrainer) -> ArmTrainer:
        if name in _REGISTRY or name == "reference":
            raise ValueError(f"gym arm {name!r} is registered twice")
        _REGISTRY[name] = Arm(name, description, train, curation)
        return train

    return add


def check_arms(names: tuple[str, ...] | list[str]) -> None:
    """Fail in one line on names that are not registered arms."""
    unknown = sorted(set(names) - set(_REGISTRY))
    if unknown:
        raise ValueError(f"unknown gym arm(s) {unknown}; arms: {', '.join(_REGISTRY)}")


def get_arm(name: str) -> Arm:
    check_arms([name])
    return _REGISTRY[name]


# --------------------------------------------------------------------------------------------------
# The arms, in report order


@register_arm("trl-dpo", "TRL DPOTrainer, loss_type sigmoid, raw set")
def _trl_dpo(run: ArmRun) -> tuple[Path, int]:
    return _train_trl(run.config, run.data, run.raw.select(TRAIN_COLUMNS), run.out, run.counter), run.raw.height


@register_arm("winnow-curated", "the product's defaults: rules + beta-guided filter (joint policy: 20% dropped "
              "in all) + 2 sDPO stages + advised objective + online curation between the stages")
def _winnow_curated(run: ArmRun) -> tuple[Path, int]:
    return _train_curated(run, "default")


def _preset_arm(name: str, preset: str, description: str) -> None:
    """An objective preset alone on the raw set, one stage, through WinnowDPOTrainer."""

    def train(run: ArmRun) -> tuple[Path, int]:
        frames = [run.raw.select(TRAIN_COLUMNS)]
        return _train_staged(run.config, run.data, frames, preset, run.out, run.counter), run.raw.height

    register_arm(name, description)(train)


_preset_arm("dpop", "dpop", "DPOP (lambda 50, beta 0.1), raw set")
_preset_arm("ln-dpo", "ln-dpo", "LN-DPO (beta 2.0), raw set")
_preset_arm("minor-dpo", "minor-dpo", "MinorDPO (beta 0.1), raw set")
_preset_arm("beta-dpo", "beta-dpo", "beta-DPO (beta0 0.1, a 0.6, keeps 80% of each batch), raw set")


@register_arm("sdpo", "raw set in 2 margin-ordered stages, plain DPO")
def _sdpo(run: ArmRun) -> tuple[Path, int]:
    from curation.stage import StageConfig, assign_stages

    raw, k = run.raw, run.config.stages
    assigned = assign_stages(raw.with_columns(source=pl.lit("gym")), StageConfig(k=k))
    stages = [raw.join(assigned.filter(pl.col("stage") == i).select("pair_id", "stage_position"), on="pair_id")
              .sort("stage_position").select(TRAIN_COLUMNS) for i in range(1, k + 1)]
    return _train_staged(run.config, run.data, stages, "dpo", run.out, run.counter), raw.height


@register_arm("offline-filter", "curation's kept pairs (rules + beta filter), one stage, plain DPO")
def _offline_filter(run: ArmRun) -> tuple[Path, int]:
    kept = pl.read_parquet(run.data.kept_path)
    return _train_staged(run.config, run.data, [kept], "dpo", run.out, run.counter), kept.height


# Ablations of the curated arm: one part removed, moved or added at a time (the effect table in GYM.md).
def _curated_arm(name: str, description: str, curation: str, objective: str = "auto", online: bool | None = None) -> None:
    def train(run: ArmRun) -> tuple[Path, int]:
        return _train_curated(run, curation, objective=objective, online=online)

    register_arm(name, description, curation)(train)


_curated_arm("curated-no-filter", "winnow-curated without beta-guided filtering (no offline filter, beta-DPO keeps "
             "every pair; beta still adapts)", "no-filter")
_curated_arm("curated-in-batch", "winnow-curated with the 20% dropped in-batch instead (no offline filter, beta-DPO "
             "keeps 80% of each batch)", "no-offline-filter")
_curated_arm("curated-each", "winnow-curated with both filters at 80% each (~36% dropped, the policy `each`)", "each")
_curated_arm("curated-one-stage", "winnow-curated in one stage (no sDPO)", "one-stage")
_curated_arm("curated-dpo", "winnow-curated with plain DPO instead of the advised objective", "default", objective="dpo")
_curated_arm("curated-no-online", "winnow-curated without online curation between the stages (curation's "
             "decisions stand for every stage)", "default", online=False)

ARMS: tuple[str, ...] = tuple(_REGISTRY)
ARM_DESCRIPTIONS: dict[str, str] = {"reference": REFERENCE_DESCRIPTION,
                                    **{a.name: a.description for a in _REGISTRY.values()}}


# --------------------------------------------------------------------------------------------------
# Training paths the arms share


def step_counter():  # noqa: ANN202 - a TrainerCallback, defined lazily so importing this module stays light
    """Counts optimizer steps over one or more Trainer runs (sDPO stages add up)."""
    from transformers import TrainerCallback

    class StepCounter(TrainerCallback):
        def __init__(self) -> None:
            self.steps = 0
            self.runs: list[int] = []

        def on_train_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001 - TrainerCallback API
            self.steps += int(state.global_step)
            self.runs.append(int(state.global_step))

    return StepCounter()


def _train_config(config: GymConfig, objective: str, seed: int, epochs: float, **more: Any):  # noqa: ANN202
    from training.config import TrainConfig

    return TrainConfig(objective=objective, learning_rate=config.learning_rate, num_epochs=epochs,
                       batch_size=config.batch_size, max_length=config.max_length, seed=seed, logging_steps=5, **more)


def _train_trl(config: GymConfig, data: SeedData, frame: pl.DataFrame, out: Path, counter: Any) -> Path:
    """TRL's own DPOTrainer, untouched: loss_type sigmoid, its own reference log-prob pass."""
    from datasets import Dataset
    from trl import DPOTrainer

    from curation.lm.loading import load_model, load_tokenizer
    from training.stages import dpo_config

    tokenizer = load_tokenizer(data.model_path)
    train_config = _train_config(config, "dpo", data.seed, epochs_for_steps(data.steps, frame.height, config.batch_size))
    args = dpo_config(train_config, out / "trainer", beta=0.1)
    if list(args.loss_type) != ["sigmoid"]:
        raise RuntimeError(f"TRL's default loss is not sigmoid here: {args.loss_type}")
    trainer = DPOTrainer(model=load_model(data.model_path), args=args,
                         train_dataset=Dataset.from_polars(frame.select("prompt", "chosen", "rejected")),
                         processing_class=tokenizer, callbacks=[counter])
    trainer.train()
    final = out / "model"
    trainer.model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    return final


def _train_staged(config: GymConfig, data: SeedData, stages: list[pl.DataFrame], objective: str, out: Path,
                  counter: Any) -> Path:
    """sDPO as training.stages.train_stages runs it (stage k against stage k-1's model), with the
    step budget split over the stages exactly; stage 1 reuses the curated reference log-probs."""
    from training.stages import train_stage

    steps = split_steps(data.steps, [s.height for s in stages])
    current: str | Path = data.model_path
    for k, (frame, n_steps) in enumerate(zip(stages, steps, strict=True), start=1):
        train_config = _train_config(config, objective, data.seed,
                                     epochs_for_steps(n_steps, frame.height, config.batch_size))
        result = train_stage(k, frame, current, out / f"stage-{k}", train_config, None,
                             reference_source="curation" if k == 1 else "recomputed", callbacks=[counter],
                             progress=False)
        current = result.model_dir
    return Path(current)


def _train_curated(run: ArmRun, curation: str, objective: str = "auto",
                   online: bool | None = None) -> tuple[Path, int]:
    """The pipeline path: a curation's shards through train_stages (objective auto: the advice).

    train_stages takes one TrainConfig for all stages, so each stage gets ``budget // stages``
    steps (its epochs set from the largest stage; curation splits evenly): never more than the
    budget, at most ``stages - 1`` steps less. ``online``: TrainConfig.online_curation (None: the
    product default). Each arm trains against its own copy of the curation's catalog, so the rounds'
    ``decision_rounds`` of one arm never meet another's (or the seed catalog's evals writes).
    """
    from curation.manifest import ShardManifest
    from training.gym.prepare import copy_catalog
    from training.online import OnlineContext
    from training.stages import train_stages

    config, data = run.config, run.data
    variant = data.variants[curation]
    catalog = copy_catalog(variant.catalog_dir, run.out / "catalog")
    manifest = ShardManifest.load(variant.shard_dir)
    sizes = [s.rows for s in manifest.stages]
    per_stage = max(1, data.steps // len(sizes))
    epochs = epochs_for_steps(per_stage, max(sizes), config.batch_size)
    more = {} if online is None else {"online_curation": online}
    results = train_stages(variant.shard_dir, data.model_path, run.out,
                           _train_config(config, objective, data.seed, epochs, **more), callbacks=[run.counter],
                           progress=False, online=OnlineContext(catalog, data.run_id))
    return Path(results[-1].model_dir), sum(r.pairs for r in results)

