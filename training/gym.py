"""The preference gym: every method side by side on a task whose truth is known.

Why a gym: the five papers report gains on large models judged by humans or GPT-4, which
cannot run here. The sorting task (training/sorting.py) has an exact gold reward, planted
pathologies with hidden truth columns (flipped labels, verbose chosen sides, one-swap
low-edit pairs) and a tiny model that learns it on a CPU, so each claim can be checked.

One experiment, per seed:

1. data: one preference set (``PreferenceSetConfig``: label noise, verbosity bias, low-edit
   share, ...) written as JSONL and ingested into a per-seed catalog, like any user data;
2. reference: one SFT'd winnow-tiny model per seed, built from that seed's pairs exactly as
   the pipeline builds it (prompt -> chosen warm-up); every arm of the seed starts from it
   and is measured against it;
3. scoring and curation: the real ``score_run`` (ratings margin, reference log-probs) and
   ``curate`` (rules, beta-guided filter, 2 sDPO stages, advice); the filter's drops are
   scored against the hidden ``is_flipped`` column (precision, recall);
4. arms, all under the same budget of optimizer steps (see :func:`budget_steps`):

   - ``trl-dpo``: TRL's own ``DPOTrainer`` (loss_type sigmoid) on the raw set;
   - ``winnow-curated``: filter + sDPO stages + advised objective (``train_stages``, auto);
   - ``dpop``, ``ln-dpo``, ``minor-dpo``, ``beta-dpo``: each preset alone on the raw set;
   - ``sdpo``: the raw set in 2 margin-ordered stages (easy first), plain DPO;
   - ``offline-filter``: curation's kept pairs in one stage, plain DPO;

5. evaluation: ``training.evaluate.evaluate`` on one held-out set shared by all seeds and
   arms (prompts and clean pairs disjoint from every seed's training prompts); rows go to
   the seed catalog's ``evals`` table (model = arm name).

Budget: every arm of a seed makes the same number of optimizer steps, ``epochs`` passes
over the raw set at ``batch_size``. Arms that train on fewer pairs (the filtered ones) see
their pairs a little more often; staged arms split the steps over their stages in
proportion to stage size. Same batch size, learning rate, schedule and training seed for
all arms, so the raw-set arms also see the batches in the same order.

Work runs in ``workers`` spawned processes (one torch thread each: the tiny model does not
gain from a second thread, and two threads thrash on shared cores); ``workers=0`` runs in
this process (tests). The module is a plain library: no Prefect.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from training.models import TinyModelConfig
from training.sorting import TRUTH_COLUMNS, PreferenceSetConfig, generate_preferences

ARMS: tuple[str, ...] = (
    "trl-dpo",
    "winnow-curated",
    "dpop",
    "ln-dpo",
    "minor-dpo",
    "beta-dpo",
    "sdpo",
    "offline-filter",
)
ARM_DESCRIPTIONS: dict[str, str] = {
    "reference": "the SFT'd start model itself (no preference training)",
    "trl-dpo": "TRL DPOTrainer, loss_type sigmoid, raw set",
    "winnow-curated": "rules + beta-guided filter + 2 sDPO stages + advised objective",
    "dpop": "DPOP (lambda 50, beta 0.1), raw set",
    "ln-dpo": "LN-DPO (beta 2.0), raw set",
    "minor-dpo": "MinorDPO (beta 0.1), raw set",
    "beta-dpo": "beta-DPO (beta0 0.1, a 0.6, rho 0.2), raw set",
    "sdpo": "raw set in 2 margin-ordered stages, plain DPO",
    "offline-filter": "curation's kept pairs (rules + beta filter), one stage, plain DPO",
}
# Arm -> objective preset, for the arms trained through WinnowDPOTrainer.
_PRESET = {"dpop": "dpop", "ln-dpo": "ln-dpo", "minor-dpo": "minor-dpo", "beta-dpo": "beta-dpo",
           "sdpo": "dpo", "offline-filter": "dpo"}

# Metrics of the main table, in order, with their headers.
TABLE_METRICS: dict[str, str] = {
    "gold_reward": "gold reward",
    "gold_reward_sampled": "gold reward (T=1)",
    "win_rate": "win rate vs ref",
    "len_tokens": "length (greedy, tok)",
    "filler_rate": "filler share (greedy)",
    "len_tokens_sampled": "length (T=1, tok)",
    "filler_rate_sampled": "filler share (T=1)",
    "implicit_acc": "implicit acc",
    "chosen_drift": "chosen drift",
    "chosen_drift_low_edit": "drift low-edit",
    "chosen_drift_high_edit": "drift high-edit",
    "kl": "KL(pi||ref)",
}
PLOT_METRICS: tuple[str, ...] = (
    "gold_reward", "gold_reward_sampled", "win_rate", "len_tokens", "filler_rate",
    "len_tokens_sampled", "implicit_acc", "chosen_drift_low_edit", "chosen_drift_high_edit", "kl",
)
NOTES_MARKER = "<!-- notes: everything below this line is kept when the gym rewrites this file -->"
_LETTER = re.compile(r"[A-Za-z]")


# --------------------------------------------------------------------------------------------------
# Configuration


def _default_learning_rate() -> float:
    from training.config import TrainConfig

    return TrainConfig().learning_rate


@dataclass(frozen=True)
class GymConfig:
    """Everything one gym run depends on; ``to_dict`` is recorded next to the results."""

    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ARMS
    # the preference set (one per seed, seed = the gym seed)
    size: int = 2400
    label_noise: float = 0.2
    verbosity_bias: float = 0.3
    low_edit_share: float = 0.3
    margin_spread: float = 1.0
    rating_noise: float = 0.15
    # training: the budget is epochs passes over the raw set, in optimizer steps
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = field(default_factory=lambda: _default_learning_rate())  # the product default
    max_length: int = 128
    stages: int = 2
    # evaluation (one held-out set for all seeds)
    eval_prompts: int = 300
    eval_pairs: int = 400
    eval_beta: float = 0.1
    max_new_tokens: int = 24
    eval_seed: int = 0
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    workers: int = 2

    def __post_init__(self) -> None:
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            raise ValueError(f"unknown gym arm(s) {unknown}; arms: {', '.join(ARMS)}")
        if not self.seeds:
            raise ValueError("the gym needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")

    def preference_config(self, seed: int) -> PreferenceSetConfig:
        return PreferenceSetConfig(size=self.size, seed=seed, label_noise=self.label_noise,
                                   verbosity_bias=self.verbosity_bias, low_edit_share=self.low_edit_share,
                                   margin_spread=self.margin_spread, rating_noise=self.rating_noise)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seeds"], out["arms"] = list(self.seeds), list(self.arms)
        return out

    @classmethod
    def quick(cls, **overrides: Any) -> GymConfig:
        """A cut-down gym for tests and smoke runs: small set, small model, few steps (not for claims)."""
        tiny = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, sft_steps=40,
                               sft_batch_size=16)
        base = {"seeds": (0,), "size": 160, "eval_prompts": 12, "eval_pairs": 16, "max_new_tokens": 12,
                "batch_size": 16, "tiny": tiny, "workers": 0}
        return cls(**{**base, **overrides})


def batches(pairs: int, batch_size: int) -> int:
    """Optimizer steps of one pass over ``pairs`` (the last batch may be short, as in the Trainer)."""
    return max(1, math.ceil(pairs / batch_size))


def budget_steps(raw_pairs: int, config: GymConfig) -> int:
    """The per-seed budget: ``epochs`` passes over the raw set, in optimizer steps."""
    return max(1, math.ceil(config.epochs * batches(raw_pairs, config.batch_size)))


def epochs_for_steps(steps: int, pairs: int, batch_size: int) -> float:
    """``num_train_epochs`` that makes the HF Trainer run exactly ``steps`` optimizer steps.

    The Trainer runs ``ceil(epochs * batches)`` steps; asking for ``steps - 0.5`` batches' worth
    lands strictly inside the right integer, so float rounding cannot add a step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return (steps - 0.5) / batches(pairs, batch_size)


