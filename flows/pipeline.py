"""The flows: `curate`, `train` and `curate-and-train`. Orchestration only.

Each flow takes a recipe path and dotted overrides (JSON-friendly, so deployments and the
UI can pass them) and builds one `PipelineConfig`. Scoring fans out into shard tasks on the
chosen task runner; everything else runs in order, each step cached by its inputs.

A flow holds its run folder's lock (curation.locks) from start to end, so a second run of the
same run id waits or fails in one line instead of deleting the first one's files; a full
disk or a read-only workdir fails in one line too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.states import State

from curation.env import environment
from curation.errors import WinnowError
from curation.locks import run_lock
from curation.manifest import ShardIntegrityError, ShardManifest, find_shard_folder
from curation.paths import check_run_id, faults_in_one_line, run_dir
from curation.progress import report_step
from flows import tasks
from flows.caching import data_only_cache
from flows.config import PipelineConfig
from flows.prefect_env import configure_prefect
from training.tiny_config import DEFAULT_MODEL

FAIL_AFTER_ENV = "WINNOW_FAIL_AFTER"  # testing aid: raise after the named step, to exercise resume


class InjectedFailure(RuntimeError):
    pass


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs a failed run with its traceback; a WinnowError is the user's, one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], WinnowError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_errors() -> None:
    """Keep WinnowError tracebacks out of Prefect's run logs; called when a flow runs, idempotent."""
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForUserErrors) for f in logger.filters):
            logger.addFilter(_NoTracebackForUserErrors())


def make_task_runner(name: str, workers: int = 2):  # noqa: ANN201 - a Prefect TaskRunner
    if name == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if name == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    if name == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise WinnowError("the dask task runner needs the extra: pip install 'winnow[dask]'") from None
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    if name == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise WinnowError("the ray task runner needs the extra: pip install 'winnow[ray]'") from None
        # A Ray instance already started in this process (or RAY_ADDRESS) is used as it is; else a
        # local one with every CPU and GPU of the machine. Shards request their own resources
        # (scoring_resources), so `workers` does not cap a cluster.
        return RayTaskRunner(init_kwargs={"include_dashboard": False})
    raise WinnowError(f"unknown task runner {name!r}: threads, processes, dask or ray")


def scoring_resources() -> AbstractContextManager[Any]:
    """Per-task resource requests for the scoring shards, on a Ray task runner (else nothing).

    Each shard asks for one CPU, and one GPU when the cluster has GPUs: Ray then runs as many
    shards at once as there are GPUs, each seeing only its own (CUDA_VISIBLE_DEVICES), and
    queues the rest. Other runners place tasks by worker count.
    """
    from prefect.context import FlowRunContext

    runner = getattr(FlowRunContext.get(), "task_runner", None)
    if type(runner).__name__ != "RayTaskRunner":
        return nullcontext()
    import ray
    from prefect_ray.context import remote_options

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    return remote_options(num_cpus=1, num_gpus=1 if gpus >= 1 else 0)


class _Steps:
    """Runs tasks with the workspace's result storage and records which came from cache."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.cached: list[str] = []
        self.fail_after = environment().fail_after

    def _prepare(self, task_fn, refresh: bool = False):  # noqa: ANN001, ANN202
        """The task with this workspace's data-only result cache (flows.caching), refreshed on request."""
        return task_fn.with_options(**data_only_cache(task_fn, self.config.workdir),
                                    refresh_cache=(self.config.refresh or refresh) or None)

    def _record(self, name: str, state: State) -> Any:
        if state.name == "Cached":
            self.cached.append(name)
        result = state.result()
        if self.fail_after == name:
            raise InjectedFailure(f"injected failure after {name} ({FAIL_AFTER_ENV})")
        return result

    def run(self, name: str, task_fn, refresh: bool = False, **kwargs: Any) -> Any:  # noqa: ANN001
        started = time.perf_counter()
        report_step(name, "started")
        try:
            state = self._prepare(task_fn, refresh)(**kwargs, return_state=True)
            result = state.result()
        except BaseException:
            report_step(name, "failed", time.perf_counter() - started)
            raise
        report_step(name, "cached" if state.name == "Cached" else "finished", time.perf_counter() - started,
                    result=result)
        return self._record(name, state)

    def fan_out(self, name: str, task_fn, calls: list[dict[str, Any]]) -> list[Any]:  # noqa: ANN001
        started = time.perf_counter()
        report_step(name, "started", tasks=len(calls))
        prepared = self._prepare(task_fn)
        futures = [prepared.submit(**kwargs) for kwargs in calls]
        wait(futures)
        states = [f.state for f in futures]
        results = []
        try:
            for state in states:
                if state.name == "Cached":
                    self.cached.append(name)
                results.append(state.result())
        except BaseException:
            report_step(name, "failed", time.perf_counter() - started)
            raise
        all_cached = all(state.name == "Cached" for state in states)
        report_step(name, "cached" if all_cached else "finished", time.perf_counter() - started, result=results)
        if self.fail_after == name:
            raise InjectedFailure(f"injected failure after {name} ({FAIL_AFTER_ENV})")
        return results


@contextmanager
def _locked_run(config: PipelineConfig, run_id: str | None = None) -> Iterator[_Steps]:
    """The run's steps, with its run folder locked and file-system faults in one line.

    The run id is fixed before anything runs (curation.paths checks it), so the lock covers
    ingest too.
    """
    with faults_in_one_line():
        run_id = check_run_id(run_id) if run_id is not None else tasks.planned_run_id(config)
        with run_lock(run_dir(config.workdir, run_id)):
            yield _Steps(config.model_copy(update={"run_id": run_id}))


