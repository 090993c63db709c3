"""The Ray task runner on a local Ray cluster: scoring shards spread over Ray workers score like
threads, and each shard requests one CPU and, where the cluster has GPUs, one GPU of its own.

The cluster is started here with two (declared) GPUs, so the GPU requests are real Ray
scheduling decisions on a machine without any: Ray hands each shard its own GPU id and sets
CUDA_VISIBLE_DEVICES for it (torch, CPU-only here, then scores on the CPU). Skipped without the
ray extra (pip install 'winnow[ray]'). Slow: starting Ray and two flow runs take ~1 min.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("prefect_ray", reason="install the ray extra: pip install 'winnow[ray]'")
ray = pytest.importorskip("ray")

from tests.test_flows import prefect_api, small_overrides, small_source  # noqa: E402, F401 - fixtures

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance for the module: 2 CPUs and 2 declared GPUs; the runner reuses it."""
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, namespace="prefect",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH", "")])}})
    yield
    ray.shutdown()


def test_each_scoring_shard_gets_its_own_gpu(ray_cluster):
    """Under scoring_resources, shard-like tasks on the Ray runner are placed with 1 CPU and 1 GPU each."""
    from prefect import flow, task

    from flows.pipeline import make_task_runner, scoring_resources

    @task
    def where(i: int) -> tuple[list, str | None]:
        import os

        import ray as ray_worker

        return ray_worker.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

    @flow(task_runner=make_task_runner("ray"))
    def probe() -> list:
        with scoring_resources():
            futures = [where.submit(i) for i in range(2)]
        plain = where.submit(9)  # outside the context: no GPU request
        return [f.result() for f in futures] + [plain.result()]

    first, second, plain = probe()
    assert len(first[0]) == 1 and len(second[0]) == 1 and first[0] != second[0]  # one GPU each, not shared
    assert first[1] == str(first[0][0]) and second[1] == str(second[0][0])  # and CUDA sees only that one
    assert plain[0] == []


def test_ray_workers_score_like_threads(ray_cluster, small_source: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    """The curate flow on the Ray runner: the same catalog scores as threads, and both scoring shards
    went to Ray asking for one CPU and one GPU each (the spy sees the options the runner passes)."""
    import prefect_ray.task_runners as ray_runners

    from curation.store import Catalog
    from flows.pipeline import run_flow

    requested: list[dict] = []
    remote = ray_runners.ray.remote

    def spy(*args, **options):  # noqa: ANN002, ANN003, ANN202
        requested.append(options)
        return remote(*args, **options)

    monkeypatch.setattr(ray_runners.ray, "remote", spy)

    scores = {}
    for runner in ("threads", "ray"):
        workdir = tmp_path / runner
        overrides = {**small_overrides(small_source, workdir), "score_shards": 2}
        summary = run_flow("curate", None, overrides, task_runner=runner)
        scores[runner] = Catalog(workdir).query(
            "SELECT * EXCLUDE (run_id, tokenizer) FROM scores WHERE run_id = ? ORDER BY pair_id", [summary["run_id"]]
        )
    threads, on_ray = scores["threads"], scores["ray"]
    assert threads.height == on_ray.height > 200
    logps = [c for c in threads.columns if c.startswith("ref_")]
    assert threads.drop(logps).equals(on_ray.drop(logps))
    for column in logps:  # another process, another thread count: float32 sums may differ in the last bits
        assert (threads[column] - on_ray[column]).abs().max() < 1e-5, column
    assert requested == [{"num_cpus": 1, "num_gpus": 1}] * 2
    assert ray.available_resources().get("GPU", 0) == 2  # and gave them back
