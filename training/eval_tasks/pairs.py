"""The default task for user data: a seeded sample of the run's own pairs, no gold reward.

Not held out: the prompts and pairs were trained on, and the rows say so (``heldout: false``).
The reward-free metrics (length, implicit-reward accuracy, drift, KL) still compare the policy
with its reference. Registered as ``pairs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.eval_tasks.registry import EvalData, register_task

if TYPE_CHECKING:
    from curation.store import Catalog


@dataclass(frozen=True)
class PairsTask:
    """A seeded sample of the run's own prompts and pairs; no gold reward."""

    name: str = "pairs"
    description: str = "user data: a seeded sample of the run's own pairs (not held out), no gold reward"

    @property
    def gold_reward(self) -> None:
        return None

    def data(self, catalog: Catalog, run_id: str, *, prompts: int, pairs: int, seed: int) -> EvalData:
        from curation.reads import run_pair_texts

        run_pairs = run_pair_texts(catalog, run_id, ("prompt", "chosen", "rejected"))
        sample = run_pairs.sample(min(pairs, run_pairs.height), seed=seed, shuffle=True)
        unique = run_pairs.select("prompt").unique(maintain_order=True)
        # at most the distinct prompts there are (several pairs may share one prompt)
        unique_prompts = unique.sample(min(prompts, unique.height), seed=seed)["prompt"].to_list()
        return EvalData(unique_prompts, sample, heldout=False)


PAIRS = register_task(PairsTask())
