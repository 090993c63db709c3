"""Per-seed preparation: data, reference, scoring, curation, as the pipeline does them.

Per noise level and seed: one preference set (``PreferenceSetConfig``) written as JSONL
without its truth columns and ingested into a per-seed catalog like any user data; one SFT'd
winnow-tiny reference built from that seed's pairs exactly as the pipeline builds it; the
real ``score_run`` and ``curate``; the filter's drops scored against the hidden
``is_flipped`` column. Ablations of the curated arm need other curations of the same scored
pairs (no offline filter, one stage, another filtering policy): each runs ``curate`` on its
own copy of the seed's catalog (:data:`CURATIONS`), so the seed catalog keeps the default
decisions. Also the one held-out set every seed and arm is evaluated on. Catalog reads go
through :mod:`curation.reads`; this module holds no SQL.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from training.gym.budget import budget_steps
from training.gym.measure import evaluate_policy, filter_against_truth
from training.sorting import TRUTH_COLUMNS, generate_preferences

if TYPE_CHECKING:
    from curation.decide import CurateConfig
    from training.gym.config import GymConfig

# What every arm trains on: the pair and its curated reference log-probs.
TRAIN_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")


def _no_offline_filter(c: CurateConfig) -> CurateConfig:
    return replace(c, beta=replace(c.beta, enabled=False))


# Curations of one seed's scored pairs the arms train on: name -> the product's CurateConfig changed.
CURATIONS: dict[str, Callable[[CurateConfig], CurateConfig]] = {
    "default": lambda c: c,
    "no-offline-filter": _no_offline_filter,  # joint policy: beta-DPO's in-batch filter takes the 20%
    "no-filter": lambda c: replace(_no_offline_filter(c), advice=replace(c.advice, filter_keep=1.0)),
    "each": lambda c: replace(c, advice=replace(c.advice, filter_policy="each")),  # 0.8 offline x 0.8 in-batch
    "one-stage": lambda c: replace(c, stages=replace(c.stages, k=1)),
}


@dataclass
class Variant:
    """One curation of a seed's scored pairs, in its own catalog: the shards and advice arms train with."""

    name: str
    catalog_dir: Path
    shard_dir: Path
    kept_pairs: int
    advice: dict[str, Any]


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
    noise: float = 0.2
    variants: dict[str, Variant] = field(default_factory=dict)


def noise_dir(workdir: Path, noise: float) -> Path:
    return Path(workdir) / f"noise-{round(noise * 100):02d}"


def seed_dir(workdir: Path, seed: int, noise: float = 0.2) -> Path:
    return noise_dir(workdir, noise) / f"seed-{seed}"


