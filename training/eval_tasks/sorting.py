"""The sorting task (the demo's and the gym's): a gold reward, fresh held-out prompts and clean pairs.

The data generator is :mod:`training.sorting`; this module holds what evaluating on the task
needs: held-out prompts and clean pairs disjoint from a run's training prompts
(:func:`heldout_sorting_set`) and the exact gold reward. Registered as ``sorting``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import polars as pl

from training.eval_tasks.registry import EvalData, register_task
from training.sorting import (
    PreferenceSetConfig,
    generate_preferences,
    gold_reward,
    make_prompt,
    prompt_numbers,
    sample_prompts,
)

if TYPE_CHECKING:
    from curation.store import Catalog
    from training.evaluate.metrics import GoldReward

# Held-out sorting data lives in its own seed space, far above the small seeds training
# configs use (the demo uses seed 7), so its random streams are unrelated to training's.
# Seed spaces alone cannot rule out a chance repeat of a prompt (a 3-number list has only
# 50*49*48 orderings), which is why heldout_sorting_set also checks content explicitly.
HELDOUT_SEED_BASE = 1_000_003

_PROMPT_DRAW = 4096  # candidate prompts drawn per try by heldout_sorting_set


# --------------------------------------------------------------------------------------------------
# Held-out data for the sorting task


class HeldoutSet(NamedTuple):
    """Held-out prompts (to sample) and clean pairs (to score), disjoint from the training prompts."""

    prompts: list[str]
    pairs: pl.DataFrame


def number_key(prompt: str) -> tuple[int, ...]:
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
    excluded = {number_key(p) for p in exclude_prompts}
    if train_config is not None:
        excluded |= {number_key(p) for p in generate_preferences(train_config)["prompt"].to_list()}

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
        keys = [number_key(p) for p in frame["prompt"].to_list()]
        frame = frame.filter(pl.Series([k not in excluded for k in keys], dtype=pl.Boolean))
        if frame.height >= n_pairs:
            pairs = frame.head(n_pairs)
            break
        if size > 1_000_000:
            raise ValueError(f"cannot find {n_pairs} held-out pairs outside the training set")
        size *= 2
    return HeldoutSet(prompts, pairs)


@dataclass(frozen=True)
class SortingTask:
    """Held-out sorting prompts and clean pairs, disjoint from the run's prompts; the gold reward."""

    name: str = "sorting"
    description: str = "sorting lists: gold reward, fresh held-out prompts and clean pairs"

    @property
    def gold_reward(self) -> GoldReward:
        return gold_reward

    def data(self, catalog: Catalog, run_id: str, *, prompts: int, pairs: int, seed: int) -> EvalData:
        from curation.reads import run_pair_texts

        trained = run_pair_texts(catalog, run_id, ("prompt",))["prompt"].to_list()
        heldout = heldout_sorting_set(prompts, pairs, seed, exclude_prompts=trained)
        return EvalData(heldout.prompts, heldout.pairs, heldout=True)


SORTING = register_task(SortingTask())
