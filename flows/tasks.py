"""Prefect tasks: each one is a thin call into curation/ or training/.

Every task that does real work is cached by the content of its inputs (flows.caching) and
persists its small result under the workspace as data-only JSON (never a pickle: a workspace
may be shared), so a run that died resumes where it stopped and `--refresh` recomputes.
Retries happen only on transient errors.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from curation.errors import WinnowError
from curation.paths import check_run_id, contained, fault_message, run_dir
from flows.caching import DataOnlySerializer, content_key, keyed_by, retry_on_transient
from flows.config import PipelineConfig


def _user_errors_in_one_line(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Re-raise a WinnowError bare: no traceback into the libraries, no frames kept alive.

    Prefect keeps a failed task's exception in its state; the original traceback would pin
    the library frames (and the DuckDB handles they held) until the process exits. A full
    disk, a read-only or a forbidden folder is the user's to fix too: it becomes one line.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except WinnowError as exc:
            kind, message = type(exc), str(exc)
        except Exception as exc:
            message = fault_message(exc)
            if message is None:
                raise
            kind = WinnowError
        raise kind(message)

    return wrapper


# Results are data-only JSON (flows.caching); the storage folder is set per run (pipeline._Steps).
_COMMON: dict[str, Any] = {"persist_result": True, "result_serializer": DataOnlySerializer(), "retries": 2,
                           "retry_delay_seconds": 2, "retry_condition_fn": retry_on_transient}


def _catalog(config: PipelineConfig):  # noqa: ANN202
    from curation.store import Catalog

    return Catalog(config.workdir)


def _workdir(config: PipelineConfig) -> str:
    return str(Path(config.workdir).resolve())


def planned_run_id(config: PipelineConfig) -> str:
    """The run's id before anything runs: the configured one, or one derived from the inputs and
    settings (as `winnow ingest` derives it), so the run folder can be locked before ingest."""
    if config.run_id is not None:
        return check_run_id(config.run_id)
    from curation.ingest import make_run_id, resolve_sources

    return check_run_id(make_run_id(resolve_sources(config.sources), {"ingest": config.ingest.to_dict()}))


# -- ingest ---------------------------------------------------------------------------------


def _ingest_key(context, parameters: dict[str, Any]) -> str:  # noqa: ANN001
    from curation.ingest import resolve_sources

    config: PipelineConfig = parameters["config"]
    sources = resolve_sources(config.sources)
    files = [s.location for s in sources if s.kind != "hub"]
    return content_key("ingest", [_workdir(config), config.run_id, config.ingest.to_dict(),
                                  [s.label for s in sources]], files)


@task(name="ingest", cache_policy=keyed_by(_ingest_key), **_COMMON)
@_user_errors_in_one_line
def ingest_task(config: PipelineConfig) -> dict[str, Any]:
    from curation.ingest import ingest

    result = ingest(config.sources, _catalog(config), config.ingest, run_id=config.run_id)
    return {"run_id": result.run_id, "accounting": result.accounting.to_dicts(), "reasons": result.reasons.to_dicts(),
            "pairs": result.pairs, "quarantined": result.quarantined, "rows_read": result.rows_read}


# -- model ----------------------------------------------------------------------------------


def _model_key(context, parameters: dict[str, Any]) -> str:  # noqa: ANN001
    config: PipelineConfig = parameters["config"]
    return content_key("model", [_workdir(config), parameters["run_id"], config.model, asdict(config.tiny)])


@task(name="build-model", cache_policy=keyed_by(_model_key), **_COMMON)
@_user_errors_in_one_line
def model_task(config: PipelineConfig, run_id: str) -> str:
    """The reference/start model: winnow-tiny is built (and cached) from this run's pairs."""
    from training.models import build_default_model
    from training.tiny_config import DEFAULT_MODEL

    if config.model != DEFAULT_MODEL:
        return config.model
    from curation.reads import run_pair_texts

    pairs = run_pair_texts(_catalog(config), run_id)
    return str(build_default_model(pairs["prompt"].to_list(), pairs["chosen"].to_list(), Path(config.workdir),
                                   config.tiny))


# -- score ----------------------------------------------------------------------------------


