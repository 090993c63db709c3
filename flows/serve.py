"""`winnow serve`: serve the deployments declared in prefect.yaml, schedules included.

`flow.serve`/`prefect.serve` runs flow runs in this process as the server schedules or
triggers them, so no work pool or worker is needed. prefect.yaml stays the one place where
the deployments (names, parameters, cron) are declared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from curation.errors import WinnowError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"


def declared_deployments(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    if not path.is_file():
        raise WinnowError(f"{path} not found")
    spec = yaml.safe_load(path.read_text()) or {}
    deployments = spec.get("deployments") or []
    if not deployments:
        raise WinnowError(f"{path} declares no deployments")
    return deployments


def build_deployments(recipe: str | None = None, cron: str | None = None) -> list[Any]:
    """RunnerDeployments of curate-and-train, one per prefect.yaml entry."""
    from flows.pipeline import curate_and_train_flow

    out = []
    for entry in declared_deployments():
        parameters = dict(entry.get("parameters") or {})
        if recipe is not None:
            parameters["recipe"] = recipe
        if parameters.get("recipe") and not Path(parameters["recipe"]).is_absolute():
            parameters["recipe"] = str(PROJECT_ROOT / parameters["recipe"])
        schedules = entry.get("schedules") or []
        crons = [s["cron"] for s in schedules if "cron" in s]
        if cron is not None and crons:
            crons = [cron]
        out.append(
            curate_and_train_flow.to_deployment(
                name=entry["name"],
                description=entry.get("description"),
                parameters=parameters,
                cron=crons[0] if crons else None,
                tags=["winnow"],
            )
        )
    return out


def serve_deployments(recipe: str | None = None, cron: str | None = None) -> None:
    """Serve until stopped. Without PREFECT_API_URL Prefect would start a temporary API server:
    it is started here as a child that dies with this process (flows.ephemeral_server)."""
    from flows.ephemeral_server import start_owned_server
    from flows.prefect_env import configure_prefect

    configure_prefect()
    start_owned_server()
    from prefect import serve

    serve(*build_deployments(recipe, cron))
