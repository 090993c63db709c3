"""The evaluation stage: one policy against its reference, as metrics and catalog rows."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from curation.jsonable import json_safe
from curation.lm.logprobs import reference_logprobs
from training.evaluate.judge import Judge, judge_metrics
from training.evaluate.metrics import (
    GoldReward,
    gold_rewards,
    implicit_margins,
    implicit_reward_accuracy,
    kl_estimate,
    length_stats,
    logp_drift,
    mean_and_se,
    win_rate,
    win_tie_loss,
)
from training.evaluate.sampling import _pad_id, sample_tokens, token_logps

EVAL_COLUMNS = ("run_id", "model", "metric", "value", "n", "details")


# --------------------------------------------------------------------------------------------------
# The evaluation stage


@dataclass
class EvalResult:
    """Metrics of one policy against its reference, plus per-sample and per-pair frames for the report.

    ``metrics`` holds only what was measured: a metric whose input is missing (no gold reward,
    no held-out pairs, no low-edit flag) is absent, never filled with a placeholder.
    ``counts`` gives the number of samples or pairs behind each metric, ``details`` extra
    facts (standard errors, win/tie/loss counts), ``settings`` how the numbers were made.
    """

    metrics: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: pl.DataFrame = field(default_factory=pl.DataFrame)
    pairs: pl.DataFrame | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_rows(self, run_id: str, model_label: str) -> pl.DataFrame:
        """Rows of the catalog's ``evals`` table: one per metric, details as a JSON string."""
        names = sorted(self.metrics)
        details = [
            json.dumps(
                json_safe({**self.settings, **self.details.get(name, {})}), sort_keys=True, allow_nan=False
            )
            for name in names
        ]
        return pl.DataFrame(
            {
                "run_id": [run_id] * len(names),
                "model": [model_label] * len(names),
                "metric": names,
                "value": [float(self.metrics[n]) for n in names],
                "n": [int(self.counts.get(n, 0)) for n in names],
                "details": details,
            },
            schema={
                "run_id": pl.String,
                "model": pl.String,
                "metric": pl.String,
                "value": pl.Float64,
                "n": pl.Int64,
                "details": pl.String,
            },
        )


def _finite(value: float) -> bool:
    return value is not None and not math.isnan(value)


