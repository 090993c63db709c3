"""Evaluate a pipeline run's final policy against its reference, and record it in the catalog.

The evaluation task is named by configuration (``eval.task``; see :mod:`training.eval_tasks`),
never detected from the data: ``sorting`` (the demo) evaluates on fresh held-out prompts and
clean pairs disjoint from the run's prompts, with a gold reward; ``pairs`` (user data) runs the
reward-free metrics on the prompts curation held out (``heldout: true``), and with
``reward_model`` a judge's mean rewards and win rate.
"""

from __future__ import annotations

from typing import Any

POLICY_LABEL = "policy"


def evaluate_run(catalog, run_id: str, policy_path: str, reference_path: str, *, task: str,  # noqa: ANN001
                 prompts: int = 200, pairs: int = 300, max_new_tokens: int = 24, max_length: int | None = 128,
                 beta: float = 0.1, seed: int = 1234, progress: bool = True,
                 reward_model: str | None = None) -> dict[str, Any]:
    """Evaluate ``policy_path`` against ``reference_path`` on evaluation task ``task``; rows go to `evals`.

    ``reward_model``: an ``AutoModelForSequenceClassification`` folder that judges the samples.
    An unknown ``task`` fails (WinnowError, listing the tasks) before any model is loaded.
    """
    from curation.lm.loading import load_model, load_tokenizer
    from training.eval_tasks import get_task
    from training.evaluate import evaluate, write_evals
    from training.evaluate.judge import load_judge

    eval_task = get_task(task)
    data = eval_task.data(catalog, run_id, prompts=prompts, pairs=pairs, seed=seed)
    judge = load_judge(reward_model) if reward_model else None
    tokenizer = load_tokenizer(reference_path)
    result = evaluate(load_model(policy_path), load_model(reference_path), tokenizer, data.prompts, data.pairs,
                      gold_reward=eval_task.gold_reward, beta=beta, max_new_tokens=max_new_tokens,
                      max_length=max_length, seed=seed, progress=progress, judge=judge,
                      prompt_tools=data.prompt_tools)
    result.settings.update({"task": eval_task.name, "heldout": data.heldout, "policy": str(policy_path),
                            "reference": str(reference_path)})
    write_evals(catalog, run_id, result, POLICY_LABEL)
    return {k: float(v) for k, v in result.metrics.items()}
