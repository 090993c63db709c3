"""The default task for user data: the prompts curation held out, and their pairs; no gold reward.

Curation holds out a seeded share of the run's prompts (curation/heldout.py, decision reason
``heldout``); none of their pairs is in a shard, so the policy never trained on them, and the
rows say ``heldout: true``. Conversations stay conversations: prompts are sampled through the
model's chat template and pairs scored on TRL's tokens. A run curated with the split off
(``curate.heldout.share: 0``) falls back to a seeded sample of its own pairs, and the rows then
say ``heldout: false``. A reward model given as ``eval.reward_model`` judges the samples
(training/evaluate/judge.py). Registered as ``pairs``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

from training.eval_tasks.registry import EvalData, register_task

if TYPE_CHECKING:
    from curation.store import Catalog

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairsTask:
    """The run's held-out prompts and pairs (or, with no split, a seeded sample of its own); no gold reward."""

    name: str = "pairs"
    description: str = "user data: the prompts curation held out and their pairs (heldout: true), no gold reward"

    @property
    def gold_reward(self) -> None:
        return None

    def data(self, catalog: Catalog, run_id: str, *, prompts: int, pairs: int, seed: int) -> EvalData:
        from curation.reads import heldout_pairs, run_export_pairs, run_is_conversational

        rows, heldout = heldout_pairs(catalog, run_id), True
        if rows.height == 0:
            logger.warning("run %s has no held-out prompts (curate.heldout.share 0?): evaluating on a sample of "
                           "its own training pairs (heldout: false)", run_id)
            rows, heldout = run_export_pairs(catalog, run_id), False
        sample = rows.sample(min(pairs, rows.height), seed=seed, shuffle=True)
        if run_is_conversational(catalog, run_id):
            return _conversational(rows, sample, prompts, seed, heldout)
        unique = rows.select("prompt").unique(maintain_order=True)
        # at most the distinct prompts there are (several pairs may share one prompt)
        unique_prompts = unique.sample(min(prompts, unique.height), seed=seed)["prompt"].to_list()
        return EvalData(unique_prompts, sample.select("pair_id", "prompt", "chosen", "rejected"), heldout=heldout)


def _conversational(rows: pl.DataFrame, sample: pl.DataFrame, prompts: int, seed: int, heldout: bool) -> EvalData:
    """Prompts and pairs as message lists, decoded exactly as the run's shards give them to TRL."""
    from curation.score.scoring import conversation_frame

    pairs = conversation_frame(sample)
    distinct = conversation_frame(rows.unique("prompt", keep="first", maintain_order=True))
    distinct = distinct.sample(min(prompts, distinct.height), seed=seed)
    tools = distinct["tools"].to_list() if "tools" in distinct.columns else None
    return EvalData(distinct["prompt"].to_list(), pairs, heldout=heldout, prompt_tools=tools)


PAIRS = register_task(PairsTask())