def prepare_seed(config: GymConfig, seed: int, workdir: Path, heldout_dir: Path, noise: float | None = None,
                 curations: Iterable[str] = ("default",)) -> SeedData:
    """Generate, ingest, build the reference, score, curate (each of ``curations``); measure the
    default filter against the truth."""
    import torch

    from curation.decide import CurateConfig, curate
    from curation.heldout import HeldoutConfig
    from curation.ingest import ingest
    from curation.lm.loading import load_model, load_tokenizer, torch_threads
    from curation.reads import curated_pairs, pairs_in_source_order
    from curation.score.scoring import ScoreOptions, ScoringModels, score_run
    from curation.stage import StageConfig
    from curation.store import Catalog
    from training.models import build_default_model

    noise = config.primary_noise if noise is None else noise
    seconds: dict[str, float] = {}
    out = seed_dir(workdir, seed, noise)
    out.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    truth = generate_preferences(config.preference_config(seed, noise))
    source = out / "pairs.jsonl"
    truth.drop(TRUTH_COLUMNS).write_ndjson(source)  # the pipeline sees what a user's file would hold
    catalog = Catalog(out)
    ingested = ingest([str(source)], catalog, run_id=f"gym-n{round(noise * 100):02d}-seed{seed}", progress=False)
    run_id = ingested.run_id
    pairs = pairs_in_source_order(catalog, run_id, ("pair_id", "prompt", "chosen"))
    seconds["data"] = time.perf_counter() - tick

    tick = time.perf_counter()
    model_path = str(build_default_model(pairs["prompt"].to_list(), pairs["chosen"].to_list(), out, config.tiny,
                                         progress=False))
    seconds["reference_sft"] = time.perf_counter() - tick

    tick = time.perf_counter()
    with torch_threads(1):
        tokenizer, reference = load_tokenizer(model_path), load_model(model_path)
        models = ScoringModels(tokenizer, model_path, reference=reference, reference_name=model_path)
        score_run(catalog, run_id, models, ScoreOptions(max_length=config.max_length), progress=False)
    seconds["score"] = time.perf_counter() - tick

    tick = time.perf_counter()
    # no held-out split: the gym evaluates on fresh sorting prompts, and every arm trains on the same pairs
    base = CurateConfig(stages=StageConfig(k=config.stages), report=False,
                        heldout=HeldoutConfig(share=0.0))
    variants = _curate_variants(catalog, run_id, base, out / "variants", [c for c in curations if c != "default"])
    curated = curate(catalog, run_id, base)
    variants["default"] = Variant("default", out, Path(curated.shard_dir), curated.kept, curated.advice.to_dict())
    seconds["curate"] = time.perf_counter() - tick

    frame = curated_pairs(catalog, run_id)
    quality = filter_against_truth(frame, truth, seed)
    raw = frame.select(*TRAIN_COLUMNS, "margin")
    raw_path, kept_path = out / "raw.parquet", out / "kept.parquet"
    raw.write_parquet(raw_path)
    frame.filter(pl.col("kept")).select(TRAIN_COLUMNS).write_parquet(kept_path)

    data = SeedData(
        seed=seed, dir=out, run_id=run_id, model_path=model_path, raw_path=raw_path, kept_path=kept_path,
        shard_dir=Path(curated.shard_dir), raw_pairs=raw.height, kept_pairs=curated.kept,
        steps=budget_steps(raw.height, config), advice=curated.advice.to_dict(), filter=quality,
        quarantined=ingested.quarantined, seconds=seconds, noise=noise, variants=variants,
    )
    # the reference measured against itself: the baseline row (and a check: KL 0, win rate 0.5)
    tick = time.perf_counter()
    with torch_threads(1), torch.inference_mode():
        result = evaluate_policy(config, reference, reference, tokenizer, heldout_dir)
    data.reference_eval = dict(result.metrics)
    data.reference_rows = result.to_rows(run_id, "reference")
    seconds["reference_eval"] = time.perf_counter() - tick
    return data


def _curate_variants(catalog: Any, run_id: str, base: CurateConfig, root: Path, names: list[str]) -> dict[str, Variant]:
    """Curate each named variant in a copy of the scored catalog (before the default curation writes)."""
    from curation.decide import curate

    out: dict[str, Variant] = {}
    for name in names:
        folder = root / name
        copy = copy_catalog(catalog.workdir, folder)
        result = curate(copy, run_id, CURATIONS[name](base))
        out[name] = Variant(name, folder, Path(result.shard_dir), result.kept, result.advice.to_dict())
    return out


def copy_catalog(source_dir: Path, folder: Path):  # noqa: ANN202 - a Catalog
    """A byte copy of a closed catalog file (and its WAL, if any) in ``folder``."""
    from curation.store import CATALOG_NAME, Catalog

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in (CATALOG_NAME, CATALOG_NAME + ".wal"):
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, folder / name)
    return Catalog(folder)


def build_heldout(config: GymConfig, out: Path) -> tuple[list[str], pl.DataFrame]:
    """One held-out set for every seed and noise level: prompts/pairs disjoint from all training prompts."""
    from training.eval_tasks.sorting import heldout_sorting_set

    exclude: list[str] = []
    for noise, seed in config.units():
        exclude += generate_preferences(config.preference_config(seed, noise))["prompt"].to_list()
    heldout = heldout_sorting_set(config.eval_prompts, config.eval_pairs, config.eval_seed,
                                  template=config.preference_config(config.seeds[0]), exclude_prompts=exclude)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.json").write_text(json.dumps(heldout.prompts))
    heldout.pairs.write_parquet(out / "pairs.parquet")
    return heldout.prompts, heldout.pairs
