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

The package is generic: which prompts and pairs to use, and whether a gold reward exists, is
the evaluation task's business (:mod:`training.eval_tasks`, named by configuration). Modules:
``sampling`` (generation, exact-token log-probs), ``metrics`` (pure functions on arrays),
``driver`` (:func:`evaluate`, :class:`EvalResult`, the ``evals`` rows). A plain library: no Prefect.
"""

from training.evaluate.driver import EVAL_COLUMNS, EvalResult, evaluate, write_eval_rows, write_evals
from training.evaluate.metrics import (
    GoldReward,
    gold_rewards,
    implicit_margins,
    implicit_reward_accuracy,
    kl_estimate,
    length_stats,
    logp_drift,
    mean_and_se,
    mean_gold_reward,
    win_rate,
    win_tie_loss,
)
from training.evaluate.sampling import Samples, sample_responses, sample_tokens, sequence_logps, token_logps

__all__ = [
    "EVAL_COLUMNS",
    "EvalResult",
    "GoldReward",
    "Samples",
    "evaluate",
    "gold_rewards",
    "implicit_margins",
    "implicit_reward_accuracy",
    "kl_estimate",
    "length_stats",
    "logp_drift",
    "mean_and_se",
    "mean_gold_reward",
    "sample_responses",
    "sample_tokens",
    "sequence_logps",
    "token_logps",
    "win_rate",
    "win_tie_loss",
    "write_eval_rows",
    "write_evals",
]