def _export_key(context, parameters: dict[str, Any]) -> str:  # noqa: ANN001
    config: PipelineConfig = parameters["config"]
    return content_key("export-pairs", [_workdir(config), parameters["run_id"], config.score.margin])


@task(name="export-pairs", cache_policy=keyed_by(_export_key), **_COMMON)
@_user_errors_in_one_line
def export_task(config: PipelineConfig, run_id: str) -> dict[str, str]:
    """One parquet file the scoring shards stream from, and the margin source they all use."""
    from curation.score.scoring import export_pairs, resolve_margin_source

    catalog = _catalog(config)
    margin_source = resolve_margin_source(config.score.margin, catalog, run_id, None)
    return {"pairs_path": str(export_pairs(catalog, run_id)), "margin_source": margin_source}


def _score_key(context, parameters: dict[str, Any]) -> str:  # noqa: ANN001
    config: PipelineConfig = parameters["config"]
    settings = [_workdir(config), config.score.to_dict(), parameters["shard"], parameters["margin_source"]]
    return content_key("score-shard", settings, [parameters["model_path"], parameters["pairs_path"]])


# transformers builds models on the meta device first; two threads loading at once can
# trip over each other ("Cannot copy out of meta tensor"), so thread-runner shards take turns.
_LOAD_LOCK = threading.Lock()


def scoring_models(model_path: str, reference: bool = True):  # noqa: ANN201
    from curation.lm.loading import load_model, load_tokenizer
    from curation.score.scoring import ScoringModels

    with _LOAD_LOCK:
        tokenizer = load_tokenizer(model_path)
        model = load_model(model_path) if reference else None
    return ScoringModels(tokenizer, model_path, reference=model, reference_name=model_path if reference else None)


@task(name="score-shard", cache_policy=keyed_by(_score_key), **_COMMON)
@_user_errors_in_one_line
def score_shard_task(config: PipelineConfig, pairs_path: str, margin_source: str, model_path: str,
                     shard: tuple[int, int]) -> list[str]:
    from curation.score.scoring import score_shard

    # the path comes from a cached result in the workspace: it may name a file there, nothing outside
    out_dir = contained(config.workdir, pairs_path).parent / "scores"
    parts = score_shard(Path(pairs_path), out_dir, scoring_models(model_path), config.score, margin_source,
                        shard=shard)
    return [str(p) for p in parts]


def _load_key(context, parameters: dict[str, Any]) -> str:  # noqa: ANN001
    config: PipelineConfig = parameters["config"]
    settings = [_workdir(config), parameters["run_id"], parameters["margin_source"], parameters["model_path"]]
    return content_key("load-scores", settings, parameters["parts"])


@task(name="load-scores", cache_policy=keyed_by(_load_key), **_COMMON)
@_user_errors_in_one_line
def load_scores_task(config: PipelineConfig, run_id: str, parts: list[str], margin_source: str,
                     model_path: str) -> int:
    from curation.score.scoring import load_scores, score_record

    record = score_record(config.score, margin_source, tokenizer=model_path, reference_model=model_path)
    return load_scores(_catalog(config), run_id, [Path(p) for p in parts], record)


# -- curate ---------------------------------------------------------------------------------


def _curate_key(context, parameters: dict[str, Any]) -> str:  # noqa: ANN001
    config: PipelineConfig = parameters["config"]
    return content_key("curate", [_workdir(config), parameters["run_id"], config.curate.to_dict()],
                       parameters["parts"])


@task(name="curate", cache_policy=keyed_by(_curate_key), **_COMMON)
@_user_errors_in_one_line
def curate_task(config: PipelineConfig, run_id: str, parts: list[str]) -> dict[str, Any]:
    from curation.decide import curate

    result = curate(_catalog(config), run_id, config.curate)
    return {"run_id": run_id, "pairs": result.pairs, "kept": result.kept, "dropped": result.dropped,
            "stage_sizes": result.stage_sizes, "advice": result.advice.to_dict(),
            "shard_dir": str(result.shard_dir), "manifest": str(result.manifest_path),
            "report": str(result.report_path) if result.report_path else None}


# -- train ----------------------------------------------------------------------------------


