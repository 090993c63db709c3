"""What the gym measures: each policy on the shared held-out set, the filter against the truth,
and the summary across seeds. The small helpers are pure and tested on hand-made numbers."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from curation.schema import DecisionReason

if TYPE_CHECKING:
    from training.evaluate import EvalResult
    from training.gym.config import GymConfig

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

_LETTER = re.compile(r"[A-Za-z]")


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
    """Mean, sample std (ddof 1; null for one seed), min and max across seeds, per (noise level,) arm and metric."""
    present = [m for m in metrics if m in per_seed.columns]
    keys = ["noise", "arm"] if "noise" in per_seed.columns else ["arm"]
    long = per_seed.unpivot(index=[*keys, "seed"], on=present, variable_name="metric", value_name="value")
    return (long.drop_nulls("value").group_by(*keys, "metric", maintain_order=True)
            .agg(mean=pl.col("value").mean(), std=pl.col("value").std(ddof=1), min=pl.col("value").min(),
                 max=pl.col("value").max(), seeds=pl.len()))


def filter_against_truth(frame: pl.DataFrame, truth: pl.DataFrame, seed: int) -> dict[str, Any]:
    """Score curation's drops against the hidden truth: ``frame`` holds the ingested pairs with their
    decisions (``kept``, ``reason``), ``truth`` the generated set with ``is_flipped``.

    The beta filter's drops (both tails, and the low tail alone) are matched against the
    flipped pairs; the rule filters' drops are counted apart.
    """
    keys = ["prompt", "chosen", "rejected"]
    joined = frame.join(truth.select(*keys, "is_flipped").unique(keys, keep="first", maintain_order=True),
                        on=keys, how="left")
    if joined["is_flipped"].null_count():
        raise RuntimeError(f"seed {seed}: {joined['is_flipped'].null_count()} ingested pairs lost their truth row")
    flipped = joined["is_flipped"].to_numpy().astype(bool)
    reason = joined["reason"].fill_null("")
    beta_drop = reason.is_in([r.value for r in DecisionReason if r.is_beta_outlier]).to_numpy()
    low_drop = (reason == DecisionReason.BETA_OUTLIER_LOW.value).to_numpy()
    quality: dict[str, Any] = filter_quality(beta_drop, flipped)
    quality["precision_low_tail"] = filter_quality(low_drop, flipped)["precision"]
    quality["recall_low_tail"] = filter_quality(low_drop, flipped)["recall"]
    quality["dropped_low_tail"] = int(low_drop.sum())
    quality["dropped_by_rules"] = int((~joined["kept"].to_numpy() & ~beta_drop).sum())
    quality["flipped_share_kept"] = float(flipped[joined["kept"].to_numpy()].mean())
    return quality



def evaluate_policy(config: GymConfig, policy: Any, reference: Any, tokenizer: Any, heldout_dir: Path) -> EvalResult:
    """training.evaluate.evaluate plus three length/verbosity readings taken from its own samples:
    length and filler share of the temperature-1 samples (the KL draws) and filler share of the
    greedy responses. Greedy decoding hides a filler the policy emits a third of the time; the
    sampled length shows it."""
    from training.eval_tasks.sorting import gold_reward
    from training.evaluate import evaluate

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