def evaluate(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    heldout_pairs: pl.DataFrame | None = None,
    *,
    gold_reward: GoldReward | None = None,
    beta: float = 0.1,
    max_new_tokens: int = 24,
    max_length: int | None = 128,
    seed: int = 0,
    progress: bool = True,
    greedy: bool = True,
    temperature: float = 1.0,
    batch_size: int = 64,
    low_edit_column: str = "is_low_edit",
    judge: Judge | None = None,
    prompt_tools: Sequence[object] | None = None,
) -> EvalResult:
    """Compare ``policy`` with ``reference`` on held-out prompts and (optionally) held-out clean pairs.

    * Responses for gold reward, win rate and length: one per prompt from each model, greedy
      by default (or sampled at ``temperature`` with the same seed for both models).
    * KL: a separate policy sample per prompt at temperature 1 (seed + 1), scored exactly on
      the drawn tokens by both models, untruncated; see :func:`kl_estimate`. It is the KL of
      the response distribution capped at ``max_new_tokens`` (a capped response is scored
      as the prefix it is, without an eos), which is what the samples can speak for.
    * Pair metrics: log-probs as TRL's DPO computes them at ``max_length``; ``beta`` scales
      the implicit reward (use the training beta); drift on the low-edit subset needs a
      boolean ``low_edit_column`` in ``heldout_pairs``.
    * ``judge`` (a reward model, :mod:`training.evaluate.judge`): ``judge_reward``,
      ``judge_reward_ref`` and ``judge_win_rate`` of the same greedy samples.

    Prompts and pairs are strings, or conversations (message lists; ``prompt_tools`` per prompt,
    a ``tools`` column in ``heldout_pairs``), tokenised through the chat template as TRL does.
    """
    prompts = list(prompts)
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    details: dict[str, dict[str, Any]] = {}
    settings: dict[str, Any] = {
        "beta": beta,
        "max_new_tokens": max_new_tokens,
        "max_length": max_length,
        "seed": seed,
        "decoding": "greedy" if greedy else f"sample(T={temperature})",
    }
    sample_kw = {"greedy": greedy, "temperature": temperature, "seed": seed, "batch_size": batch_size,
                 "tools": prompt_tools}
    pad_id = _pad_id(tokenizer)
    samples = pl.DataFrame()

    if prompts:
        pol = sample_tokens(policy, tokenizer, prompts, max_new_tokens, progress=progress, **sample_kw)
        ref = sample_tokens(reference, tokenizer, prompts, max_new_tokens, progress=progress, **sample_kw)
        n = len(prompts)
        columns: dict[str, Any] = {
            "prompt": [p if isinstance(p, str) else json.dumps(p, ensure_ascii=False, default=str) for p in prompts],
            "response": pol.texts,
            "response_ref": ref.texts,
            "tokens": pol.num_tokens,
            "tokens_ref": ref.num_tokens,
            "chars": pol.num_chars,
            "chars_ref": ref.num_chars,
            "finished": pol.finished,
            "finished_ref": ref.finished,
        }
        for suffix, s in (("", pol), ("_ref", ref)):
            for key, value in length_stats(s.num_tokens, s.texts).items():
                metrics[key + suffix] = value
                counts[key + suffix] = n
        if gold_reward is not None:
            g_pol = gold_rewards(prompts, pol.texts, gold_reward)
            g_ref = gold_rewards(prompts, ref.texts, gold_reward)
            columns["gold"], columns["gold_ref"] = g_pol, g_ref
            for name, g in (("gold_reward", g_pol), ("gold_reward_ref", g_ref)):
                mean, se = mean_and_se(g)
                metrics[name], counts[name], details[name] = mean, n, {"se": se}
            wins, ties, losses = win_tie_loss(g_pol, g_ref)
            metrics["win_rate"] = win_rate(g_pol, g_ref)
            counts["win_rate"] = n
            details["win_rate"] = {"wins": wins, "ties": ties, "losses": losses}

        if judge is not None:
            judged, judge_details, j_pol, j_ref = judge_metrics(judge, prompts, pol.texts, ref.texts,
                                                                 progress=progress)
            metrics.update(judged)
            details.update(judge_details)
            counts.update(dict.fromkeys(judged, n))
            columns["judge"], columns["judge_ref"] = j_pol, j_ref
            settings["judge"] = judge.name

        # KL(pi || ref): y ~ pi at temperature 1, no truncation of the distribution.
        kl_samples = sample_tokens(
            policy,
            tokenizer,
            prompts,
            max_new_tokens,
            greedy=False,
            temperature=1.0,
            seed=seed + 1,
            batch_size=batch_size,
            progress=progress,
            tools=prompt_tools,
        )
        lp_pol = token_logps(
            policy, kl_samples.prompt_ids, kl_samples.completion_ids, pad_token_id=pad_id, progress=progress
        )
        lp_ref = token_logps(
            reference,
            kl_samples.prompt_ids,
            kl_samples.completion_ids,
            pad_token_id=pad_id,
            progress=progress,
        )
        kl, kl_se = kl_estimate(lp_pol, lp_ref)
        metrics["kl"], metrics["kl_se"] = kl, kl_se
        counts["kl"] = counts["kl_se"] = n
        details["kl"] = {
            "se": kl_se,
            "temperature": 1.0,
            "seed": seed + 1,
            "estimator": "mean log pi/ref, y~pi",
        }
        if not _finite(kl_se):  # a single sample has no standard error: report none rather than a fake
            del metrics["kl_se"]
        columns.update(
            kl_response=kl_samples.texts,
            kl_tokens=kl_samples.num_tokens,
            kl_logp=lp_pol,
            kl_logp_ref=lp_ref,
            kl_log_ratio=lp_pol - lp_ref,
        )
        samples = pl.DataFrame(columns)

    pairs_frame: pl.DataFrame | None = None
    if heldout_pairs is not None and heldout_pairs.height:
        pairs_frame, pair_metrics, pair_counts = _pair_metrics(
            policy, reference, tokenizer, heldout_pairs, beta, max_length, low_edit_column, progress
        )
        metrics.update(pair_metrics)
        counts.update(pair_counts)

    return EvalResult(metrics, counts, details, samples, pairs_frame, settings)


