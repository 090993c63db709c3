"""Running the gym: noise levels, seeds and arms as jobs on a process pool (or inline), results into tables.

Work runs in ``workers`` spawned processes (one torch thread each: the tiny model does not
gain from a second thread, and two threads thrash on shared cores); ``workers=0`` runs in
this process (tests). Each (noise level, seed) preparation is one job; when it finishes, one
job per arm of that unit is queued. `evals` rows go to each seed's catalog as results arrive (the
catalog's one writer, ``Catalog.replace_slice``, through ``training.evaluate.write_eval_rows``).
A plain library: no Prefect.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from training.gym.arms import ARMS, ArmRun, get_arm, step_counter
from training.gym.config import GymConfig
from training.gym.measure import TABLE_METRICS, evaluate_policy, summarise
from training.gym.prepare import SeedData, build_heldout, prepare_seed


def train_arm(config: GymConfig, data: SeedData, arm: str, heldout_dir: Path) -> dict[str, Any]:
    """Train one arm of one seed, evaluate it; returns its metrics and its `evals` rows."""
    import torch

    from curation.lm.loading import load_model, load_tokenizer, torch_threads

    trainer = get_arm(arm).train
    out = data.dir / "arms" / arm
    shutil.rmtree(out, ignore_errors=True)  # train_stages would resume an earlier run's completed stages
    out.mkdir(parents=True)
    counter = step_counter()
    started = time.perf_counter()
    raw = pl.read_parquet(data.raw_path)
    with torch_threads(1):
        policy_path, pairs = trainer(ArmRun(config, data, raw, out, counter))
        train_seconds = time.perf_counter() - started

        tick = time.perf_counter()
        tokenizer = load_tokenizer(data.model_path)
        with torch.inference_mode():
            result = evaluate_policy(config, load_model(policy_path), load_model(data.model_path), tokenizer,
                                     heldout_dir)
        eval_seconds = time.perf_counter() - tick
        eval_seconds = time.perf_counter() - tick
    result.samples.write_parquet(out / "samples.parquet")
    return {
        "noise": data.noise, "seed": data.seed, "arm": arm, "pairs": pairs, "steps": counter.steps,
        "stage_steps": counter.runs,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds, "metrics": dict(result.metrics),
        "rows": result.to_rows(data.run_id, arm), "policy": str(policy_path),
    }


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


@dataclass
class GymResult:
    config: GymConfig
    per_seed: pl.DataFrame  # one row per (noise, seed, arm): metrics, steps, pairs, seconds
    summary: pl.DataFrame  # noise, arm, metric, mean, std, min, max, seeds
    seeds: list[SeedData]  # one per (noise level, seed)
    wall_seconds: float
    heldout: dict[str, Any]
    machine: dict[str, Any]

    def seed_data(self, seed: int, noise: float | None = None) -> SeedData:
        noise = self.config.primary_noise if noise is None else noise
        return next(s for s in self.seeds if s.seed == seed and s.noise == noise)

    def at(self, noise: float) -> GymResult:
        """The result restricted to one noise level (what the per-level tables and claims read)."""
        def level(frame: pl.DataFrame) -> pl.DataFrame:
            return frame.filter(pl.col("noise") == noise) if "noise" in frame.columns else frame

        return GymResult(replace(self.config, noise_levels=(noise,)), level(self.per_seed), level(self.summary),
                         [s for s in self.seeds if s.noise == noise], self.wall_seconds, self.heldout, self.machine)


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
            path.is_dir() and re.fullmatch(r"noise-\d+", path.name)
            and all(re.fullmatch(r"seed-\d+", p.name) for p in path.iterdir())) or (
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

    seeds: dict[tuple[float, int], SeedData] = {}
    arm_results: list[dict[str, Any]] = []
    curations = sorted({get_arm(a).curation for a in config.arms} | {"default"})
    try:
        pending = {executor.submit(prepare_seed, config, seed, workdir, heldout_dir, noise, curations):
                   ("seed", (noise, seed), None) for noise, seed in config.units()}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                kind, seed, arm = pending.pop(future)
                value = future.result()
                if kind == "seed":
                    seeds[seed] = value
                    f = value.filter
                    log(f"{stamp()} noise {value.noise:.0%} seed {value.seed}: {value.raw_pairs} pairs, reference built in "
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
                    log(f"{stamp()} noise {seed[0]:.0%} seed {seed[1]} {arm:<17} {value['steps']:>4} steps  "
                        f"gold {m.get('gold_reward', math.nan):.3f}"
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
    result = GymResult(config, per_seed, summary, [seeds[u] for u in config.units()], wall, heldout, machine)
    _save_raw(result, workdir)
    return result


def _write_rows(catalog: Any, rows: pl.DataFrame | None) -> None:
    """Replace the (run_id, model) slice of `evals` with these rows (what write_evals does, from rows)."""
    from training.evaluate import write_eval_rows

    if rows is None or rows.height == 0:
        return
    write_eval_rows(catalog, rows, run_id=rows["run_id"][0], model=rows["model"][0])


def _per_seed_frame(config: GymConfig, seeds: list[SeedData], arms: list[dict[str, Any]]) -> pl.DataFrame:
    rows: list[dict[str, Any]] = []
    for data in seeds:
        rows.append({"noise": data.noise, "seed": data.seed, "arm": "reference", "pairs": 0, "steps": 0,
                     "train_seconds": 0.0, "eval_seconds": data.seconds.get("reference_eval", 0.0),
                     **data.reference_eval})
    for r in arms:
        rows.append({"noise": r["noise"], "seed": r["seed"], "arm": r["arm"], "pairs": r["pairs"], "steps": r["steps"],
                     "train_seconds": r["train_seconds"], "eval_seconds": r["eval_seconds"], **r["metrics"]})
    order = {name: i for i, name in enumerate(("reference", *ARMS))}
    frame = pl.DataFrame(rows, infer_schema_length=None)
    return (frame.with_columns(_o=pl.col("arm").replace_strict(order, default=99))
            .sort("noise", "_o", "seed").drop("_o"))


def _save_raw(result: GymResult, workdir: Path) -> None:
    result.per_seed.write_csv(workdir / "per_seed.csv")
    result.summary.write_csv(workdir / "summary.csv")
    meta = {"config": result.config.to_dict(), "wall_seconds": result.wall_seconds, "machine": result.machine,
            "heldout": result.heldout,
            "seeds": [{"noise": s.noise, "seed": s.seed, "run_id": s.run_id, "model": s.model_path,
                       "raw_pairs": s.raw_pairs, "kept_pairs": s.kept_pairs, "steps": s.steps, "advice": s.advice,
                       "filter": s.filter, "quarantined": s.quarantined, "seconds": s.seconds,
                       "variants": {k: {"kept_pairs": v.kept_pairs, "advice": v.advice} for k, v in s.variants.items()}}
                      for s in result.seeds]}
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

