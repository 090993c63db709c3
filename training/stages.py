"""sDPO: train the stages one after another, each against the model the previous one produced.

Stage k starts from, and is referenced against, the model of stage k-1 (stage 1: the base
model). Each stage gets a fresh learning-rate schedule, its reference log-probs are computed
by the fast scorer with that stage's reference (stage 1 reuses curation's when they match),
and it ends with a checkpoint plus a COMPLETE marker, so a killed run resumes after the last
completed stage (only when that stage's inputs and settings, fingerprinted, are unchanged, and
its checkpoint still has the sha256 digest recorded when it completed; a stage that fails the
check is retrained, with a log line, and so is every stage after it). Each shard is checked
against the manifest's sha256 before use. `refresh` retrains every stage.
With LoRA the adapter is merged before the next stage, or the "adapter off" reference would
silently stay the stage-0 model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import torch

from curation.errors import WinnowError
from curation.manifest import REF_LOGP_COLUMNS as REF_COLUMNS
from curation.manifest import ShardManifest, StageShard, folder_digest
from training.config import TrainConfig, resolve_objective, trackers
from training.trainer import MetricsRecorder, StepProgress, WinnowDPOTrainer

if TYPE_CHECKING:
    from training.online import OnlineContext, OnlinePool

COMPLETE = "COMPLETE"
TRL_TRUNCATION = "keep_start"  # DPOConfig's default, for direct calls that leave truncation_mode unset
REFERENCE_LOGPS_FILE = "reference_logps.parquet"
TRACKER_LOGS = "logs"  # a stage's tracker files (tensorboard events), kept beside its model
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingLengths:
    """The token budget training applies (one owner: the manifest, unless TrainConfig overrides it)."""

    max_length: int | None
    truncation_mode: str = "keep_start"


@dataclass
class StageResult:
    stage: int
    model_dir: Path
    pairs: int
    objective: str
    resumed: bool = False
    reference_source: str = ""  # "curation" (stage 1 reuses the shard's) or "recomputed" (the fast scorer)
    train_loss: float | None = None
    beta: float | None = None  # the objective's (base) beta: evaluation's implicit reward uses it
    seconds: float = 0.0


def load_stage_frame(manifest: ShardManifest, entry: StageShard) -> pl.DataFrame:
    """The stage's shard, after checking its size and sha256 against the manifest."""
    return pl.read_parquet(manifest.verified_path(entry))


def _is_conversational(frame: pl.DataFrame) -> bool:
    """Message lists in the prompt column (TRL's conversational format) rather than text."""
    return frame.schema["prompt"] != pl.String


def _reference_logps(model, tokenizer, frame: pl.DataFrame, config: TrainConfig, progress: bool) -> pl.DataFrame:  # noqa: ANN001
    """The stage's reference log-probs by the fast scorer, on the tokens TRL builds from this shard.

    Conversational shards hold message lists (and maybe a ``tools`` column); they go through the
    tokenizer's chat template exactly as TRL's ``_prepare_dataset`` applies it.
    """
    from curation.lm.logprobs import score_tokenized
    from curation.lm.tokenization import tokenize_preferences

    tools = frame["tools"].to_list() if "tools" in frame.columns else None
    tokens = tokenize_preferences(tokenizer, frame["prompt"].to_list(), frame["chosen"].to_list(),
                                  frame["rejected"].to_list(), tools, config.max_length,
                                  config.truncation_mode or TRL_TRUNCATION)
    return score_tokenized(model, tokens, progress=progress).select(REF_COLUMNS)


