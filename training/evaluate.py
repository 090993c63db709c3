"""Held-out evaluation: how a trained policy differs from its reference, measured, not assumed.

Why a separate stage: the DPO loss going down says little by itself. A policy can lower the
loss while producing worse answers, longer answers, or answers far from the reference, and
DPO can push the chosen log-probs *below* the reference on low-edit pairs (the failure DPOP
fixes). So after training we sample both models on held-out prompts and score held-out clean
pairs, and report:

* ``gold_reward`` / ``gold_reward_ref``: mean gold reward of greedy samples (only when a gold
  reward function is given; never faked), and ``win_rate`` of policy over reference samples
  on the same prompts by that reward, ties counting half;
* ``len_tokens`` / ``len_chars`` (and ``*_ref``): mean response length (tokens exclude eos);
* ``implicit_acc``: share of held-out pairs with beta*((pi_w - ref_w) - (pi_l - ref_l)) > 0,
  and ``implicit_margin``, the mean of that quantity;
* ``chosen_drift`` (and ``chosen_drift_low_edit`` / ``chosen_drift_high_edit`` when the pairs
  carry a low-edit flag) and ``rejected_drift``: mean log pi(y) - log ref(y) on held-out pairs;
* ``kl`` and ``kl_se``: a Monte-Carlo estimate of KL(pi || ref) over whole responses, with
  its standard error (see :func:`kl_estimate` for how the samples are drawn).

Log-probs come from :mod:`curation.lm.logprobs` (the same numbers TRL's DPO computes), so
pair metrics here line up with the training logs. This module is a plain library: no Prefect.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import torch

from curation.jsonable import json_safe
from curation.lm.logprobs import reference_logprobs, score_tokenized
from curation.lm.tokenization import TokenizedPairs, tokenize_pairs
from training.sorting import (
    PreferenceSetConfig,
    generate_preferences,
    make_prompt,
    prompt_numbers,
    sample_prompts,
)

GoldReward = Callable[[str, str], float]

# Held-out sorting data lives in its own seed space, far above the small seeds training
# configs use (the demo uses seed 7), so its random streams are unrelated to training's.
# Seed spaces alone cannot rule out a chance repeat of a prompt (a 3-number list has only
# 50*49*48 orderings), which is why heldout_sorting_set also checks content explicitly.
HELDOUT_SEED_BASE = 1_000_003

_PROMPT_DRAW = 4096  # candidate prompts drawn per try by heldout_sorting_set

EVAL_COLUMNS = ("run_id", "model", "metric", "value", "n", "details")


# --------------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Samples:
    """Sampled completions with the exact token ids drawn, so they can be scored without re-tokenising.

    Why keep ids: decoding and re-encoding a sampled completion may give a different token
    sequence (BPE is not injective on ids), and the KL estimator needs log-probs of exactly
    the tokens that were drawn. ``completion_ids`` include the eos token when one was drawn.
    """

    prompts: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    finished: np.ndarray  # True where the completion ended with eos
    texts: list[str]

    @property
    def num_tokens(self) -> np.ndarray:
        """Response length in tokens, not counting the eos token."""
        lengths = np.fromiter(
            (len(c) for c in self.completion_ids), dtype=np.int64, count=len(self.completion_ids)
        )
        return lengths - self.finished.astype(np.int64)

    @property
    def num_chars(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.texts), dtype=np.int64, count=len(self.texts))


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _bare_generation_config(model: Any) -> Iterator[None]:
    """Hide the model's own generation defaults (top_p, repetition penalty, ...) during a call.

    Why: transformers fills every setting we leave unset from ``model.generation_config``; a
    checkpoint shipping ``top_p=0.9`` would silently change the distribution we sample from.
    """
    from transformers import GenerationConfig

    old = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = old


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; generation could never stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(eos), int(pad)


def sample_tokens(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> Samples:
    """Batched generation with left padding; completions stop at eos.

    Sampling (``greedy=False``) draws from softmax(logits / temperature) with no top-k/top-p
    truncation. Deterministic for a given seed and batch size: the torch RNG is forked, seeded
    once, and prompts are batched in a fixed order (sorted by length, so padding stays small).
    The caller's global RNG state is left untouched.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature}")
    prompts = list(prompts)
    eos_id, pad_id = _special_ids(tokenizer)
    prompt_ids: list[list[int]] = list(tokenizer(prompts)["input_ids"]) if prompts else []
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i} tokenises to nothing; there is no context to generate from")

    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "do_sample": not greedy,
    }
    if not greedy:  # only sampling reads these; greedy would warn about them
        settings.update(temperature=float(temperature), top_k=0, top_p=1.0)
    gen_config = GenerationConfig(**settings)

    device = _model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompt_ids[i]), i))
    completions: list[list[int]] = [[] for _ in prompts]
    finished = np.zeros(len(prompts), dtype=bool)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    bar = tqdm(total=len(prompts), desc="sampling", unit="prompt", disable=not progress, leave=False)
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode(), _bare_generation_config(model):
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(prompt_ids[i]) for i in idx)
                input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids = prompt_ids[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    mask[row, width - len(ids) :] = 1
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=gen_config,
                )
                for row, i in enumerate(idx):
                    new = out[row, width:].tolist()
                    if eos_id in new:
                        new = new[: new.index(eos_id) + 1]
                        finished[i] = True
                    completions[i] = new
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    texts = [
        tokenizer.decode(c[:-1] if done else c, skip_special_tokens=True)
        for c, done in zip(completions, finished.tolist(), strict=True)
    ]
    return Samples(prompts, prompt_ids, completions, finished, texts)