def _pair_metrics(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    pairs: pl.DataFrame,
    beta: float,
    max_length: int | None,
    low_edit_column: str,
    progress: bool,
) -> tuple[pl.DataFrame, dict[str, float], dict[str, int]]:
    """Implicit-reward accuracy and log-prob drift of held-out pairs (TRL's numbers for both models)."""
    missing = {"prompt", "chosen", "rejected"} - set(pairs.columns)
    if missing:
        raise ValueError(f"heldout_pairs lacks columns {sorted(missing)}")
    args = (pairs["prompt"].to_list(), pairs["chosen"].to_list(), pairs["rejected"].to_list())
    tools = pairs["tools"].to_list() if "tools" in pairs.columns else None
    pol = reference_logprobs(policy, tokenizer, *args, tools=tools, max_length=max_length, progress=progress)
    ref = reference_logprobs(reference, tokenizer, *args, tools=tools, max_length=max_length, progress=progress)
    pi_w, pi_l = pol["ref_chosen_logps"].to_numpy(), pol["ref_rejected_logps"].to_numpy()
    ref_w, ref_l = ref["ref_chosen_logps"].to_numpy(), ref["ref_rejected_logps"].to_numpy()
    margins = implicit_margins(pi_w, ref_w, pi_l, ref_l, beta)
    scored = ~np.isnan(margins)
    n = int(scored.sum())

    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}

    def put(name: str, value: float, count: int) -> None:
        if _finite(value) and count > 0:
            metrics[name], counts[name] = float(value), count

    put("implicit_acc", implicit_reward_accuracy(pi_w, ref_w, pi_l, ref_l, beta), n)
    put("implicit_margin", float(np.mean(margins[scored])) if n else math.nan, n)
    put("chosen_drift", logp_drift(pi_w, ref_w), n)
    put("rejected_drift", logp_drift(pi_l, ref_l), n)
    frame_cols: dict[str, Any] = {
        "prompt": [p if isinstance(p, str) else json.dumps(p, ensure_ascii=False, default=str) for p in args[0]],
        "logp_chosen": pi_w,
        "logp_rejected": pi_l,
        "ref_logp_chosen": ref_w,
        "ref_logp_rejected": ref_l,
        "chosen_drift": pi_w - ref_w,
        "rejected_drift": pi_l - ref_l,
        "implicit_margin": margins,
        "correct": np.where(scored, margins > 0, False),
        "scored": scored,
    }
    if "pair_id" in pairs.columns:
        frame_cols = {"pair_id": pairs["pair_id"].to_list(), **frame_cols}
    if low_edit_column in pairs.columns:
        low = pairs[low_edit_column].fill_null(False).cast(pl.Boolean).to_numpy()
        frame_cols[low_edit_column] = low
        put("chosen_drift_low_edit", logp_drift(pi_w, ref_w, low), int((low & scored).sum()))
        put("chosen_drift_high_edit", logp_drift(pi_w, ref_w, ~low), int((~low & scored).sum()))
    frame = pl.DataFrame(frame_cols, nan_to_null=True)
    return frame, metrics, counts


def write_evals(catalog: Any, run_id: str, result: EvalResult, model_label: str) -> int:
    """Replace the (run_id, model_label) slice of the ``evals`` table in one transaction.

    Why replace that slice: re-running an evaluation must not duplicate rows, and other
    models' rows of the same run (say every objective in a gym) must stay.
    Returns the number of rows written.
    """
    return write_eval_rows(catalog, result.to_rows(run_id, model_label), run_id=run_id, model=model_label)


def write_eval_rows(catalog: Any, rows: pl.DataFrame, *, run_id: str, model: str) -> int:
    """Replace the (run_id, model) slice of ``evals`` with ``rows`` (as made by :meth:`EvalResult.to_rows`).

    ``details`` is a JSON string per row; the catalog's JSON column parses it on insert, so
    ``details->>'$.se'`` reads a value (null where no value exists), not a quoted string.
    """
    with catalog.transaction() as con:
        return catalog.replace_slice(con, "evals", rows.select(EVAL_COLUMNS), run_id=run_id, model=model)
