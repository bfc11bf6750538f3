"""The task registry: every benchmark task by name (benchmarks/README.md, "Tasks").

Example:
    >>> from benchmarks.tasks import TASKS, get_task
    >>> "digits_mlp" in TASKS and get_task("digits_mlp").steps > 0
    True
"""

from __future__ import annotations

from .base import FAMILIES, Problem, Task
from .digits import TASKS as _DIGITS
from .recall import TASKS as _RECALL
from .synthetic import TASKS as _SYNTHETIC
from .text import TASKS as _TEXT

TASKS: dict[str, Task] = {**_SYNTHETIC, **_DIGITS, **_TEXT, **_RECALL}

__all__ = ["FAMILIES", "Problem", "TASKS", "Task", "get_task"]


def get_task(name: str) -> Task:
    """The task called ``name``; a ValueError lists the valid names."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)} (see `python -m benchmarks list`)")
    return TASKS[name]
