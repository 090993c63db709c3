"""The evaluation-task registry: a task is named by configuration (``eval.task``), never guessed.

Why a registry: which prompts a run is evaluated on, whether they are truly held out, and
whether a gold reward exists depend on the task the data comes from, and nothing in the data
can say so reliably (a user's prompts may well start like the demo's). So a task is an object
registered under its name; the pipeline asks for it by that name and an unknown name fails in
one line listing the choices. A new task is one module that calls :func:`register_task`,
imported by ``training/eval_tasks/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import polars as pl

from curation.errors import WinnowError

if TYPE_CHECKING:
    from curation.store import Catalog
    from training.evaluate.metrics import GoldReward


@dataclass(frozen=True)
class EvalData:
    """What one evaluation samples and scores."""

    prompts: list  # prompts to sample policy and reference on: strings, or conversations (message lists)
    pairs: pl.DataFrame  # pairs (prompt, chosen, rejected; message lists for conversations, maybe tools) to score
    heldout: bool  # True only when neither was ever trained on
    prompt_tools: list | None = None  # per prompt, the tools its chat template gets (conversations)


class EvalTask(Protocol):
    """An evaluation task: where its data comes from and how a response is judged."""

    name: str
    description: str

    @property
    def gold_reward(self) -> GoldReward | None:
        """The exact reward of a response, or None when the task has none (never faked)."""

    def data(self, catalog: Catalog, run_id: str, *, prompts: int, pairs: int, seed: int) -> EvalData:
        """Prompts and pairs for run ``run_id`` (``prompts``/``pairs`` at most), seeded."""


_TASKS: dict[str, EvalTask] = {}


def register_task(task: EvalTask) -> EvalTask:
    """Register ``task`` under its name (a second task of the same name is a programming error)."""
    if task.name in _TASKS:
        raise ValueError(f"evaluation task {task.name!r} is registered twice")
    _TASKS[task.name] = task
    return task


def task_names() -> tuple[str, ...]:
    return tuple(sorted(_TASKS))


def get_task(name: str) -> EvalTask:
    """The task registered as ``name``; an unknown name is a WinnowError listing the choices."""
    try:
        return _TASKS[name]
    except KeyError:
        raise WinnowError(f"unknown evaluation task {name!r}; tasks: {', '.join(task_names())}") from None