def _curate(steps: _Steps, refresh: bool = False) -> dict[str, Any]:
    config = steps.config
    ingested = steps.run("ingest", tasks.ingest_task, config=config)
    run_id = config.run_id
    if ingested["run_id"] != run_id:
        raise WinnowError(f"the cached ingest result names run {ingested['run_id']!r}, not {run_id!r}: "
                          "rerun with --refresh")
    model_path = steps.run("build-model", tasks.model_task, config=config, run_id=run_id)
    exported = steps.run("export-pairs", tasks.export_task, config=config, run_id=run_id)
    n = max(1, config.score_shards)
    with scoring_resources():
        shard_parts = steps.fan_out("score-shard", tasks.score_shard_task,
                                    [{"config": config, **exported, "model_path": model_path, "shard": (i, n)}
                                     for i in range(n)])
    parts = sorted(p for part in shard_parts for p in part)
    scored = steps.run("score", tasks.load_scores_task, config=config, run_id=run_id, parts=parts,
                       margin_source=exported["margin_source"], model_path=model_path)
    curated = steps.run("curate", tasks.curate_task, refresh=refresh, config=config, run_id=run_id, parts=parts)
    return {"run_id": run_id, "ingest": ingested, "model_path": model_path, "scored_pairs": scored, **curated}


def _train(steps: _Steps, run_id: str, shard_dir: str, model_path: str) -> dict[str, Any]:
    config = steps.config
    trained = steps.run("train-stages", tasks.train_task, config=config, run_id=run_id, shard_dir=shard_dir,
                        model_path=model_path)
    metrics: dict[str, float] = {}
    if config.eval.enabled:
        metrics = steps.run("evaluate", tasks.evaluate_task, config=config, run_id=run_id,
                            policy_path=trained["final_model"], reference_path=model_path, beta=trained["beta"],
                            max_length=trained["max_length"])
    return {**trained, "eval": metrics}


def _finish(steps: _Steps, summary: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    report_step("publish-artifacts", "started")
    published = steps._prepare(tasks.publish_task)(config=steps.config, run_id=summary["run_id"], summary=summary)
    summary.update({k: v for k, v in published.items() if v and k != "artifact"})
    report_step("publish-artifacts", "finished", time.perf_counter() - started, result=published)
    summary["cached_tasks"] = steps.cached
    return summary


@flow(name="curate")
def curate_flow(recipe: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ingest, score, filter, stage and shard; publishes the decision table and report."""
    quiet_user_errors()
    with _locked_run(PipelineConfig.load(recipe, overrides)) as steps:
        summary = _curate(steps)
        get_run_logger().info("curated run %s: kept %s of %s pairs", summary["run_id"], summary["kept"],
                              summary["pairs"])
        return _finish(steps, summary)


@flow(name="train")
def train_flow(shards: str, recipe: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train every stage of a curated shard folder (a run folder or its shards/ folder)."""
    quiet_user_errors()
    config = PipelineConfig.load(recipe, overrides)
    shard_dir = find_shard_folder(shards)
    manifest = ShardManifest.load(shard_dir)
    with _locked_run(config, manifest.run_id) as steps:
        run_id = steps.config.run_id
        model_path = config.model if config.model != DEFAULT_MODEL else (manifest.reference.model or config.model)
        summary = {"run_id": run_id, "shard_dir": str(shard_dir), "model_path": model_path}
        summary.update(_train(steps, run_id, str(shard_dir), model_path))
        return _finish(steps, summary)


@flow(name="curate-and-train")
def curate_and_train_flow(recipe: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole pipeline on the configured sources (the bundled demo by default)."""
    quiet_user_errors()
    logger = get_run_logger()
    with _locked_run(PipelineConfig.load(recipe, overrides)) as steps:
        summary = _curate(steps)
        try:
            summary.update(_train(steps, summary["run_id"], summary["shard_dir"], summary["model_path"]))
        except ShardIntegrityError as exc:  # a shard changed on disk after curation: write the shards again
            logger.warning("%s; curating again", exc)
            summary = _curate(steps, refresh=True)
            summary.update(_train(steps, summary["run_id"], summary["shard_dir"], summary["model_path"]))
        logger.info("run %s: kept %s/%s pairs, %s stages, eval %s", summary["run_id"], summary["kept"],
                    summary["pairs"], len(summary["stages"]), summary.get("eval"))
        return _finish(steps, summary)


FLOWS = {"curate": curate_flow, "train": train_flow, "curate-and-train": curate_and_train_flow}


def run_flow(name: str, recipe: str | None, overrides: dict[str, Any], task_runner: str | None = None,
             **params: Any) -> dict[str, Any]:
    """Run a flow directly (no server needed: a temporary local API runs as this process's child,
    and dies with it, however this process ends: flows.ephemeral_server)."""
    from flows.ephemeral_server import start_owned_server

    configure_prefect()  # before Prefect starts that API
    if name not in FLOWS:
        raise WinnowError(f"unknown flow {name!r}; flows: {', '.join(FLOWS)}")
    config = PipelineConfig.load(recipe, overrides)  # bad settings or paths fail here, in one line
    from training.config import trackers

    trackers(config.train.report_to)  # a tracker that is not installed: one line now, not after curation
    if name != "train":
        from curation.ingest import resolve_sources

        resolve_sources(config.sources)
    runner = make_task_runner(task_runner or config.task_runner, workers=max(2, min(config.score_shards, 8)))
    quiet_user_errors()
    start_owned_server()
    return FLOWS[name].with_options(task_runner=runner)(recipe=recipe, overrides=overrides, **params)
