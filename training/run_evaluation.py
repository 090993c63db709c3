"""Evaluate a pipeline run's final policy against its reference, and record it in the catalog.

For the sorting task (the demo and the gym) the held-out prompts and clean pairs are fresh
draws, disjoint from the run's prompts, and the gold reward is known. For any other data
there is no gold reward and no held-out split: the reward-free metrics run on a seeded
sample of the run's own pairs, and the rows say so (`heldout: false`).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from training.sorting import PROMPT_PREFIX, gold_reward

POLICY_LABEL = "policy"


def evaluation_data(catalog, run_id: str, prompts: int, pairs: int, seed: int) -> tuple[list[str], pl.DataFrame, bool]:  # noqa: ANN001
    """(prompts to sample, pairs to score, whether they are truly held out)."""
    run_pairs = catalog.query("SELECT prompt, chosen, rejected FROM pairs WHERE run_id = ?", [run_id], read_only=False)
    if run_pairs.height and run_pairs["prompt"].str.starts_with(PROMPT_PREFIX).all():
        from training.evaluate import heldout_sorting_set

        heldout = heldout_sorting_set(prompts, pairs, seed, exclude_prompts=run_pairs["prompt"].to_list())
        return heldout.prompts, heldout.pairs, True
    sample = run_pairs.sample(min(pairs, run_pairs.height), seed=seed, shuffle=True)
    unique_prompts = run_pairs.select("prompt").unique(maintain_order=True).sample(
        min(prompts, run_pairs.height), seed=seed)["prompt"].to_list()
    return unique_prompts, sample, False


def evaluate_run(catalog, run_id: str, policy_path: str, reference_path: str, *, prompts: int = 200,  # noqa: ANN001
                 pairs: int = 300, max_new_tokens: int = 24, max_length: int | None = 128, beta: float = 0.1,
                 seed: int = 1234, progress: bool = True) -> dict[str, Any]:
    from curation.lm.loading import load_model, load_tokenizer
    from training.evaluate import evaluate, write_evals

    eval_prompts, eval_pairs, heldout = evaluation_data(catalog, run_id, prompts, pairs, seed)
    tokenizer = load_tokenizer(reference_path)
    result = evaluate(load_model(policy_path), load_model(reference_path), tokenizer, eval_prompts, eval_pairs,
                      gold_reward=gold_reward if heldout else None, beta=beta, max_new_tokens=max_new_tokens,
                      max_length=max_length, seed=seed, progress=progress)
    result.settings.update({"heldout": heldout, "policy": str(policy_path), "reference": str(reference_path)})
    write_evals(catalog, run_id, result, POLICY_LABEL)
    return {k: float(v) for k, v in result.metrics.items()}