def dpo_config(config: TrainConfig, output_dir: Path, beta: float):  # noqa: ANN202 - trl.DPOConfig
    from trl import DPOConfig

    from curation.lm.loading import pick_device

    device, dtype = pick_device()
    import torch

    return DPOConfig(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,
        logging_steps=config.logging_steps,
        max_length=config.max_length,
        truncation_mode=config.truncation_mode or TRL_TRUNCATION,
        precompute_ref_log_probs=True,  # never keep a live reference: log-probs come from the shard
        beta=beta,
        seed=config.seed,
        bf16=device.type == "cuda" and dtype == torch.bfloat16,
        use_cpu=device.type != "cuda",
        # the new name: TRL's default for the deprecated `gradient_checkpointing` (True) warns
        activation_checkpointing=False,
        save_strategy="no",
        report_to=trackers(config.report_to),
        # progress goes through curation.progress (training.trainer.StepProgress), not tqdm;
        # transformers would then print every log dict (PrinterCallback): train_stage removes it
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _quiet_and_tracked(trainer, logs_dir: Path) -> None:  # noqa: ANN001 - a transformers Trainer
    """No printed log dicts; tensorboard events under the stage folder (the trainer's output_dir is removed).

    transformers adds PrinterCallback when tqdm is off; its lines are the raw dicts the live
    display replaces (the numbers still reach train_metrics and every tracker in report_to).
    TensorBoardCallback writes under output_dir unless TENSORBOARD_LOGGING_DIR says otherwise;
    a user's TENSORBOARD_LOGGING_DIR wins.
    """
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(logs_dir)


def train_stage(
    stage: int,
    frame: pl.DataFrame,
    start_model: str | Path,
    stage_dir: Path,
    config: TrainConfig,
    advice: dict[str, Any] | None,
    *,
    reference_source: str,
    metrics_sink: Callable[[int, list[dict[str, Any]]], None] | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    fingerprint: str = "",
) -> StageResult:
    """One DPO stage from `start_model` (also the reference) on `frame`; saves stage_dir/model."""
    import time

    from datasets import Dataset

    from curation.lm.loading import load_model, load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(start_model)
    policy = load_model(start_model)
    if reference_source == "recomputed":
        frame = frame.drop(REF_COLUMNS, strict=False).hstack(
            _reference_logps(policy, tokenizer, frame, config, progress)
        )
    if REF_COLUMNS[0] in frame.columns:
        stage_dir.mkdir(parents=True, exist_ok=True)
        frame.select("pair_id", *REF_COLUMNS).write_parquet(stage_dir / REFERENCE_LOGPS_FILE)
    objective = resolve_objective(config, advice)
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, task_type="CAUSAL_LM")
    recorder = MetricsRecorder(stage, objective.name, None if metrics_sink is None else lambda rows: metrics_sink(stage, rows))
    trainer = WinnowDPOTrainer(
        model=policy,
        args=dpo_config(config, stage_dir / "trainer", objective.beta),
        train_dataset=Dataset.from_polars(frame.drop("pair_id", strict=False)),
        processing_class=tokenizer,
        peft_config=peft_config,
        objective=objective,
        packing=config.packing,
        callbacks=[recorder, StepProgress(f"train stage {stage} ({objective.name})", enabled=progress), *callbacks],
    )
    _quiet_and_tracked(trainer, stage_dir / TRACKER_LOGS)
    from curation.lm.loading import cpu_threads_for, torch_threads

    threads = cpu_threads_for(policy) if not torch.cuda.is_available() else torch.get_num_threads()
    with torch_threads(threads):
        output = trainer.train()
    accelerator = trainer.accelerator
    final, tmp = stage_dir / "model", stage_dir / "model.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    if config.lora:  # merge, so that the next stage's reference is this stage's model
        merged = accelerator.unwrap_model(trainer.model).merge_and_unload()
        if accelerator.is_main_process:
            merged.save_pretrained(tmp)
    else:
        trainer.save_model(str(tmp))  # collective under FSDP/DeepSpeed; writes on the main process
    result = StageResult(stage, final, frame.height, objective.name, reference_source=reference_source, beta=objective.beta,
                         train_loss=output.training_loss, seconds=time.perf_counter() - started)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        shutil.rmtree(stage_dir / "trainer", ignore_errors=True)
        summary = {**result.__dict__, "model_dir": str(final), "objective_config": asdict(objective),
                   "fingerprint": fingerprint, "model_sha256": folder_digest(final)}
        (stage_dir / "stage.json").write_text(json.dumps(summary, indent=1, default=str))
        (stage_dir / COMPLETE).write_text("ok\n")
    accelerator.wait_for_everyone()
    return result


