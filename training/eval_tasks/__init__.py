"""Evaluation tasks, named by configuration (``eval.task``), never detected from the data.

* ``sorting`` (:mod:`training.eval_tasks.sorting`): the demo's and the gym's task; gold reward,
  fresh held-out prompts and clean pairs disjoint from the run's prompts;
* ``pairs`` (:mod:`training.eval_tasks.pairs`): user data; a seeded sample of the run's own
  pairs, marked ``heldout: false``.

A new task: one module calling :func:`register_task`, imported here.
"""

from training.eval_tasks import pairs, sorting  # noqa: F401 - importing registers the tasks
from training.eval_tasks.registry import EvalData, EvalTask, get_task, register_task, task_names

__all__ = ["EvalData", "EvalTask", "get_task", "register_task", "task_names"]