def split_steps(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` steps over stages in proportion to their sizes (largest remainder, each >= 1)."""
    sizes = [max(0, int(s)) for s in sizes]
    if not sizes or sum(sizes) == 0:
        raise ValueError("split_steps needs at least one non-empty stage")
    if total < len(sizes):
        raise ValueError(f"{total} steps cannot cover {len(sizes)} stages")
    exact = [total * s / sum(sizes) for s in sizes]
    out = [max(1, math.floor(x)) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    i = 0
    while sum(out) < total:
        out[order[i % len(order)]] += 1
        i += 1
    while sum(out) > total:  # only when the floor of 1 pushed a tiny stage up
        j = max(range(len(out)), key=lambda k: out[k])
        out[j] -= 1
    return out


# --------------------------------------------------------------------------------------------------
# Small metric helpers (pure; tested on hand-made numbers)


def filter_quality(dropped: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """Precision and recall of a set of drops against the truth: which pairs were flipped.

    precision = flipped among dropped / dropped, recall = flipped among dropped / flipped.
    NaN when undefined (nothing dropped, nothing flipped).
    """
    dropped = np.asarray(dropped, dtype=bool)
    flipped = np.asarray(flipped, dtype=bool)
    if dropped.shape != flipped.shape:
        raise ValueError(f"shapes differ: {dropped.shape} vs {flipped.shape}")
    hits = int(np.sum(dropped & flipped))
    n_drop, n_flip = int(dropped.sum()), int(flipped.sum())
    return {
        "dropped": n_drop,
        "flipped": n_flip,
        "flipped_dropped": hits,
        "precision": hits / n_drop if n_drop else math.nan,
        "recall": hits / n_flip if n_flip else math.nan,
        "flipped_share_before": n_flip / dropped.size if dropped.size else math.nan,
        "flipped_share_after": (n_flip - hits) / (dropped.size - n_drop) if dropped.size > n_drop else math.nan,
    }


def has_filler(responses: Sequence[str]) -> np.ndarray:
    """True where a sorting response carries words (a filler phrase), not only numbers."""
    return np.array([bool(_LETTER.search(r)) for r in responses], dtype=bool)


def summarise(per_seed: pl.DataFrame, metrics: Sequence[str]) -> pl.DataFrame:
    """Mean, sample std (ddof 1; null for one seed), min and max across seeds, per arm and metric."""
    present = [m for m in metrics if m in per_seed.columns]
    long = per_seed.unpivot(index=["arm", "seed"], on=present, variable_name="metric", value_name="value")
    return (long.drop_nulls("value").group_by("arm", "metric", maintain_order=True)
            .agg(mean=pl.col("value").mean(), std=pl.col("value").std(ddof=1), min=pl.col("value").min(),
                 max=pl.col("value").max(), seeds=pl.len()))


# --------------------------------------------------------------------------------------------------
# Per-seed preparation: data, reference, scoring, curation


@dataclass
class SeedData:
    """Paths and numbers one seed's arms need (picklable: it crosses process boundaries)."""

    seed: int
    dir: Path
    run_id: str
    model_path: str
    raw_path: Path  # scored raw pairs with reference log-probs and margin (what raw-set arms train on)
    kept_path: Path  # curation's kept pairs, same columns
    shard_dir: Path  # curation's staged shards + manifest
    raw_pairs: int
    kept_pairs: int
    steps: int
    advice: dict[str, Any]
    filter: dict[str, Any]
    quarantined: int
    seconds: dict[str, float]
    reference_eval: dict[str, float] = field(default_factory=dict)
    reference_rows: pl.DataFrame | None = None


_TRAIN_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")


def _seed_dir(workdir: Path, seed: int) -> Path:
    return Path(workdir) / f"seed-{seed}"


def prepare_seed(config: GymConfig, seed: int, workdir: Path, heldout_dir: Path) -> SeedData:
    """Generate, ingest, build the reference, score, curate; measure the filter against the truth."""
    import torch

    from curation.decide import CurateConfig, curate
    from curation.ingest import ingest
    from curation.lm.loading import load_model, load_tokenizer, torch_threads
    from curation.score.scoring import ScoreOptions, ScoringModels, score_run
    from curation.stage import StageConfig
    from curation.store import Catalog
    from training.models import build_default_model

    seconds: dict[str, float] = {}
    out = _seed_dir(workdir, seed)
    out.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    truth = generate_preferences(config.preference_config(seed))
    source = out / "pairs.jsonl"
    truth.drop(TRUTH_COLUMNS).write_ndjson(source)  # the pipeline sees what a user's file would hold
    catalog = Catalog(out)
    ingested = ingest([str(source)], catalog, run_id=f"gym-seed{seed}", progress=False)
    run_id = ingested.run_id
    pairs = catalog.query("SELECT pair_id, prompt, chosen FROM pairs WHERE run_id = ? ORDER BY source_row",
                          [run_id], read_only=False)
    seconds["data"] = time.perf_counter() - tick

    tick = time.perf_counter()
    model_path = str(build_default_model(pairs["prompt"].to_list(), pairs["chosen"].to_list(), out, config.tiny,
                                         progress=False))
    seconds["reference_sft"] = time.perf_counter() - tick

    tick = time.perf_counter()
    with torch_threads(1):
        tokenizer, reference = load_tokenizer(model_path), load_model(model_path)
        models = ScoringModels(tokenizer, model_path, reference=reference)
        score_run(catalog, run_id, models, ScoreOptions(max_length=config.max_length), progress=False)
    seconds["score"] = time.perf_counter() - tick

    tick = time.perf_counter()
    curated = curate(catalog, run_id, CurateConfig(stages=StageConfig(k=config.stages), report=False))
    seconds["curate"] = time.perf_counter() - tick

    frame = catalog.query(
        """SELECT p.pair_id, p.prompt, p.chosen, p.rejected, s.ref_chosen_logps, s.ref_rejected_logps, s.margin,
                  d.kept, d.reason, d.stage
           FROM pairs p JOIN scores s USING (run_id, pair_id) JOIN decisions d USING (run_id, pair_id)
           WHERE p.run_id = ? ORDER BY p.source_row""", [run_id], read_only=False)
    keys = ["prompt", "chosen", "rejected"]
    joined = frame.join(truth.select(*keys, "is_flipped").unique(keys, keep="first", maintain_order=True),
                        on=keys, how="left")
    if joined["is_flipped"].null_count():
        raise RuntimeError(f"seed {seed}: {joined['is_flipped'].null_count()} ingested pairs lost their truth row")
    flipped = joined["is_flipped"].to_numpy().astype(bool)
    reason = joined["reason"].fill_null("")
    beta_drop = reason.str.starts_with("beta_outlier").to_numpy()
    low_drop = (reason == "beta_outlier_low").to_numpy()
    quality = filter_quality(beta_drop, flipped)
    quality["precision_low_tail"] = filter_quality(low_drop, flipped)["precision"]
    quality["recall_low_tail"] = filter_quality(low_drop, flipped)["recall"]
    quality["dropped_low_tail"] = int(low_drop.sum())
    quality["dropped_by_rules"] = int((~joined["kept"].to_numpy() & ~beta_drop).sum())
    quality["flipped_share_kept"] = float(flipped[joined["kept"].to_numpy()].mean())

    raw = frame.select(*_TRAIN_COLUMNS, "margin")
    raw_path, kept_path = out / "raw.parquet", out / "kept.parquet"
    raw.write_parquet(raw_path)
    frame.filter(pl.col("kept")).select(_TRAIN_COLUMNS).write_parquet(kept_path)

    data = SeedData(
        seed=seed, dir=out, run_id=run_id, model_path=model_path, raw_path=raw_path, kept_path=kept_path,
        shard_dir=Path(curated.shard_dir), raw_pairs=raw.height, kept_pairs=curated.kept,
        steps=budget_steps(raw.height, config), advice=curated.advice.to_dict(), filter=quality,
        quarantined=ingested.quarantined, seconds=seconds,
    )
    # the reference measured against itself: the baseline row (and a check: KL 0, win rate 0.5)
    tick = time.perf_counter()
    with torch_threads(1), torch.inference_mode():
        result = _evaluate(config, reference, reference, tokenizer, heldout_dir)
    data.reference_eval = dict(result.metrics)
    data.reference_rows = result.to_rows(run_id, "reference")
    seconds["reference_eval"] = time.perf_counter() - tick
    return data


# --------------------------------------------------------------------------------------------------
# Arms


def _step_counter():  # noqa: ANN202 - a TrainerCallback, defined lazily so importing this module stays light
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


def _train_config(config: GymConfig, objective: str, seed: int, epochs: float):  # noqa: ANN202 - TrainConfig
    from training.config import TrainConfig

    return TrainConfig(objective=objective, learning_rate=config.learning_rate, num_epochs=epochs,
                       batch_size=config.batch_size, max_length=config.max_length, seed=seed, logging_steps=5)


def _train_trl(config: GymConfig, data: SeedData, frame: pl.DataFrame, out: Path, counter: Any) -> Path:
    """TRL's own DPOTrainer, untouched: loss_type sigmoid, its own reference log-prob pass."""
    from datasets import Dataset
    from trl import DPOTrainer

    from curation.lm.loading import load_model, load_tokenizer
    from training.stages import _dpo_config

    tokenizer = load_tokenizer(data.model_path)
    train_config = _train_config(config, "dpo", data.seed, epochs_for_steps(data.steps, frame.height, config.batch_size))
    args = _dpo_config(train_config, out / "trainer", beta=0.1)
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


def _train_curated(config: GymConfig, data: SeedData, out: Path, counter: Any) -> Path:
    """The pipeline path: curated shards through train_stages with objective auto (the advice).

    train_stages takes one TrainConfig for all stages, so each stage gets ``budget // stages``
    steps (its epochs set from the largest stage; curation splits evenly): never more than the
    budget, at most ``stages - 1`` steps less.
    """
    from training.stages import ShardManifest, train_stages

    manifest = ShardManifest.load(data.shard_dir)
    sizes = [int(s["rows"]) for s in manifest.stages]
    per_stage = max(1, data.steps // len(sizes))
    epochs = epochs_for_steps(per_stage, max(sizes), config.batch_size)
    results = train_stages(data.shard_dir, data.model_path, out, _train_config(config, "auto", data.seed, epochs),
                           callbacks=[counter], progress=False)
    return Path(results[-1].model_dir)


def train_arm(config: GymConfig, data: SeedData, arm: str, heldout_dir: Path) -> dict[str, Any]:
    """Train one arm of one seed, evaluate it; returns its metrics and its `evals` rows."""
    import torch

    from curation.lm.loading import load_model, load_tokenizer, torch_threads
    from curation.stage import StageConfig, assign_stages

    out = data.dir / "arms" / arm
    shutil.rmtree(out, ignore_errors=True)  # train_stages would resume an earlier run's completed stages
    out.mkdir(parents=True)
    counter = _step_counter()
    started = time.perf_counter()
    raw = pl.read_parquet(data.raw_path)
    with torch_threads(1):
        if arm == "trl-dpo":
            policy_path, pairs = _train_trl(config, data, raw.select(_TRAIN_COLUMNS), out, counter), raw.height
        elif arm == "winnow-curated":
            policy_path, pairs = _train_curated(config, data, out, counter), data.kept_pairs
        elif arm == "sdpo":
            assigned = assign_stages(raw.with_columns(source=pl.lit("gym")), StageConfig(k=config.stages))
            stages = [raw.join(assigned.filter(pl.col("stage") == k).select("pair_id", "stage_position"), on="pair_id")
                      .sort("stage_position").select(_TRAIN_COLUMNS) for k in range(1, config.stages + 1)]
            policy_path, pairs = _train_staged(config, data, stages, "dpo", out, counter), raw.height
        elif arm == "offline-filter":
            kept = pl.read_parquet(data.kept_path)
            policy_path, pairs = _train_staged(config, data, [kept], "dpo", out, counter), kept.height
        else:
            policy_path, pairs = (_train_staged(config, data, [raw.select(_TRAIN_COLUMNS)], _PRESET[arm], out, counter),
                                  raw.height)
        train_seconds = time.perf_counter() - started

        tick = time.perf_counter()
        tokenizer = load_tokenizer(data.model_path)
        with torch.inference_mode():
            result = _evaluate(config, load_model(policy_path), load_model(data.model_path), tokenizer, heldout_dir)
        eval_seconds = time.perf_counter() - tick
    result.samples.write_parquet(out / "samples.parquet")
    return {
        "seed": data.seed, "arm": arm, "pairs": pairs, "steps": counter.steps, "stage_steps": counter.runs,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds, "metrics": dict(result.metrics),
        "rows": result.to_rows(data.run_id, arm), "policy": str(policy_path),
    }


def _evaluate(config: GymConfig, policy: Any, reference: Any, tokenizer: Any, heldout_dir: Path):  # noqa: ANN202
    """training.evaluate.evaluate plus three length/verbosity readings taken from its own samples:
    length and filler share of the temperature-1 samples (the KL draws) and filler share of the
    greedy responses. Greedy decoding hides a filler the policy emits a third of the time; the
    sampled length shows it."""
    from training.evaluate import evaluate
    from training.sorting import gold_reward

    prompts = json.loads((Path(heldout_dir) / "prompts.json").read_text())
    pairs = pl.read_parquet(Path(heldout_dir) / "pairs.parquet")
    result = evaluate(policy, reference, tokenizer, prompts, pairs, gold_reward=gold_reward, beta=config.eval_beta,
                      max_new_tokens=config.max_new_tokens, max_length=config.max_length, seed=config.eval_seed,
                      progress=False)
    samples = result.samples
    if samples.height:
        n = samples.height
        extra = {
            "len_tokens_sampled": float(samples["kl_tokens"].mean()),
            "filler_rate_sampled": float(has_filler(samples["kl_response"].to_list()).mean()),
            "filler_rate": float(has_filler(samples["response"].to_list()).mean()),
            "gold_reward_sampled": float(np.mean([gold_reward(p, r) for p, r in
                                                  zip(samples["prompt"], samples["kl_response"], strict=True)])),
        }
        for name, value in extra.items():
            result.metrics[name], result.counts[name] = value, n
    return result


# --------------------------------------------------------------------------------------------------
# Orchestration (processes, no Prefect)


def _worker_init(log_dir: str) -> None:
    """Spawned worker: one torch thread, quiet libraries, its output to a log file."""
    import logging
    import warnings

    _die_with_parent()
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("WINNOW_NO_PROGRESS", "1")
    log = open(Path(log_dir) / f"worker-{os.getpid()}.log", "a", buffering=1)  # noqa: SIM115 - lives with the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    logging.getLogger("datasets").setLevel(logging.ERROR)


def _die_with_parent() -> None:
    """Linux: have the kernel stop this worker when the gym process dies (kill, crash), so no
    orphaned worker keeps training; elsewhere a no-op."""
    import signal

    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Inline:
    """An executor that runs each call at once in this process (workers=0)."""

    def submit(self, fn: Callable[..., Any], *args: Any):  # noqa: ANN201 - a finished Future
        from concurrent.futures import Future

        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def build_heldout(config: GymConfig, out: Path) -> tuple[list[str], pl.DataFrame]:
    """One held-out set for every seed: prompts/pairs disjoint from all seeds' training prompts."""
    from training.evaluate import heldout_sorting_set

    exclude: list[str] = []
    for seed in config.seeds:
        exclude += generate_preferences(config.preference_config(seed))["prompt"].to_list()
    heldout = heldout_sorting_set(config.eval_prompts, config.eval_pairs, config.eval_seed,
                                  template=config.preference_config(config.seeds[0]), exclude_prompts=exclude)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.json").write_text(json.dumps(heldout.prompts))
    heldout.pairs.write_parquet(out / "pairs.parquet")
    return heldout.prompts, heldout.pairs


@dataclass
class GymResult:
    config: GymConfig
    per_seed: pl.DataFrame  # one row per (seed, arm): metrics, steps, pairs, seconds
    summary: pl.DataFrame  # arm, metric, mean, std, min, max, seeds
    seeds: list[SeedData]
    wall_seconds: float
    heldout: dict[str, Any]
    machine: dict[str, Any]

    def seed_data(self, seed: int) -> SeedData:
        return next(s for s in self.seeds if s.seed == seed)


def clear_previous(workdir: Path) -> list[Path]:
    """Remove what an earlier gym run left in ``workdir`` (seed folders, held-out set, logs, tables).

    Why: reference models are cached by content, so a second run would skip the SFT warm-up and
    report a shorter wall time than a fresh run takes. Only the gym's own outputs are removed.
    """
    workdir = Path(workdir)
    removed: list[Path] = []
    if not workdir.is_dir():
        return removed
    for path in sorted(workdir.iterdir()):
        ours = (path.is_dir() and re.fullmatch(r"seed-\d+", path.name) and (path / "pairs.jsonl").is_file()) or (
            path.name in ("heldout", "logs") and path.is_dir()) or (
            path.name in ("per_seed.csv", "summary.csv", "gym.json") and path.is_file())
        if ours:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed


def run_gym(config: GymConfig, workdir: Path, log: Callable[[str], None] = print, *, fresh: bool = True) -> GymResult:
    """Run every seed and arm; evals rows go to each seed's catalog. Returns the tables.

    ``fresh`` (default) first removes an earlier gym run's outputs from ``workdir`` so that
    every step, the reference SFT included, is measured; ``fresh=False`` reuses cached models.
    """
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from curation.store import Catalog

    workdir = Path(workdir)
    if fresh:
        clear_previous(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before = _loadavg()
    heldout_dir = workdir / "heldout"
    prompts, pairs = build_heldout(config, heldout_dir)
    log(f"held-out: {len(prompts)} prompts, {pairs.height} clean pairs ({int(pairs['is_low_edit'].sum())} low-edit)")

    if config.workers > 0:
        import multiprocessing

        log_dir = workdir / "logs"
        log_dir.mkdir(exist_ok=True)
        executor: Any = ProcessPoolExecutor(max_workers=config.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init, initargs=(str(log_dir),))
    else:
        executor = _Inline()

    def stamp() -> str:
        return f"[{time.perf_counter() - started:6.1f}s]"

    seeds: dict[int, SeedData] = {}
    arm_results: list[dict[str, Any]] = []
    try:
        pending = {executor.submit(prepare_seed, config, seed, workdir, heldout_dir): ("seed", seed, None)
                   for seed in config.seeds}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                kind, seed, arm = pending.pop(future)
                value = future.result()
                if kind == "seed":
                    seeds[seed] = value
                    f = value.filter
                    log(f"{stamp()} seed {seed}: {value.raw_pairs} pairs, reference built in "
                        f"{value.seconds['reference_sft']:.0f}s (gold {value.reference_eval.get('gold_reward', math.nan):.3f}); "
                        f"curation kept {value.kept_pairs}, filter precision {f['precision']:.2f} recall "
                        f"{f['recall']:.2f}; advice {value.advice['objective']} {value.advice['params']}; "
                        f"budget {value.steps} steps")
                    _write_rows(Catalog(value.dir), value.reference_rows)
                    for name in config.arms:
                        pending[executor.submit(train_arm, config, value, name, heldout_dir)] = ("arm", seed, name)
                else:
                    arm_results.append(value)
                    _write_rows(Catalog(seeds[seed].dir), value["rows"])
                    m = value["metrics"]
                    log(f"{stamp()} seed {seed} {arm:<15} {value['steps']:>4} steps  gold {m.get('gold_reward', math.nan):.3f}"
                        f"  win {m.get('win_rate', math.nan):.3f}  len {m.get('len_tokens', math.nan):5.2f}"
                        f"  drift(low) {m.get('chosen_drift_low_edit', math.nan):+.2f}  kl {m.get('kl', math.nan):.2f}"
                        f"  ({value['train_seconds']:.0f}s + {value['eval_seconds']:.0f}s)")
    finally:
        executor.shutdown(wait=True, cancel_futures=True)

    per_seed = _per_seed_frame(config, list(seeds.values()), arm_results)
    summary = summarise(per_seed, [*TABLE_METRICS, "rejected_drift", "implicit_margin", "steps", "pairs"])
    wall = time.perf_counter() - started
    machine = {"cpus": _cpus(), "workers": config.workers, "loadavg_before": load_before, "loadavg_after": _loadavg()}
    heldout = {"prompts": len(prompts), "pairs": pairs.height, "low_edit_pairs": int(pairs["is_low_edit"].sum()),
               "eval_seed": config.eval_seed}
    result = GymResult(config, per_seed, summary, [seeds[s] for s in config.seeds], wall, heldout, machine)
    _save_raw(result, workdir)
    return result


def _write_rows(catalog: Any, rows: pl.DataFrame | None) -> None:
    """Replace the (run_id, model) slice of `evals` with these rows (what write_evals does, from rows)."""
    if rows is None or rows.height == 0:
        return
    run_id, model = rows["run_id"][0], rows["model"][0]
    with catalog.transaction() as con:
        con.execute("DELETE FROM evals WHERE run_id = ? AND model = ?", [run_id, model])
        con.register("_gym_evals", rows.to_arrow())
        try:
            con.execute("INSERT INTO evals (run_id, model, metric, value, n, details) "
                        "SELECT run_id, model, metric, value, n, CAST(details AS JSON) FROM _gym_evals")
        finally:
            con.unregister("_gym_evals")


def _per_seed_frame(config: GymConfig, seeds: list[SeedData], arms: list[dict[str, Any]]) -> pl.DataFrame:
    rows: list[dict[str, Any]] = []
    for data in seeds:
        rows.append({"seed": data.seed, "arm": "reference", "pairs": 0, "steps": 0, "train_seconds": 0.0,
                     "eval_seconds": data.seconds.get("reference_eval", 0.0), **data.reference_eval})
    for r in arms:
        rows.append({"seed": r["seed"], "arm": r["arm"], "pairs": r["pairs"], "steps": r["steps"],
                     "train_seconds": r["train_seconds"], "eval_seconds": r["eval_seconds"], **r["metrics"]})
    order = {name: i for i, name in enumerate(("reference", *ARMS))}
    frame = pl.DataFrame(rows, infer_schema_length=None)
    return frame.with_columns(_o=pl.col("arm").replace_strict(order, default=99)).sort("_o", "seed").drop("_o")


def _save_raw(result: GymResult, workdir: Path) -> None:
    result.per_seed.write_csv(workdir / "per_seed.csv")
    result.summary.write_csv(workdir / "summary.csv")
    meta = {"config": result.config.to_dict(), "wall_seconds": result.wall_seconds, "machine": result.machine,
            "heldout": result.heldout,
            "seeds": [{"seed": s.seed, "run_id": s.run_id, "model": s.model_path, "raw_pairs": s.raw_pairs,
                       "kept_pairs": s.kept_pairs, "steps": s.steps, "advice": s.advice, "filter": s.filter,
                       "quarantined": s.quarantined, "seconds": s.seconds} for s in result.seeds]}
    (workdir / "gym.json").write_text(json.dumps(meta, indent=1, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------------
# Claims: pre-declared tests, computed from the numbers, never tuned


@dataclass
class Claim:
    name: str
    statement: str
    verdict: str  # reproduced | partly reproduced | not reproduced | not measured
    evidence: str


def _stat(summary: pl.DataFrame, arm: str, metric: str) -> tuple[float, float]:
    row = summary.filter((pl.col("arm") == arm) & (pl.col("metric") == metric))
    if row.height == 0:
        return math.nan, math.nan
    mean, std = row["mean"][0], row["std"][0]
    return float(mean), (float(std) if std is not None else math.nan)


def _per_seed_values(per_seed: pl.DataFrame, arm: str, metric: str) -> list[float]:
    if metric not in per_seed.columns:
        return []
    return [float(v) for v in per_seed.filter(pl.col("arm") == arm).sort("seed")[metric].to_list() if v is not None]


def _fmt_list(values: Sequence[float], digits: int = 3) -> str:
    return "[" + ", ".join(f"{v:+.{digits}f}" if digits and v < 0 else f"{v:.{digits}f}" for v in values) + "]"


def _spread(*stds: float) -> float:
    finite = [s for s in stds if s is not None and math.isfinite(s)]
    return max(finite) if finite else math.nan


def evaluate_claims(result: GymResult) -> list[Claim]:
    """The issue's four claims, each with a rule fixed before the numbers were seen:

    1. DPOP: mean low-edit chosen drift of trl-dpo < 0 and of dpop >= 0 (partly: dpop's above
       trl-dpo's by more than the seed spread but still below 0);
    2. LN-DPO: mean greedy length of ln-dpo below trl-dpo's by more than the seed spread, and
       its gold reward not below trl-dpo's by more than the spread;
    3. filter: mean precision of the beta filter's drops against is_flipped >= 0.8;
    4. curated: mean gold reward of winnow-curated above trl-dpo's by more than the seed spread.

    The spread of a comparison is the larger sample std (across seeds) of the two arms.
    """
    s, per_seed = result.summary, result.per_seed
    claims: list[Claim] = []
    arms = set(result.config.arms)

    if {"trl-dpo", "dpop"} <= arms:
        d, d_sd = _stat(s, "trl-dpo", "chosen_drift_low_edit")
        p, p_sd = _stat(s, "dpop", "chosen_drift_low_edit")
        dh, _ = _stat(s, "trl-dpo", "chosen_drift_high_edit")
        ph, _ = _stat(s, "dpop", "chosen_drift_high_edit")
        spread = _spread(d_sd, p_sd)
        if d < 0 <= p:
            verdict = "reproduced"
        elif d < 0 and p - d > spread:
            verdict = "partly reproduced"
        else:
            verdict = "not reproduced"
        claims.append(Claim(
            "dpop-low-edit", "On low-edit-distance pairs DPO drives the chosen log-prob below the reference; DPOP "
            "keeps it at or above.", verdict,
            f"chosen drift on held-out low-edit pairs: trl-dpo {d:+.3f} ± {d_sd:.3f} "
            f"(seeds {_fmt_list(_per_seed_values(per_seed, 'trl-dpo', 'chosen_drift_low_edit'))}), dpop {p:+.3f} ± "
            f"{p_sd:.3f} (seeds {_fmt_list(_per_seed_values(per_seed, 'dpop', 'chosen_drift_low_edit'))}); on "
            f"high-edit pairs trl-dpo {dh:+.3f}, dpop {ph:+.3f}."))
    else:
        claims.append(Claim("dpop-low-edit", "DPOP vs DPO on low-edit pairs", "not measured", "arm not run"))

    if {"trl-dpo", "ln-dpo"} <= arms:
        ld, ld_sd = _stat(s, "trl-dpo", "len_tokens")
        ll, ll_sd = _stat(s, "ln-dpo", "len_tokens")
        gd, gd_sd = _stat(s, "trl-dpo", "gold_reward")
        gl, gl_sd = _stat(s, "ln-dpo", "gold_reward")
        sd, _ = _stat(s, "trl-dpo", "len_tokens_sampled")
        sl, _ = _stat(s, "ln-dpo", "len_tokens_sampled")
        fd, _ = _stat(s, "trl-dpo", "filler_rate_sampled")
        fl, _ = _stat(s, "ln-dpo", "filler_rate_sampled")
        gfd, _ = _stat(s, "trl-dpo", "filler_rate")
        gfl, _ = _stat(s, "ln-dpo", "filler_rate")
        fr, _ = _stat(s, "reference", "filler_rate_sampled")
        lr_, _ = _stat(s, "reference", "len_tokens")
        shorter = ld - ll > _spread(ld_sd, ll_sd)
        no_loss = gl >= gd - _spread(gd_sd, gl_sd)
        verdict = "reproduced" if shorter and no_loss else ("partly reproduced" if (ll < ld and no_loss) else
                                                           "not reproduced")
        claims.append(Claim(
            "ln-dpo-length", "LN-DPO gives shorter responses than DPO under verbosity bias at no loss of gold reward.",
            verdict,
            f"greedy length (tokens): trl-dpo {ld:.2f} ± {ld_sd:.2f}, ln-dpo {ll:.2f} ± {ll_sd:.2f}; gold reward: "
            f"trl-dpo {gd:.3f} ± {gd_sd:.3f}, ln-dpo {gl:.3f} ± {gl_sd:.3f}; greedy responses with a filler "
            f"phrase {gfd:.3f} vs {gfl:.3f} (reference length {lr_:.2f}). Temperature-1 samples: length "
            f"{sd:.2f} vs {sl:.2f} tokens, filler share {fd:.3f} vs {fl:.3f} (reference {fr:.3f})."))
    else:
        claims.append(Claim("ln-dpo-length", "LN-DPO vs DPO length", "not measured", "arm not run"))

    precisions = [s_.filter["precision"] for s_ in result.seeds]
    recalls = [s_.filter["recall"] for s_ in result.seeds]
    low_prec = [s_.filter["precision_low_tail"] for s_ in result.seeds]
    mean_p = float(np.nanmean(precisions))
    claims.append(Claim(
        "filter-precision", f"At {result.config.label_noise:.0%} label noise the offline beta-guided filter removes "
        "flipped pairs with precision of at least 0.8.", "reproduced" if mean_p >= 0.8 else "not reproduced",
        f"precision {mean_p:.3f} (seeds {_fmt_list(precisions)}), recall {float(np.nanmean(recalls)):.3f} "
        f"(seeds {_fmt_list(recalls)}); the low tail alone (drops below the centre): precision "
        f"{float(np.nanmean(low_prec)):.3f} (seeds {_fmt_list(low_prec)}). Flipped share of the kept pairs "
        f"{float(np.mean([s_.filter['flipped_share_kept'] for s_ in result.seeds])):.3f} vs "
        f"{float(np.mean([s_.filter['flipped_share_before'] for s_ in result.seeds])):.3f} before."))

    if {"trl-dpo", "winnow-curated"} <= arms:
        gc, gc_sd = _stat(s, "winnow-curated", "gold_reward")
        gd, gd_sd = _stat(s, "trl-dpo", "gold_reward")
        spread = _spread(gc_sd, gd_sd)
        diffs = [a - b for a, b in zip(_per_seed_values(per_seed, "winnow-curated", "gold_reward"),
                                       _per_seed_values(per_seed, "trl-dpo", "gold_reward"), strict=True)]
        verdict = "reproduced" if gc - gd > spread else "not reproduced"
        claims.append(Claim(
            "curated-beats-dpo", f"Winnow curated beats plain DPO on gold reward at {result.config.label_noise:.0%} "
            "label noise by more than the spread across seeds.", verdict,
            f"gold reward: winnow-curated {gc:.3f} ± {gc_sd:.3f}, trl-dpo {gd:.3f} ± {gd_sd:.3f}; difference "
            f"{gc - gd:+.3f} vs spread {spread:.3f}; per-seed differences {_fmt_list(diffs)}."))
    else:
        claims.append(Claim("curated-beats-dpo", "curated vs DPO", "not measured", "arm not run"))
    if result.config.seeds and len(result.config.seeds) < 2:
        for c in claims:
            if c.verdict != "not measured":
                c.evidence += " (one seed: no spread, the verdict is not meaningful)"
    return claims


# --------------------------------------------------------------------------------------------------
# Report


def _cell(mean: float, std: float, digits: int) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    text = f"{mean:.{digits}f}"
    if std is not None and math.isfinite(std):
        text += f" ± {std:.{digits}f}"
    return text


_DIGITS = {"gold_reward": 3, "gold_reward_sampled": 3, "win_rate": 3, "len_tokens": 2, "len_tokens_sampled": 2, "filler_rate_sampled": 3,
           "filler_rate": 3,
           "implicit_acc": 3, "chosen_drift": 2, "chosen_drift_low_edit": 2, "chosen_drift_high_edit": 2, "kl": 2}


def markdown_table(result: GymResult) -> str:
    """Mean ± sample std across seeds, one row per arm (plus the reference)."""
    head = ["arm", "pairs", "steps", *TABLE_METRICS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for arm in ("reference", *result.config.arms):
        cells = [f"`{arm}`"]
        pairs, _ = _stat(result.summary, arm, "pairs")
        steps, _ = _stat(result.summary, arm, "steps")
        cells += [f"{pairs:.0f}" if pairs else "–", f"{steps:.0f}" if steps else "–"]
        for metric in TABLE_METRICS:
            mean, std = _stat(result.summary, arm, metric)
            cells.append(_cell(mean, std, _DIGITS.get(metric, 3)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(result: GymResult) -> str:
    cols = ["seed", "arm", "pairs", "steps", "gold_reward", "gold_reward_sampled", "win_rate", "len_tokens",
            "filler_rate",
            "len_tokens_sampled", "implicit_acc", "chosen_drift_low_edit", "chosen_drift_high_edit", "rejected_drift",
            "kl", "train_seconds"]
    frame = result.per_seed.select([c for c in cols if c in result.per_seed.columns]).sort("seed")
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "|".join("---:" for _ in frame.columns) + "|"]
    for row in frame.iter_rows():
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def filter_table(result: GymResult) -> str:
    lines = ["| seed | pairs | flipped | dropped by rules | dropped by beta filter (low / high) | precision | recall "
             "| precision, low tail | flipped share kept |", "|" + "---:|" * 9]
    for s in result.seeds:
        f = s.filter
        lines.append(f"| {s.seed} | {s.raw_pairs} | {f['flipped']} | {f['dropped_by_rules']} | {f['dropped']} "
                     f"({f['dropped_low_tail']} / {f['dropped'] - f['dropped_low_tail']}) | {f['precision']:.3f} | "
                     f"{f['recall']:.3f} | {f['precision_low_tail']:.3f} | {f['flipped_share_kept']:.3f} |")
    return "\n".join(lines)


def plot_results(result: GymResult, out_dir: Path) -> list[Path]:
    """Bar charts (mean across seeds) with one dot per seed, one panel per metric; returns the PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arms = ["reference", *result.config.arms]
    colours = {"reference": "#9e9e9e", "trl-dpo": "#d62728", "winnow-curated": "#2ca02c"}
    fig, axes = plt.subplots(2, 5, figsize=(22, 8.5))
    for ax, metric in zip(axes.flat, PLOT_METRICS, strict=True):
        means = [_stat(result.summary, a, metric)[0] for a in arms]
        x = np.arange(len(arms))
        ax.bar(x, [0 if not math.isfinite(m) else m for m in means],
               color=[colours.get(a, "#1f77b4") for a in arms], alpha=0.75)
        for i, arm in enumerate(arms):
            values = _per_seed_values(result.per_seed, arm, metric)
            jitter = np.linspace(-0.18, 0.18, len(values)) if len(values) > 1 else np.zeros(len(values))
            ax.scatter(i + jitter, values, color="black", s=12, zorder=3)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(x, arms, rotation=45, ha="right", fontsize=8)
        ax.set_title(TABLE_METRICS.get(metric, metric), fontsize=10)
    n = len(result.config.seeds)
    fig.suptitle(f"Preference gym: mean over {n} seed(s) (bars) and each seed (dots); held-out sorting prompts",
                 fontsize=12)
    fig.tight_layout()
    metrics_png = out_dir / "metrics.png"
    fig.savefig(metrics_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    subsets = (("chosen_drift_low_edit", "low-edit pairs"), ("chosen_drift_high_edit", "high-edit pairs"),
               ("rejected_drift", "rejected (all)"))
    width = 0.27
    x = np.arange(len(arms))
    for j, (metric, label) in enumerate(subsets):
        means = [_stat(result.summary, a, metric)[0] for a in arms] if metric in result.per_seed.columns else []
        if not means:
            continue
        ax.bar(x + (j - 1) * width, [0 if not math.isfinite(m) else m for m in means], width, label=label)
        for i, arm in enumerate(arms):
            values = _per_seed_values(result.per_seed, arm, metric)
            ax.scatter(np.full(len(values), i + (j - 1) * width), values, color="black", s=8, zorder=3)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, arms, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean log pi(y) - log ref(y)")
    ax.set_title("Log-prob drift on held-out clean pairs: chosen (by edit distance) and rejected")
    ax.legend(fontsize=8)
    fig.tight_layout()
    drift_png = out_dir / "drift.png"
    fig.savefig(drift_png, dpi=110)
    plt.close(fig)
    return [metrics_png, drift_png]


def render_report(result: GymResult, command: str, plots: Sequence[Path], report_path: Path) -> str:
    """GYM.md: setup, the table, the claims with verdicts, the filter and per-seed numbers."""
    c = result.config
    claims = evaluate_claims(result)
    rel = [os.path.relpath(p, report_path.parent) for p in plots]
    m = result.machine
    load = (f"load average (1/5/15 min) {m['loadavg_before']} at the start, {m['loadavg_after']} at the end"
            if m.get("loadavg_before") else "load average unavailable")
    advice = {json.dumps({"objective": s.advice["objective"], "params": s.advice["params"]}, sort_keys=True)
              for s in result.seeds}
    steps = sorted({s.steps for s in result.seeds})
    seconds = {k: np.mean([s.seconds.get(k, 0.0) for s in result.seeds]) for k in ("reference_sft", "score", "curate")}
    arm_time = result.per_seed.filter(pl.col("arm") != "reference")
    lines = [
        "# Preference gym",
        "",
        "Every method side by side on a task whose truth is known (sorting short lists; gold reward = share of",
        "correctly placed numbers). Generated by one command; the numbers below are not edited by hand.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"**Wall time: {result.wall_seconds / 60:.1f} min ({result.wall_seconds:.0f} s)** for {len(c.seeds)} seeds x "
        f"{len(c.arms)} arms on {m['cpus']} CPU cores, {c.workers} worker process(es), no GPU; {load}. "
        "The machine was shared with other jobs while this ran, so timings are noisy." if
        (m.get("loadavg_before") and max(m["loadavg_before"][0], (m.get("loadavg_after") or [0])[0]) > 0.5 + c.workers)
        else f"**Wall time: {result.wall_seconds / 60:.1f} min ({result.wall_seconds:.0f} s)** for {len(c.seeds)} "
        f"seeds x {len(c.arms)} arms on {m['cpus']} CPU cores, {c.workers} worker process(es), no GPU; {load}.",
        "",
        f"Per seed on average: reference SFT {seconds['reference_sft']:.0f} s, scoring {seconds['score']:.0f} s, "
        f"curation {seconds['curate']:.1f} s; per arm: training {arm_time['train_seconds'].mean():.0f} s, "
        f"evaluation {arm_time['eval_seconds'].mean():.0f} s.",
        "",
        "## Setup",
        "",
        f"- **Data**, one set per seed ({', '.join(map(str, c.seeds))}): `PreferenceSetConfig(size={c.size}, "
        f"label_noise={c.label_noise}, verbosity_bias={c.verbosity_bias}, low_edit_share={c.low_edit_share}, "
        f"margin_spread={c.margin_spread}, rating_noise={c.rating_noise})`, seed = gym seed; written as JSONL "
        f"(truth columns removed) and ingested like user data ({', '.join(str(s.raw_pairs) for s in result.seeds)} "
        "pairs after ingestion). The ratings (`score_chosen/score_rejected`) are the margin source curation uses.",
        "- **Reference**: one winnow-tiny model per seed (2-layer Llama, local BPE tokenizer), SFT'd on that seed's "
        f"prompt -> chosen pairs ({c.tiny.sft_steps} steps), as the pipeline builds it. Every arm of a seed starts "
        "from it and is measured against it, so seed spread includes the reference.",
        f"- **Budget**: every arm of a seed makes the same number of optimizer steps, {c.epochs:g} pass(es) over the "
        f"raw set at batch {c.batch_size} ({', '.join(map(str, steps))} steps); lr {c.learning_rate:g} linear with "
        f"10% warm-up, max_length {c.max_length}, training seed = gym seed. Arms on fewer pairs (filtered) see them "
        "more often; staged arms split the steps over their stages by size (a fresh schedule per stage, as sDPO).",
        "- **Arms**: " + "; ".join(f"`{a}`: {ARM_DESCRIPTIONS[a]}" for a in c.arms) + ".",
        f"- **Curation advice** (objective `auto` of `winnow-curated`): {'; '.join(sorted(advice))}.",
        f"- **Evaluation**: one held-out set for all seeds and arms, prompts and pairs disjoint from every seed's "
        f"training prompts: {result.heldout['prompts']} prompts sampled greedily from policy and reference "
        f"(gold reward, win rate with ties half, length) and once at temperature 1 from the policy (KL estimate "
        f"mean log pi/ref, plus the sampled length and filler share), {result.heldout['pairs']} clean pairs "
        f"({result.heldout['low_edit_pairs']} low-edit, same pathology mix, no label noise) for implicit-reward "
        f"accuracy (summed log-ratios, beta {c.eval_beta}) and chosen drift = mean log pi(chosen) - log ref(chosen). "
        f"Rows are in each seed's catalog `evals` table (model = arm).",
        "- **Spread**: ± is the sample standard deviation across seeds (ddof 1); per-seed numbers are at the end.",
        "",
        "## Results",
        "",
        markdown_table(result),
        "",
        "The `reference` row is the start model measured against itself: win rate 0.5, drift 0, KL 0 and implicit "
        "accuracy 0 (a zero margin counts as wrong) hold by construction and check the plumbing. Lengths exclude "
        "eos; \"filler share\" is the share of responses carrying words (a filler phrase) rather than only numbers. "
        "Implicit accuracy uses summed log-ratios for every arm, also for LN-DPO.",
        "",
        *[f"![{Path(p).stem}]({r})" for p, r in zip(plots, rel, strict=True)],
        "",
        "## Claims",
        "",
        "Each rule was fixed before the numbers were seen (see `training.gym.evaluate_claims`); nothing was tuned.",
        "",
        "| claim | verdict | numbers |",
        "|---|---|---|",
        *[f"| {cl.statement} | **{cl.verdict}** | {cl.evidence} |" for cl in claims],
        "",
        "## Beta-guided filter against the truth",
        "",
        "Curation's default filter (median/MAD centre, rho 0.2, threshold mode) on the ratings margin; precision = "
        "flipped among the pairs it dropped, recall = flipped pairs it dropped / all flipped pairs.",
        "",
        filter_table(result),
        "",
        "## Per seed",
        "",
        per_seed_table(result),
        "",
        NOTES_MARKER,
    ]
    return "\n".join(lines) + "\n"


def write_report(result: GymResult, report_path: Path, plots_dir: Path, command: str) -> Path:
    """Write GYM.md and its plots; hand-written notes below NOTES_MARKER in an existing file are kept."""
    report_path = Path(report_path)
    plots = plot_results(result, plots_dir)
    text = render_report(result, command, plots, report_path)
    if report_path.is_file():
        old = report_path.read_text()
        if NOTES_MARKER in old:
            text += old.split(NOTES_MARKER, 1)[1].lstrip("\n")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text)
    return report_path


def with_overrides(config: GymConfig, **overrides: Any) -> GymConfig:
    """A copy with the non-None overrides applied (the CLI's flags)."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
