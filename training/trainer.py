"""TRL's DPOTrainer with Winnow's composable objective in place of its loss.

Two seams, both as narrow as TRL 1.x allows:
- `_compute_loss`: TRL computes the loss inline after the forward pass, so the override keeps
  TRL's forward (fused LM head) and reference path (`compute_ref_log_probs`) and swaps only the
  arithmetic for `Objective.loss`;
- `_precompute_ref_logps`: a dataset that already carries `ref_chosen_logps` /
  `ref_rejected_logps` (computed during curation, or by the fast scorer between sDPO stages)
  is used as it is, so no reference forward pass runs at all during training.

Packing (`packing="auto"|"on"|"off"`, see `training.packing`): the policy forward runs on TRL's
padded batch re-laid as one unpadded row (`_policy_logps`); collation, the reference path and
everything after the log-probs are unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from trl import DPOTrainer

from curation.manifest import REF_LOGP_COLUMNS as REF_COLUMNS
from curation.progress import Bar, open_bar
from training.objectives import Objective
from training.packing import PackingChoice, choose_packing, pack_batch, packed_logps

_NON_MODEL_KEYS = {"completion_mask", *REF_COLUMNS}
OBJECTIVE_STATE_FILE = "winnow_objective.json"
logger = logging.getLogger(__name__)


class WinnowDPOTrainer(DPOTrainer):
    """DPOTrainer whose loss is `objective.loss`; all other TRL behaviour is unchanged."""

    def __init__(self, *args: Any, objective: Objective, packing: str = "auto", **kwargs: Any) -> None:
        self.objective = objective
        self.packing = PackingChoice(False, "not chosen yet")  # TRL's constructor runs forwards (precompute)
        # for reports: "packed": tokens of the packed rows (packing off: the batches' real tokens);
        # "padded": tokens of TRL's padded batches; their ratio is the padding packing removes
        self.packing_tokens = {"packed": 0, "padded": 0}
        super().__init__(*args, **kwargs)
        self.packing = self._choose_packing(packing)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):  # noqa: ANN001 - datasets.Dataset
        if set(REF_COLUMNS) <= set(dataset.column_names):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _compute_loss(self, model, inputs: dict[str, torch.Tensor], return_outputs: bool):  # noqa: ANN001
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        chosen_logps, rejected_logps, outputs = self._policy_logps(model, inputs)

        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            reference = self.ref_model if self.ref_model is not None else model
            ref_chosen, ref_rejected = self.compute_ref_log_probs(reference, inputs)
        ref_chosen = ref_chosen.to(chosen_logps.device, chosen_logps.dtype)
        ref_rejected = ref_rejected.to(chosen_logps.device, chosen_logps.dtype)
        chosen_lengths, rejected_lengths = completion_mask.sum(dim=1).chunk(2, dim=0)

        loss, stats = self.objective.loss(
            chosen_logps,
            rejected_logps,
            ref_chosen,
            ref_rejected,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            update_stats=mode == "train",
        )
        self._log_stats(mode, stats, chosen_logps.detach(), rejected_logps.detach())
        return (loss, outputs) if return_outputs else loss

    def _policy_logps(self, model, inputs: dict[str, torch.Tensor]):  # noqa: ANN001, ANN202
        """(chosen, rejected) summed completion log-probs of the policy, and the model outputs.

        Packed: one unpadded row (training.packing); padded: TRL's own forward on its batch.
        """
        if self.packing.enabled:
            batch = pack_batch(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
            self.packing_tokens["packed"] += batch.tokens
            self.packing_tokens["padded"] += batch.padded_tokens
            logps, outputs = packed_logps(model, batch, varlen=self.packing.varlen)
            return (*logps.chunk(2, dim=0), outputs)
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = completion_mask.size(1) - 1
        self.packing_tokens["packed"] += int(inputs["attention_mask"].sum())
        self.packing_tokens["padded"] += completion_mask.numel()
        return (*outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0), outputs)

    def _choose_packing(self, mode: str) -> PackingChoice:
        """Resolve the packing option for this model and data; the choice is logged."""
        peft_config = getattr(self.model, "active_peft_config", None)
        choice = choose_packing(mode, self.model, self._longest_sequence(),
                                prompt_tuning=bool(getattr(peft_config, "is_prompt_learning", False)))
        (logger.info if choice.enabled or mode == "off" else logger.warning)("training: %s", choice.reason)
        return choice

    def _longest_sequence(self) -> int:
        """Longest prompt + completion of the training set, at most max_length (read from Arrow, no row loop)."""
        import pyarrow.compute as pc

        data = getattr(self.train_dataset, "data", None)
        longest = 0
        if data is not None and {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(data.column_names):
            prompt = pc.list_value_length(data.column("prompt_ids"))
            completion = pc.max_element_wise(pc.list_value_length(data.column("chosen_ids")),
                                             pc.list_value_length(data.column("rejected_ids")))
            longest = int(pc.max(pc.add(prompt, completion)).as_py() or 0)
        else:  # an iterable dataset: only max_length bounds it
            longest = self.args.max_length or 1 << 30
        return min(longest, self.args.max_length) if self.args.max_length else longest

    def _packing_scope(self, model):  # noqa: ANN001, ANN202
        """The packed attention held over a whole step, backward included (recomputed checkpoints see it too)."""
        from curation.lm.packed_attention import packed_attention

        return packed_attention(model) if self.packing.enabled else nullcontext()

    def training_step(self, model, inputs, *args: Any, **kwargs: Any):  # noqa: ANN001, ANN201
        with self._packing_scope(model):
            return super().training_step(model, inputs, *args, **kwargs)

    def prediction_step(self, model, inputs, *args: Any, **kwargs: Any):  # noqa: ANN001, ANN201
        with self._packing_scope(model):
            return super().prediction_step(model, inputs, *args, **kwargs)

    def _log_stats(self, mode: str, stats: dict[str, Any], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Same metric names as TRL, plus beta and the kept fraction of beta-DPO."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        chosen_rewards, rejected_rewards = stats["chosen_rewards"], stats["rejected_rewards"]
        metrics["beta"].append(float(stats["beta"]))
        metrics["kept_fraction"].append(gather(stats["mask"].float()).mean().item())
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["logps/chosen"].append(gather(chosen).mean().item())
        metrics["logps/rejected"].append(gather(rejected).mean().item())

    def _save_checkpoint(self, model, trial) -> None:  # noqa: ANN001
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if folder.is_dir():
            (folder / OBJECTIVE_STATE_FILE).write_text(json.dumps(self.objective.state_dict()))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:  # noqa: ANN001
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        state = Path(resume_from_checkpoint) / OBJECTIVE_STATE_FILE
        if state.is_file():
            self.objective.load_state_dict(json.loads(state.read_text()))


_METRIC_COLUMNS = {
    "loss": "loss",
    "beta": "beta",
    "kept_fraction": "kept_fraction",
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/margins": "rewards_margins",
    "rewards/accuracies": "rewards_accuracies",
    "logps/chosen": "logps_chosen",
    "logps/rejected": "logps_rejected",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
}


class MetricsRecorder(TrainerCallback):
    """Collects every training log line as a `train_metrics` row; `sink` gets them at the end."""

    def __init__(self, stage: int, objective: str, sink: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        self.stage, self.objective, self.sink = stage, objective, sink
        self.rows: list[dict[str, Any]] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:  # noqa: ANN001 - TrainerCallback API
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        row = {column: _float(logs.get(key)) for key, column in _METRIC_COLUMNS.items()}
        row.update(stage=self.stage, objective=self.objective, step=state.global_step, epoch=_float(state.epoch),
                   logged_at=datetime.now(UTC).replace(tzinfo=None))
        self.rows.append(row)

    def on_train_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001
        if self.sink is not None and state.is_world_process_zero:
            self.sink(self.rows)


class StepProgress(TrainerCallback):
    """Optimizer steps of one stage as a bar of curation.progress, with the loss and reward margin beside it.

    Replaces transformers' tqdm bar (``disable_tqdm=True``) so that the CLI's live display (or
    tqdm, when nothing is installed) shows training like every other long step.
    """

    def __init__(self, description: str, enabled: bool = True) -> None:
        self.description, self.enabled = description, enabled
        self.bar: Bar | None = None

    def on_train_begin(self, args, state, control, **kwargs) -> None:  # noqa: ANN001 - TrainerCallback API
        if state.is_world_process_zero:
            self.bar = open_bar(self.description, state.max_steps or None, "step", enabled=self.enabled)

    def on_step_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:  # noqa: ANN001
        if self.bar is not None and logs and "loss" in logs:
            shown = {"loss": logs.get("loss"), "margin": logs.get("rewards/margins")}
            self.bar.set_postfix(**{k: f"{float(v):.3f}" for k, v in shown.items() if v is not None})

    def on_train_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item()
    return float(value)
