"""Step budgets: every arm of a seed makes the same number of optimizer steps.

The budget is ``epochs`` passes over the raw set at ``batch_size``. Arms that train on fewer
pairs (the filtered ones) see their pairs a little more often; staged arms split the steps
over their stages in proportion to stage size. Pure arithmetic, tested exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.gym.config import GymConfig


def batches(pairs: int, batch_size: int) -> int:
    """Optimizer steps of one pass over ``pairs`` (the last batch may be short, as in the Trainer)."""
    return max(1, math.ceil(pairs / batch_size))


def budget_steps(raw_pairs: int, config: GymConfig) -> int:
    """The per-seed budget: ``epochs`` passes over the raw set, in optimizer steps."""
    return max(1, math.ceil(config.epochs * batches(raw_pairs, config.batch_size)))


def epochs_for_steps(steps: int, pairs: int, batch_size: int) -> float:
    """``num_train_epochs`` that makes the HF Trainer run exactly ``steps`` optimizer steps.

    The Trainer runs ``ceil(epochs * batches)`` steps; asking for ``steps - 0.5`` batches' worth
    lands strictly inside the right integer, so float rounding cannot add a step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return (steps - 0.5) / batches(pairs, batch_size)


def split_steps(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` steps over stages in proportion to their sizes (largest remainder, each >= 1)."""
    sizes = [max(0, int(s)) for s in sizes]
    if not sizes or sum(sizes) == 0:
        raise ValueError("split_steps needs at least one non-empty stage")
    if total < len(sizes):
        raise ValueError(f"{total} steps cannot cover {len(sizes)} stages")
    exact = [total * s / sum(sizes) for s in sizes]
    out = [max(1, math.floor(x)) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    i = 0
    while sum(out) < total:
        out[order[i % len(order)]] += 1
        i += 1
    while sum(out) > total:  # only when the floor of 1 pushed a tiny stage up
        j = max(range(len(out)), key=lambda k: out[k])
        out[j] -= 1
    return out

