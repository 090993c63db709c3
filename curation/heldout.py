"""Held-out prompts: a seeded share of a run's prompts that never reach a shard, for evaluation.

Why at curation and by prompt: evaluating user data on pairs the policy was trained on
measures memory, not preference learning. The split groups pairs by their prompt (the
message list for conversations, else the text), so no prompt is on both sides: a prompt with
several pairs is held out whole or not at all. The draw is a seeded permutation of the sorted
distinct prompt keys, so the same pairs and seed hold out the same prompts, whatever the
input order. Held-out pairs get the decision reason ``heldout`` and the ``pairs`` evaluation
task reads them back (``curation.reads.heldout_pairs``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl

from curation.config_fields import setting
from curation.errors import WinnowError


@dataclass(frozen=True)
class HeldoutConfig:
    """How many prompts curation holds out of training for evaluation."""

    share: float = setting(0.03, help="Share of the run's distinct prompts held out for evaluation (their pairs "
                                      "never reach a shard; decision reason heldout); 0 turns it off.")
    max_prompts: int = setting(500, help="At most this many held-out prompts, whatever the share.")
    seed: int = setting(0, help="Seed of the held-out draw (same pairs and seed: same prompts).")

    def __post_init__(self) -> None:
        if not 0.0 <= self.share < 1.0:
            raise WinnowError(f"heldout.share must be in [0, 1), got {self.share}")
        if self.max_prompts < 0:
            raise WinnowError(f"heldout.max_prompts must be >= 0, got {self.max_prompts}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def count(self, prompts: int) -> int:
        """Prompts to hold out of ``prompts`` distinct ones: ceil(share * n), capped, never all of them."""
        if self.share == 0.0 or prompts < 2:
            return 0
        return int(min(math.ceil(self.share * prompts), self.max_prompts, prompts - 1))


@dataclass
class HeldoutSplit:
    """Which pairs are held out, and the numbers the decision detail and the report cite."""

    mask: np.ndarray  # per pair of the input frame: True when its prompt is held out
    prompts: int  # distinct prompts of the run
    heldout_prompts: int

    @property
    def pairs(self) -> int:
        return int(self.mask.sum())

    def detail(self, config: HeldoutConfig) -> str:
        return (f"prompt held out for evaluation ({self.heldout_prompts} of {self.prompts} prompts: share "
                f"{config.share:g}, cap {config.max_prompts}, seed {config.seed})")

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "heldout_prompts": self.heldout_prompts, "heldout_pairs": self.pairs}


def split_heldout(prompt_keys: pl.Series, config: HeldoutConfig) -> HeldoutSplit:
    """Hold out ``config.count`` distinct prompt keys, drawn by a seeded permutation of the sorted keys."""
    keys = prompt_keys.cast(pl.String).fill_null("")
    distinct = keys.unique().sort()
    n = config.count(distinct.len())
    if n == 0:
        return HeldoutSplit(np.zeros(keys.len(), dtype=bool), distinct.len(), 0)
    rng = np.random.default_rng(config.seed)
    chosen = distinct.gather(np.sort(rng.permutation(distinct.len())[:n]))
    return HeldoutSplit(keys.is_in(chosen.implode()).to_numpy(), distinct.len(), n)