def train_stages(
    shard_dir: Path,
    base_model: str | Path,
    output_dir: Path,
    config: TrainConfig | None = None,
    *,
    metrics_sink: Callable[[int, list[dict[str, Any]]], None] | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    refresh: bool = False,
    online: OnlineContext | None = None,
) -> list[StageResult]:
    """Train every stage of a curated shard folder in order; resumes after completed stages.

    A completed stage is reused only when its fingerprint matches and its checkpoint passes its
    digest; once one stage is trained again, every later one is too (it starts from that model).
    `refresh`: train every stage again, whatever is on disk. ``online``: the run's catalog, which
    online curation (``config.online_curation``) reads and writes.
    """
    config = config or TrainConfig()
    manifest = ShardManifest.load(shard_dir)
    stages = manifest.selected(config.max_stages)
    lengths = training_lengths(config, manifest)
    config = replace(config, max_length=lengths.max_length, truncation_mode=lengths.truncation_mode)
    output_dir = Path(output_dir)
    current: str | Path = base_model
    results: list[StageResult] = []
    fingerprint = ""
    retrain = refresh
    pools: dict[str, OnlinePool] = {}  # online curation's pool, built at its first round
    for entry in stages:
        stage = entry.stage
        stage_dir = output_dir / f"stage-{stage}"
        fingerprint = _stage_fingerprint(fingerprint, config, base_model, manifest, entry)
        resumed = None if retrain else _completed_stage(stage_dir, fingerprint)
        retrain = retrain or resumed is None
        if resumed is not None:
            results.append(resumed)
            current = stage_dir / "model"
            continue
        shutil.rmtree(stage_dir, ignore_errors=True)  # a partial or differently configured stage
        frame = load_stage_frame(manifest, entry)
        reference_source = _reference_plan(frame, stage, current, base_model, manifest, config, lengths)
        frame, reference_source = _online_curation(stage, frame, reference_source, current, base_model, manifest,
                                                   stages, config, lengths, output_dir, online, pools, progress)
        results.append(
            train_stage(stage, frame, current, stage_dir, config, manifest.advice, reference_source=reference_source,
                        metrics_sink=metrics_sink, callbacks=callbacks, progress=progress, fingerprint=fingerprint)
        )
        current = stage_dir / "model"
    return results


