"""Evaluation metrics: small pure functions on arrays, tested on hand-made numbers."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

GoldReward = Callable[[str, str], float]


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
