"""A small curated run for the report, export and browser tests: real ingest, scoring and curation of
300 demo lines (a whitespace tokenizer, no model), plus training curves and evaluation rows in the
shapes training writes them. Builds in about a second."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from curation.decide import CurateConfig, CurateResult, curate
from curation.report import build_report
from curation.stage import StageConfig
from curation.store import Catalog
from tests.test_curation_decisions import _ingest_and_score


def curated_run(workdir: Path, lines: int = 300, report: bool = True) -> tuple[Catalog, str, CurateResult]:
    """The run, and its report built after the training rows are in (as the pipeline rebuilds it after training)."""
    catalog, run_id = _ingest_and_score(workdir, lines=lines)
    result = curate(catalog, run_id, CurateConfig(stages=StageConfig(k=2), report=False))
    add_training_rows(catalog, run_id)
    if report:
        result = dataclasses.replace(result, report_path=build_report(catalog, run_id))
    return catalog, run_id, result


def add_training_rows(catalog: Catalog, run_id: str, steps: int = 12) -> None:
    """train_metrics for two stages and evals for policy and reference, as training writes them."""
    rng = np.random.default_rng(0)
    frames = []
    for stage in (1, 2):
        step = np.arange(1, steps + 1) * 2
        frames.append(pl.DataFrame({
            "stage": stage, "objective": "beta-dpo", "step": step, "epoch": step / step.max(),
            "loss": 0.69 - 0.02 * np.arange(steps) / stage + rng.normal(0, 0.005, steps),
            "beta": 0.1 + 0.01 * rng.random(steps), "kept_fraction": 0.9 + 0.05 * rng.random(steps),
            "rewards_chosen": 0.01 * np.arange(steps), "rewards_rejected": -0.01 * np.arange(steps),
            "rewards_margins": 0.02 * np.arange(steps), "rewards_accuracies": np.linspace(0.5, 0.8, steps),
            "logps_chosen": -20 + 0.1 * np.arange(steps), "logps_rejected": -22 - 0.2 * np.arange(steps),
            "learning_rate": np.linspace(1e-4, 0, steps), "grad_norm": 1 + rng.random(steps),
            "logged_at": [datetime(2026, 1, 1)] * steps}))
    evals = pl.DataFrame({"model": ["policy"] * 4, "metric": ["gold_reward", "gold_reward_ref", "win_rate", "kl"],
                          "value": [0.94, 0.92, 0.52, 0.19], "n": [200, 200, 200, 200], "details": ["{}"] * 4})
    with catalog.transaction() as con:
        for frame in frames:
            catalog.replace_slice(con, "train_metrics", frame, run_id=run_id, stage=int(frame["stage"][0]))
        catalog.replace_slice(con, "evals", evals, run_id=run_id, model="policy")