def _stage_fingerprint(previous: str, config: TrainConfig, base_model: str | Path, manifest: ShardManifest,
                       entry: StageShard) -> str:
    """What a stage's result depends on, chained, so a change upstream retrains everything after it."""
    settings = {k: v for k, v in config.to_dict().items() if k != "max_stages"}
    payload = json.dumps([previous, settings, str(base_model), manifest.advice, entry.sha256,
                          str(manifest.shard_path(entry)), asdict(manifest.reference)], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _completed_stage(stage_dir: Path, fingerprint: str) -> StageResult | None:
    """The stage's result when it completed with the same inputs and settings, else None."""
    if not (stage_dir / COMPLETE).is_file() or not (stage_dir / "stage.json").is_file():
        return None
    try:
        summary = json.loads((stage_dir / "stage.json").read_text())
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("stage %s: unreadable stage.json (%s); training the stage again", stage_dir.name, exc)
        return None
    if summary.get("fingerprint") != fingerprint:
        return None
    recorded = summary.get("model_sha256")
    model_dir = stage_dir / "model"
    found = folder_digest(model_dir) if model_dir.is_dir() else {}
    if not isinstance(recorded, dict) or not recorded or found != recorded:
        what = "records no checkpoint digest" if not isinstance(recorded, dict) or not recorded else (
            "checkpoint differs from the digest recorded when it completed (changed, truncated or missing files)")
        log.warning("%s: %s; training it again", stage_dir, what)
        return None
    try:
        return StageResult(int(summary["stage"]), model_dir, int(summary["pairs"]), str(summary["objective"]),
                           resumed=True, reference_source=str(summary.get("reference_source", "")),
                           train_loss=summary.get("train_loss"), beta=summary.get("beta"))
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("%s: stage.json lacks %s; training it again", stage_dir, exc)
        return None


def training_lengths(config: TrainConfig, manifest: ShardManifest) -> TrainingLengths:
    """max_length and truncation of training: the manifest's (curation's) unless the config sets its own."""
    ref = manifest.reference
    max_length = ref.max_length if config.max_length is None else config.max_length
    mode = ref.truncation_mode if config.truncation_mode is None else config.truncation_mode
    return TrainingLengths(max_length, mode)


def _reference_plan(frame: pl.DataFrame, stage: int, current: str | Path, base_model: str | Path,
                    manifest: ShardManifest, config: TrainConfig, lengths: TrainingLengths) -> str:
    """Where this stage's reference log-probs come from.

    Curation's are reused only for stage 1, when computed with the same model, max_length and
    truncation; every other stage's are recomputed by the fast scorer with that stage's
    reference. Conversations are no exception: curation scores them on the chat template's
    tokens, as TRL trains on them, and ships the columns only then (curation/shard.py).
    """
    has_ref = set(REF_COLUMNS) <= set(frame.columns) and frame[REF_COLUMNS[0]].null_count() == 0
    ref = manifest.reference
    same_model = ref.model is not None and str(ref.model) == str(base_model)
    same_tokens = (ref.max_length, ref.truncation_mode) == (lengths.max_length, lengths.truncation_mode)
    if (stage == 1 and has_ref and same_model and same_tokens and config.reuse_reference_logps
            and str(current) == str(base_model)):
        return "curation"
    return "recomputed"


# -- online curation between stages (training/online.py) ------------------------------------------


def _online_curation(stage: int, frame: pl.DataFrame, reference_source: str, current: str | Path,
                     base_model: str | Path, manifest: ShardManifest, stages: list[StageShard], config: TrainConfig,
                     lengths: TrainingLengths, output_dir: Path, online: OnlineContext | None,
                     pools: dict[str, OnlinePool], progress: bool) -> tuple[pl.DataFrame, str]:
    """Round k = stage - 1 of online curation, before stage k+1 trains (a no-op unless config.online_curation).

    The pairs not yet taught are re-decided with the stage-k policy (``current``); the stage's frame
    becomes the round's choice and carries that policy's log-probs, which are this stage's reference
    log-probs, so none are recomputed (reference source ``online``). Needs the run's catalog.
    """
    if config.online_curation is False or stage == 1:
        return frame, reference_source
    from curation.lm.loading import load_model, load_tokenizer
    from training.online import build_pool, online_round, write_round

    blocker = _online_blocker(frame, online)
    if blocker is not None:
        if config.online_curation is True:  # asked for explicitly: say why it cannot run
            raise WinnowError(f"online curation cannot run: {blocker}; set train.online_curation=false (or auto)")
        warnings.warn(f"online curation skipped: {blocker}", stacklevel=2)  # auto: train as curated
        return frame, reference_source

    def score(model_path: str | Path, pairs: pl.DataFrame) -> pl.DataFrame:
        return _reference_logps(load_model(model_path), load_tokenizer(model_path), pairs, config, progress)

    if "pool" not in pools:
        ref = manifest.reference
        reuse = (manifest.ref_logps_included and config.reuse_reference_logps and ref.model is not None
                 and str(ref.model) == str(base_model)
                 and (ref.max_length, ref.truncation_mode) == (lengths.max_length, lengths.truncation_mode))
        pools["pool"] = build_pool(online, manifest, [e for e in stages if e.stage > 1],
                                   lambda e: load_stage_frame(manifest, e), base_model, score, reuse)
    taught = {pid for done in range(1, stage)
              for pid in pl.read_parquet(output_dir / f"stage-{done}" / REFERENCE_LOGPS_FILE)["pair_id"].to_list()}
    beta = resolve_objective(config, manifest.advice).beta
    rows, frames = online_round(online, stage - 1, current, pools["pool"], taught, beta, score)
    write_round(online, stage - 1, rows)
    return frames[stage], "online"


def _online_blocker(frame: pl.DataFrame, online: OnlineContext | None) -> str | None:
    """Why online curation cannot run here (None: it can)."""
    if online is None:
        return ("it needs the run's catalog (train through `winnow run`, or pass online=OnlineContext(catalog, run_id) "
                "to train_stages)")
    from curation.reads import has_rows

    if not has_rows(online.catalog, "decisions", online.run_id):
        return f"the catalog at {online.catalog.path} holds no curation decisions of run {online.run_id}"
    if _is_conversational(frame):
        return "it scores plain-text pairs and this run is conversational"
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return "it runs in single-process training only"
    return None
