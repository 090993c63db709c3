"""Training settings as one dataclass (TRL style), and how `objective="auto"` is resolved."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from curation.config_fields import setting

if TYPE_CHECKING:
    from training.objectives import Objective


@dataclass
class TrainConfig:
    """What a user sets for a staged DPO run; everything else follows TRL's defaults."""

    objective: str = setting("auto", help="auto (follow the curation advice) or a preset: "
                                          "dpo, dpop, ln-dpo, minor-dpo, beta-dpo.")
    objective_overrides: dict[str, Any] = setting(default_factory=dict, help="Objective options on top of the preset "
                                                                             "(e.g. {dpop_lambda: 50}).")
    # Sized for the tiny default model (the gym: 5e-4 drove plain DPO ~4 nats of KL away and
    # degraded it; 1e-4 did not).
    learning_rate: float = setting(1e-4, help="Peak learning rate (sized for winnow-tiny; ~5e-7 for a real LLM).")
    num_epochs: float = setting(1.0, help="Passes over each stage.")
    batch_size: int = setting(16, help="Pairs per device per step.")
    gradient_accumulation_steps: int = setting(1, help="Steps accumulated per optimizer update.")
    max_length: int | None = setting(None, help="None: curation's (the shard manifest's). Another value is "
                                                "honoured, and stage 1 then recomputes its reference log-probs.")
    truncation_mode: str | None = setting(None, help="None: curation's (the shard manifest's).")
    lr_scheduler_type: str = setting("linear", help="Schedule, fresh for every sDPO stage.")
    warmup_ratio: float = setting(0.1, help="Share of each stage's steps spent warming up.")
    seed: int = setting(0, help="Training seed (data order, beta-DPO's draws).")
    logging_steps: int = setting(5, help="Log (and record in train_metrics) every N steps.")
    lora: bool = setting(False, help="Train LoRA adapters (merged after every stage).")
    lora_r: int = setting(16, help="LoRA rank.")
    lora_alpha: int = setting(32, help="LoRA alpha.")
    packing: str = setting("auto", help="auto|on|off: train on padding-free packed rows (chosen and rejected share "
                                        "the prompt; loss and gradients equal the padded ones). auto: on where exact "
                                        "and faster (CPU; CUDA with flash-attn), the choice logged; on: fail where "
                                        "not exact.")
    reuse_reference_logps: bool = setting(True, help="Stage 1 reuses curation's reference log-probs when they match.")
    max_stages: int | None = setting(None, help="Train only the first N stages.")
    report_to: str | list[str] = setting("none", help="Trackers TRL logs every training step to, as DPOConfig's "
                                                      "report_to: none, all (every one installed), or names "
                                                      "(comma-separated or a list) among tensorboard, wandb, mlflow, "
                                                      "trackio. tensorboard writes under each stage folder, logs/.")
    # The gym decided the default (benchmarks/GYM.md: +0.008 gold reward at 20% label noise, no loss elsewhere).
    online_curation: Literal["auto"] | bool = setting(
        "auto", help="Online curation between sDPO stages: before stage k+1, re-score the pairs not yet taught "
                     "(later stages and the beta filter's drops) with the stage-k policy margin, re-run the "
                     "beta-guided filter at the same share and re-stage them; every round's decisions go to the "
                     "catalog table decision_rounds (training/online.py). auto (default): on wherever it can run "
                     "(the run's catalog holds its decisions, plain-text pairs, one process), else skipped with a "
                     "warning; true: required (an error where it cannot run); false: off.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trackers(report_to: str | list[str]) -> list[str]:
    """``report_to`` as the list DPOConfig takes; a named tracker that is not installed is a WinnowError.

    "none" is no tracker, "all" every installed one (TRL's meaning). Checked before training
    starts, so a missing package costs one line, not a traceback after the reference pass.
    """
    names = [n.strip() for n in (report_to.split(",") if isinstance(report_to, str) else report_to) if n.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return ["all"]
    from transformers.integrations import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    missing = [n for n in names if n not in available]
    if missing:
        from curation.errors import WinnowError

        raise WinnowError(f"train.report_to: {', '.join(missing)} not installed (installed trackers: "
                          f"{', '.join(sorted(available)) or 'none'}); pip install {' '.join(missing)}")
    return names


def resolve_objective(config: TrainConfig, advice: dict[str, Any] | None) -> Objective:
    """`auto` follows the curation advice (plain DPO when there is none); overrides always win."""
    from training.objectives import PRESETS, Objective  # torch: imported when training, not for `--help`

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