def sample_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """Decoded completions (no prompt, no special tokens) of :func:`sample_tokens`."""
    return sample_tokens(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    ).texts


# --------------------------------------------------------------------------------------------------
# Log-probs (the forward lives in curation.lm.logprobs; nothing is re-implemented here)


def _single_sequence(tp: TokenizedPairs) -> TokenizedPairs:
    """A pairs view whose second side is empty: the scorer then runs each sequence once.

    Why: ``score_tokenized`` lays a pair out as prompt + first + second; an empty second
    completion adds no tokens, so scoring one response per prompt costs one sequence, not two.
    """
    return TokenizedPairs(
        tp.prompt_ids,
        tp.chosen_ids,
        [[] for _ in tp.prompt_ids],
        max_length=tp.max_length,
        truncation_mode=tp.truncation_mode,
    )


def _pad_id(tokenizer: Any) -> int:
    return _special_ids(tokenizer)[1]


def token_logps(
    model: Any,
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    *,
    pad_token_id: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Summed log-prob of each completion's exact token ids given its prompt's ids, no truncation."""
    tp = TokenizedPairs(list(prompt_ids), list(completion_ids), [[] for _ in prompt_ids])
    frame = score_tokenized(model, tp, progress=progress, pad_token_id=pad_token_id)
    return frame["ref_chosen_logps"].to_numpy().astype(np.float64)


def sequence_logps(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int | None = None,
    *,
    truncation_mode: str = "keep_start",
    progress: bool = False,
) -> np.ndarray:
    """Summed log-prob of each response given its prompt, tokenised and truncated as TRL's DPO does.

    The eos token is appended to each response (as TRL does), so a value equals the
    ``ref_chosen_logps`` that :func:`curation.lm.logprobs.reference_logprobs` gives for a
    pair with that response as chosen. NaN where TRL would drop the pair (prompt fills max_length).
    """
    responses = list(responses)
    tp = tokenize_pairs(tokenizer, prompts, responses, responses, max_length, truncation_mode)
    frame = score_tokenized(model, _single_sequence(tp), progress=progress, pad_token_id=_pad_id(tokenizer))
    return frame["ref_chosen_logps"].to_numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------------
# Metrics: small pure functions on arrays


def _array(values: Iterable[float] | np.ndarray) -> np.ndarray:
    return np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)


def mean_and_se(values: Iterable[float] | np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)); NaNs are ignored, se is NaN for n < 2."""
    x = _array(values)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan
    se = float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return float(np.mean(x)), se


def gold_rewards(prompts: Sequence[str], responses: Sequence[str], reward: GoldReward) -> np.ndarray:
    """Gold reward of each response (for the sorting task pass ``training.sorting.gold_reward``)."""
    return np.array([reward(p, r) for p, r in zip(prompts, responses, strict=True)], dtype=np.float64)


def mean_gold_reward(prompts: Sequence[str], responses: Sequence[str], reward: GoldReward) -> float:
    return mean_and_se(gold_rewards(prompts, responses, reward))[0]


def win_tie_loss(policy_rewards: Iterable[float], reference_rewards: Iterable[float]) -> tuple[int, int, int]:
    """Counts of prompts where the policy's reward is above, equal to, below the reference's."""
    a, b = _array(policy_rewards), _array(reference_rewards)
    if a.shape != b.shape:
        raise ValueError(f"reward arrays differ in shape: {a.shape} vs {b.shape}")
    return int(np.sum(a > b)), int(np.sum(a == b)), int(np.sum(a < b))


def win_rate(policy_rewards: Iterable[float], reference_rewards: Iterable[float]) -> float:
    """Share of prompts where the policy beats the reference, a tie counting half."""
    wins, ties, losses = win_tie_loss(policy_rewards, reference_rewards)
    n = wins + ties + losses
    if n == 0:
        raise ValueError("win_rate needs at least one comparable pair of rewards")
    return (wins + 0.5 * ties) / n


def length_stats(num_tokens: Iterable[float], texts: Sequence[str]) -> dict[str, float]:
    """Mean response length in tokens and in characters."""
    tokens = _array(num_tokens)
    chars = np.array([len(t) for t in texts], dtype=np.float64)
    if tokens.size == 0 or chars.size == 0:
        raise ValueError("length_stats needs at least one response")
    return {"len_tokens": float(tokens.mean()), "len_chars": float(chars.mean())}


def implicit_margins(
    pi_w: Iterable[float], ref_w: Iterable[float], pi_l: Iterable[float], ref_l: Iterable[float], beta: float
) -> np.ndarray:
    """DPO's implicit reward margin beta*((pi_w - ref_w) - (pi_l - ref_l)) per pair."""
    return beta * ((_array(pi_w) - _array(ref_w)) - (_array(pi_l) - _array(ref_l)))


def implicit_reward_accuracy(
    pi_w: Iterable[float], ref_w: Iterable[float], pi_l: Iterable[float], ref_l: Iterable[float], beta: float
) -> float:
    """Share of pairs whose implicit margin is strictly positive (NaN pairs, dropped by truncation, skipped).

    A zero margin (policy equal to reference) counts as wrong: the policy has not learned the preference.
    """
    m = implicit_margins(pi_w, ref_w, pi_l, ref_l, beta)
    m = m[~np.isnan(m)]
    if m.size == 0:
        return math.nan
    return float(np.mean(m > 0))


def logp_drift(
    pi: Iterable[float], ref: Iterable[float], mask: Iterable[bool] | np.ndarray | None = None
) -> float:
    """Mean of log pi(y) - log ref(y), over the pairs where ``mask`` is true (all when None).

    Negative chosen drift means the policy made preferred answers less likely than the
    reference did: what DPO does on low-edit pairs and DPOP is built to prevent.
    """
    d = _array(pi) - _array(ref)
    if mask is not None:
        m = np.asarray(list(mask) if not isinstance(mask, np.ndarray) else mask, dtype=bool)
        if m.shape != d.shape:
            raise ValueError(f"mask shape {m.shape} does not match {d.shape}")
        d = d[m]
    d = d[~np.isnan(d)]
    return float(d.mean()) if d.size else math.nan


def kl_estimate(logp_policy: Iterable[float], logp_reference: Iterable[float]) -> tuple[float, float]:
    """Monte-Carlo KL(pi || ref) and its standard error from samples y ~ pi.

    KL(pi || ref) = E_{y~pi}[log pi(y|x) - log ref(y|x)], so the mean of the per-sample log
    ratio is unbiased when y is drawn from pi itself: temperature 1, no top-k/top-p (that is
    how :func:`evaluate` samples for this metric, whatever it uses for the other metrics).
    Single terms can be negative; only the mean estimates a non-negative quantity. The
    standard error is std(log ratio) / sqrt(n).
    """
    return mean_and_se(_array(logp_policy) - _array(logp_reference))


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
    sample_kw = {"greedy": greedy, "temperature": temperature, "seed": seed, "batch_size": batch_size}
    pad_id = _pad_id(tokenizer)
    samples = pl.DataFrame()

    if prompts:
        pol = sample_tokens(policy, tokenizer, prompts, max_new_tokens, progress=progress, **sample_kw)
        ref = sample_tokens(reference, tokenizer, prompts, max_new_tokens, progress=progress, **sample_kw)
        n = len(prompts)
        columns: dict[str, Any] = {
            "prompt": prompts,
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
    pol = reference_logprobs(policy, tokenizer, *args, max_length=max_length, progress=progress)
    ref = reference_logprobs(reference, tokenizer, *args, max_length=max_length, progress=progress)
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
        "prompt": args[0],
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

    Why a delete-then-insert on that slice: re-running an evaluation must not duplicate rows,
    and other models' rows of the same run (say every objective in a gym) must stay.
    Returns the number of rows written.
    """
    rows = result.to_rows(run_id, model_label)
    with catalog.transaction() as con:
        con.execute("DELETE FROM evals WHERE run_id = ? AND model = ?", [run_id, model_label])
        if rows.height:
            con.register("_incoming_evals", rows.to_arrow())
            try:
                con.execute(
                    "INSERT INTO evals (run_id, model, metric, value, n, details) "
                    "SELECT run_id, model, metric, value, n, CAST(details AS JSON) FROM _incoming_evals"
                )
            finally:
                con.unregister("_incoming_evals")
    return rows.height


# --------------------------------------------------------------------------------------------------
# Held-out data for the sorting task


class HeldoutSet(NamedTuple):
    """Held-out prompts (to sample) and clean pairs (to score), disjoint from the training prompts."""

    prompts: list[str]
    pairs: pl.DataFrame


def _number_key(prompt: str) -> tuple[int, ...]:
    """A prompt's numbers as a sorted tuple: two prompts with one key share the same answer."""
    return tuple(sorted(prompt_numbers(prompt)))


def heldout_sorting_set(
    n_prompts: int,
    n_pairs: int,
    seed: int = 0,
    *,
    template: PreferenceSetConfig | None = None,
    train_config: PreferenceSetConfig | None = None,
    exclude_prompts: Iterable[str] = (),
) -> HeldoutSet:
    """Held-out sorting prompts and CLEAN held-out pairs (``label_noise=0``, truth columns kept).

    Disjointness from training is ensured in two ways:

    1. seed space: prompts come from seed ``HELDOUT_SEED_BASE + 3*seed`` and pairs from a
       ``generate_preferences`` config with seed ``HELDOUT_SEED_BASE + 3*seed + 1`` (it uses
       that seed and the next one), so different held-out seeds never share a stream and no
       training config with a seed below ``HELDOUT_SEED_BASE`` does either;
    2. content: any candidate whose set of numbers equals that of a training prompt (the
       prompts of ``train_config``'s preference set and ``exclude_prompts``) is dropped and
       replaced by a fresh draw; comparing number sets, not strings, also rules out the same
       numbers in another order, which has the same answer. Held-out prompts are also unique.

    ``template`` (a ``PreferenceSetConfig``) sets list lengths and the pathology mix of the
    pairs (default: the defaults); only size, seed and label noise are overridden.
    """
    if n_prompts < 0 or n_pairs < 0:
        raise ValueError("n_prompts and n_pairs must be non-negative")
    template = template or PreferenceSetConfig()
    excluded = {_number_key(p) for p in exclude_prompts}
    if train_config is not None:
        excluded |= {_number_key(p) for p in generate_preferences(train_config)["prompt"].to_list()}

    base = HELDOUT_SEED_BASE + 3 * seed
    prompts: list[str] = []
    seen = set(excluded)
    draw = _PROMPT_DRAW  # fixed, so a smaller set is a prefix of a larger one with the same seed
    while len(prompts) < n_prompts:
        for numbers in sample_prompts(draw, base, template.list_length, template.max_value):
            key = tuple(sorted(numbers))
            if key not in seen:
                seen.add(key)
                prompts.append(make_prompt(numbers))
                if len(prompts) == n_prompts:
                    break
        draw *= 2  # same seed, longer stream: earlier draws repeat and are skipped as seen
        if draw > 1_000_000 and len(prompts) < n_prompts:
            raise ValueError(f"cannot find {n_prompts} held-out prompts outside the training set")

    size = max(16, int(n_pairs * 1.3) + 8)
    pairs = pl.DataFrame()
    while n_pairs:
        config = replace(template, size=size, seed=base + 1, label_noise=0.0)
        frame = generate_preferences(config)
        keys = [_number_key(p) for p in frame["prompt"].to_list()]
        frame = frame.filter(pl.Series([k not in excluded for k in keys], dtype=pl.Boolean))
        if frame.height >= n_pairs:
            pairs = frame.head(n_pairs)
            break
        if size > 1_000_000:
            raise ValueError(f"cannot find {n_pairs} held-out pairs outside the training set")
        size *= 2
    return HeldoutSet(prompts, pairs)