def train_output_dir(config: PipelineConfig, run_id: str, shard_dir: str, model_path: str) -> Path:
    """One folder per (shards, start model, training settings): stage markers never mix runs."""
    key = content_key("train", [config.train.to_dict(), model_path], [shard_dir])
    return run_dir(config.workdir, run_id) / "train" / key.split("-", 1)[1][:12]


def _train_key(context, parameters: dict[str, Any]) -> str:  # noqa: ANN001
    """Inputs, settings, and the checkpoints already on disk: a changed or damaged checkpoint is
    a cache miss, and train_stages then checks each stage's digest and retrains what fails."""
    config: PipelineConfig = parameters["config"]
    out = train_output_dir(config, parameters["run_id"], parameters["shard_dir"], parameters["model_path"])
    return content_key("train-stages", [_workdir(config), config.train.to_dict()],
                       [parameters["shard_dir"], parameters["model_path"], out])


@task(name="train-stages", cache_policy=keyed_by(_train_key), **_COMMON)
@_user_errors_in_one_line
def train_task(config: PipelineConfig, run_id: str, shard_dir: str, model_path: str) -> dict[str, Any]:
    from curation.manifest import ShardManifest
    from flows.artifacts import TrainingProgress
    from training.online import OnlineContext
    from training.stages import train_stages, training_lengths

    catalog = _catalog(config)
    manifest = ShardManifest.load(Path(shard_dir))
    total = len(manifest.selected(config.train.max_stages))
    results = train_stages(Path(shard_dir), model_path, train_output_dir(config, run_id, shard_dir, model_path),
                           config.train, metrics_sink=_metrics_sink(catalog, run_id),
                           callbacks=[TrainingProgress(run_id, total)], refresh=config.refresh,
                           online=OnlineContext(catalog, run_id))  # online curation reads and writes the catalog
    catalog.upsert_run(run_id, stage="train", status="trained", config={"train": config.train.to_dict()})
    return {"stages": [{"stage": r.stage, "model_dir": str(r.model_dir), "pairs": r.pairs, "objective": r.objective,
                        "resumed": r.resumed, "reference_source": r.reference_source, "train_loss": r.train_loss,
                        "seconds": round(r.seconds, 1)} for r in results],
            "final_model": str(results[-1].model_dir), "beta": results[-1].beta,
            "max_length": training_lengths(config.train, manifest).max_length}


def _metrics_sink(catalog, run_id: str):  # noqa: ANN001, ANN202
    import polars as pl

    def sink(stage: int, rows: list[dict[str, Any]]) -> None:
        frame = pl.DataFrame(rows, infer_schema_length=None)
        with catalog.transaction() as con:
            catalog.replace_slice(con, "train_metrics", frame, run_id=run_id, stage=stage)

    return sink


# -- evaluate -------------------------------------------------------------------------------


def _eval_key(context, parameters: dict[str, Any]) -> str:  # noqa: ANN001
    config: PipelineConfig = parameters["config"]
    settings = [_workdir(config), parameters["run_id"], config.eval.model_dump(), parameters["beta"],
                parameters["max_length"]]
    judge = config.eval.reward_model
    return content_key("evaluate", settings,
                       [parameters["policy_path"], parameters["reference_path"], *([judge] if judge else [])])


@task(name="evaluate", cache_policy=keyed_by(_eval_key), **_COMMON)
@_user_errors_in_one_line
def evaluate_task(config: PipelineConfig, run_id: str, policy_path: str, reference_path: str, beta: float,
                  max_length: int | None) -> dict[str, float]:
    """`beta` and `max_length` are training's (the final stage's objective, the manifest's budget)."""
    from training.run_evaluation import evaluate_run

    e = config.eval
    return evaluate_run(_catalog(config), run_id, policy_path, reference_path, prompts=e.prompts,
                        pairs=e.heldout_pairs, max_new_tokens=e.max_new_tokens, max_length=max_length,
                        beta=beta, seed=e.seed, task=e.task, reward_model=e.reward_model)


# -- report and artifacts (cheap, never cached) ---------------------------------------------


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_task(config: PipelineConfig, run_id: str, summary: dict[str, Any]) -> dict[str, str | None]:
    from flows.artifacts import publish_run_artifacts

    return publish_run_artifacts(_catalog(config), run_id, summary)
