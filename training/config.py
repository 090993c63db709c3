"""Training settings as one dataclass (TRL style), and how `objective="auto"` is resolved."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from training.objectives import PRESETS, Objective


@dataclass
class TrainConfig:
    """What a user sets for a staged DPO run; everything else follows TRL's defaults."""

    objective: str = "auto"  # auto (follow the curation advice) or a preset name
    objective_overrides: dict[str, Any] = field(default_factory=dict)
    # Sized for the tiny default model (the gym: 5e-4 drove plain DPO ~4 nats of KL away and
    # degraded it; 1e-4 did not); pass ~5e-7 for a real LLM.
    learning_rate: float = 1e-4
    num_epochs: float = 1.0
    batch_size: int = 16  # per device
    gradient_accumulation_steps: int = 1
    max_length: int | None = 512  # must equal the scoring max_length for curated log-probs to be reused
    truncation_mode: str = "keep_start"
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.1
    seed: int = 0
    logging_steps: int = 5
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    reuse_reference_logps: bool = True
    max_stages: int | None = None  # train only the first N stages

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_objective(config: TrainConfig, advice: dict[str, Any] | None) -> Objective:
    """`auto` follows the curation advice (plain DPO when there is none); overrides always win."""
    if config.objective == "auto":
        name = (advice or {}).get("objective") or "dpo"
        params = dict((advice or {}).get("params") or {})
    else:
        if config.objective not in PRESETS:
            from curation.errors import WinnowError

            raise WinnowError(f"unknown objective {config.objective!r}; choose auto or one of {', '.join(PRESETS)}")
        name, params = config.objective, {}
    params.update(config.objective_overrides)
    params.setdefault("seed", config.seed)
    return Objective.from_preset(name, **params)
