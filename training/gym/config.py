"""GymConfig: everything one gym run depends on, recorded next to its results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from training.gym.arms import ARMS, check_arms
from training.sorting import PreferenceSetConfig
from training.tiny_config import TinyModelConfig


def _default_learning_rate() -> float:
    from training.config import TrainConfig

    return TrainConfig().learning_rate


@dataclass(frozen=True)
class GymConfig:
    """Everything one gym run depends on; ``to_dict`` is recorded next to the results."""

    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ARMS
    # the preference set (one per noise level and seed, seed = the gym seed)
    size: int = 2400
    noise_levels: tuple[float, ...] = (0.0, 0.2, 0.4)  # label noise: share of flipped pairs, one run per level
    verbosity_bias: float = 0.3
    low_edit_share: float = 0.3
    margin_spread: float = 1.0
    rating_noise: float = 0.15
    # training: the budget is epochs passes over the raw set, in optimizer steps
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = field(default_factory=lambda: _default_learning_rate())  # the product default
    max_length: int = 128
    stages: int = 2
    # evaluation (one held-out set for all seeds)
    eval_prompts: int = 300
    eval_pairs: int = 400
    eval_beta: float = 0.1
    max_new_tokens: int = 24
    eval_seed: int = 0
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    workers: int = 2

    def __post_init__(self) -> None:
        check_arms(self.arms)
        if not self.seeds:
            raise ValueError("the gym needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if not self.noise_levels or len(set(self.noise_levels)) != len(self.noise_levels):
            raise ValueError(f"noise levels must be distinct and at least one, got {self.noise_levels}")
        if not all(0.0 <= n < 0.5 for n in self.noise_levels):
            raise ValueError(f"noise levels are shares of flipped labels in [0, 0.5), got {self.noise_levels}")

    @property
    def primary_noise(self) -> float:
        """The level the claims were first stated at (20%) when it runs, else the first level."""
        return 0.2 if 0.2 in self.noise_levels else self.noise_levels[0]

    def units(self) -> list[tuple[float, int]]:
        """(noise level, seed) of every preparation, in report order."""
        return [(noise, seed) for noise in self.noise_levels for seed in self.seeds]

    def preference_config(self, seed: int, noise: float | None = None) -> PreferenceSetConfig:
        noise = self.primary_noise if noise is None else noise
        return PreferenceSetConfig(size=self.size, seed=seed, label_noise=noise,
                                   verbosity_bias=self.verbosity_bias, low_edit_share=self.low_edit_share,
                                   margin_spread=self.margin_spread, rating_noise=self.rating_noise)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seeds"], out["arms"], out["noise_levels"] = list(self.seeds), list(self.arms), list(self.noise_levels)
        return out

    @classmethod
    def quick(cls, **overrides: Any) -> GymConfig:
        """A cut-down gym for tests and smoke runs: small set, small model, few steps (not for claims)."""
        tiny = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, sft_steps=40,
                               sft_batch_size=16)
        base = {"seeds": (0,), "noise_levels": (0.2,), "size": 160, "eval_prompts": 12, "eval_pairs": 16,
                "max_new_tokens": 12,
                "batch_size": 16, "tiny": tiny, "workers": 0}
        return cls(**{**base, **overrides})


def with_overrides(config: GymConfig, **overrides: Any) -> GymConfig:
    """A copy with the non-None overrides applied (the CLI's flags)."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
