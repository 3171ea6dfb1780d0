"""Registry of evaluation task types: ``task.id`` -> (defaults file, runner).

A task module registers its types with ``@register_task(<id>, <defaults file>)`` on its runner
``run(cfg, backbone, task_dir, device) -> {metric: value}``. The dispatcher (``dinov2.eval.tasks``) looks types up
here; the built-in task modules are imported by name on the first lookup, so no task module imports the
dispatcher and the dispatcher imports no task module. Another package adds a task type by registering it the
same way (and listing its module in ``extra_modules`` or importing it before the evaluation starts).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

Runner = Callable[..., Dict[str, float]]
BUILTIN_TASK_MODULES = ("dinov2.eval.knn", "dinov2.eval.linear_task", "dinov2.eval.retrieval",
                        "dinov2.eval.segmentation", "dinov2.eval.regression")


@dataclass(frozen=True)
class TaskType:
    """One task type: its ``task.id``, the defaults file (under ``configs/eval/defaults``) and its runner."""

    id: str
    defaults: str
    runner: Runner


_TYPES: Dict[str, TaskType] = {}
_loaded = False


def register_task(task_id: str, defaults: str) -> Callable[[Runner], Runner]:
    """Decorator registering ``runner`` as the runner of ``task_id``; registering an id twice with another runner
    is an error."""
    def wrap(runner: Runner) -> Runner:
        old = _TYPES.get(task_id)
        if old is not None and (old.runner.__module__, old.runner.__qualname__) != \
                (runner.__module__, runner.__qualname__):
            raise ValueError(f"Task type {task_id!r} is registered twice: {old.runner.__module__} and "
                             f"{runner.__module__}")
        _TYPES[task_id] = TaskType(task_id, defaults, runner)
        return runner
    return wrap


def load_builtin_tasks(extra_modules: Sequence[str] = ()) -> None:
    """Import the built-in task modules (once) and ``extra_modules`` so that they register their types."""
    global _loaded
    if not _loaded:
        for name in BUILTIN_TASK_MODULES:
            importlib.import_module(name)
        _loaded = True
    for name in extra_modules:
        importlib.import_module(name)


def task_type(task_id: str) -> TaskType:
    """The registered type of ``task_id``; ``ValueError`` naming the known ids otherwise."""
    load_builtin_tasks()
    if task_id not in _TYPES:
        raise ValueError(f"task.id must be one of {task_ids()}, got {task_id!r}")
    return _TYPES[task_id]


def task_ids() -> List[str]:
    load_builtin_tasks()
    return sorted(_TYPES)
