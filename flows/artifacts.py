"""Prefect artifacts: counts by decision reason and stage, the report, training progress.

The report artifact is markdown with its plots embedded as data URIs: a markdown artifact
cannot load the PNG files beside report.md, while Prefect's UI renders data-URI images
(checked in the real UI: tests/test_report_html_prefect_ui.py).

Artifact keys follow Prefect's rule (lowercase letters, digits and dashes), derived from
the run id so each run's artifacts form one history in the UI.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


def artifact_key(*parts: str) -> str:
    key = "-".join(parts).lower()
    key = re.sub(r"[^a-z0-9-]+", "-", key)
    return re.sub(r"-{2,}", "-", key).strip("-")


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class TrainingProgress(TrainerCallback):
    """A progress artifact that moves across all sDPO stages (stage k of K, step s of S)."""

    def __init__(self, run_id: str, total_stages: int, every: int = 5) -> None:
        self.run_id, self.total, self.every = run_id, max(total_stages, 1), every
        self.artifact_id = None
        self.stage_index = 0

    def _publish(self, fraction: float, description: str) -> None:
        if not _in_prefect_run():
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        percent = round(100 * min(max(fraction, 0.0), 1.0), 1)
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                progress=percent, key=artifact_key(self.run_id, "training-progress"), description=description
            )
        else:
            update_progress_artifact(self.artifact_id, progress=percent, description=description)

    def on_train_begin(self, args, state, control, **kwargs) -> None:  # noqa: ANN001
        self.stage_index += 1
        self._publish((self.stage_index - 1) / self.total, f"stage {self.stage_index}/{self.total} started")

    def on_step_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001
        if state.max_steps and (state.global_step % self.every == 0 or state.global_step == state.max_steps):
            within = state.global_step / state.max_steps
            self._publish((self.stage_index - 1 + within) / self.total,
                          f"stage {self.stage_index}/{self.total}: step {state.global_step}/{state.max_steps}")


def publish_run_artifacts(catalog, run_id: str, summary: dict[str, Any]) -> dict[str, str | None]:  # noqa: ANN001
    """Table of decisions by reason and stage, the report (markdown, plots inlined), and the eval metrics.

    After training the report is rebuilt first, so that its training curves and evaluation
    results (train_metrics, evals) are in report.md, report.html and the artifact.
    Returns the report's paths and the report artifact's key.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from curation.reads import decision_counts, eval_table, has_rows
    from curation.report import build_report, embedded_markdown, html_path

    curated = has_rows(catalog, "decisions", run_id)
    report = summary.get("report")
    if curated and (summary.get("stages") or not report):
        report = str(build_report(catalog, run_id))
    if curated:
        create_table_artifact(key=artifact_key(run_id, "decisions"), table=decision_counts(catalog, run_id).to_dicts(),
                              description=f"Pairs by decision reason and sDPO stage, run {run_id}")
    evals = eval_table(catalog, run_id)
    if evals.height:
        create_table_artifact(key=artifact_key(run_id, "evals"), table=evals.to_dicts(),
                              description="Held-out evaluation: policy vs reference")
    html = None
    if report and Path(report).is_file():
        # plots inlined as data URIs: the UI renders them (it cannot read files beside report.md)
        create_markdown_artifact(key=artifact_key(run_id, "report"), markdown=embedded_markdown(Path(report)),
                                 description=f"Curation report, run {run_id}")
        html = str(html_path(Path(report))) if html_path(Path(report)).is_file() else None
    return {"report": report, "report_html": html, "artifact": artifact_key(run_id, "report")}
