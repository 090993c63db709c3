"""A reward model as judge: mean reward of policy and reference samples, and the policy's win rate.

Why: user data has no gold reward, and the seed papers (DPO, beta-DPO, sDPO) evaluate with a
judge model. Any ``AutoModelForSequenceClassification`` checkpoint works (logit 0 is the
reward, as TRL's reward models write it); it reads prompt and response through its own chat
template for conversations (:func:`curation.score.margins.reward_scores`). The numbers are only
as good as the judge: they are reported under their own names (``judge_*``), never as a gold
reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curation.errors import WinnowError
from training.evaluate.metrics import mean_and_se, win_rate, win_tie_loss


@dataclass
class Judge:
    """A loaded reward model, its tokenizer and where it came from (recorded with the metrics)."""

    model: Any
    tokenizer: Any
    name: str

    def rewards(self, prompts: list, responses: list[str], *, max_length: int | None = None,
                progress: bool = False) -> np.ndarray:
        from curation.score.margins import reward_scores

        return reward_scores(self.model, self.tokenizer, prompts, responses, max_length=max_length, progress=progress)


def load_judge(path: str | Path) -> Judge:
    """Load a sequence-classification reward model and its tokenizer from a local folder (or the hub cache).

    A folder that is missing or holds something else fails in one line (WinnowError).
    """
    from transformers import AutoModelForSequenceClassification

    from curation.lm.loading import load_tokenizer, pick_device

    device, _ = pick_device()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise WinnowError(f"eval.reward_model {str(path)!r} is not a sequence-classification model: {first}") from None
    if model.config.num_labels < 1:
        raise WinnowError(f"eval.reward_model {str(path)!r} has no output label to read a reward from")
    return Judge(model.to(device), load_tokenizer(path), str(path))


def judge_metrics(judge: Judge, prompts: list, policy_texts: list[str], reference_texts: list[str], *,
                  max_length: int | None = None, progress: bool = False
                  ) -> tuple[dict[str, float], dict[str, dict[str, Any]], np.ndarray, np.ndarray]:
    """(metrics, details, policy rewards, reference rewards) of one sample per prompt from each model.

    ``judge_reward`` / ``judge_reward_ref``: mean reward (with its standard error);
    ``judge_win_rate``: share of prompts where the policy's sample gets the higher reward, ties half.
    """
    rewards = judge.rewards(list(prompts) * 2, list(policy_texts) + list(reference_texts), max_length=max_length,
                            progress=progress)
    n = len(prompts)
    pol, ref = rewards[:n], rewards[n:]
    metrics: dict[str, float] = {}
    details: dict[str, dict[str, Any]] = {}
    for name, values in (("judge_reward", pol), ("judge_reward_ref", ref)):
        mean, se = mean_and_se(values)
        metrics[name], details[name] = mean, {"se": se, "judge": judge.name}
    wins, ties, losses = win_tie_loss(pol, ref)
    metrics["judge_win_rate"] = win_rate(pol, ref)
    details["judge_win_rate"] = {"wins": wins, "ties": ties, "losses": losses, "judge": judge.name}
    return metrics, details, pol, ref
