"""What a benchmark task is: a recipe that builds, for one seed, a model and its losses.

A :class:`Task` is static (name, step budget, learning-rate centres per optimizer family);
``task.build(seed, device)`` returns a fresh :class:`Problem` whose parameters are initialized
from ``seed`` alone, so every optimizer starts from the same point at the same seed.

The runner only needs three things from a problem: ``model`` (an ``nn.Module`` whose
``named_parameters()`` the optimizer gets), ``train_loss(step)`` (a scalar to backpropagate,
possibly stochastic) and ``eval_loss()`` (a deterministic number: the held-out or noiseless loss
that curves, targets and steps-to-target are computed on).

Example:
    >>> from benchmarks.tasks import get_task
    >>> problem = get_task("quadratic_illcond").build(seed=0, device="cpu")
    >>> loss = problem.train_loss(0); loss.backward()
    >>> problem.eval_loss() > 0
    True
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

FAMILIES = ("sgd", "adam", "muon")


class Problem(Protocol):
    """One seeded instance of a task (see module docstring)."""

    model: nn.Module

    def train_loss(self, step: int) -> torch.Tensor: ...

    def eval_loss(self) -> float: ...


@dataclass(frozen=True)
class Task:
    """A benchmark task.

    Args:
        name: registry key (snake_case).
        description: one line for ``python -m benchmarks list`` and the README.
        builder: ``(seed, device) -> Problem``.
        steps: optimizer steps per run.
        eval_every: evaluate ``eval_loss`` every this many steps (and at 0 and ``steps``).
        lr_centres: the centre of the learning-rate sweep for each optimizer family
            ("sgd", "adam", "muon"); the sweep multiplies it by the suite's factors.
        requires: optional ``"module:Attr"`` that must exist at run time (e.g.
            ``"nl_layers:HopeLM"``, alternatives joined by ``|``); the task is skipped with a
            message if it does not.
        muon_exclude: name substrings of 2-D parameters that the Muon baseline hands to AdamW
            (embeddings and output heads, as Muon's authors recommend).
    """

    name: str
    description: str
    builder: Callable[[int, torch.device], Problem]
    steps: int
    eval_every: int
    lr_centres: dict[str, float]
    requires: str | None = None
    muon_exclude: tuple[str, ...] = ("embed", "head")
    tags: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        missing = [f for f in FAMILIES if f not in self.lr_centres]
        if missing:
            raise ValueError(f"Task {self.name!r}: lr_centres lacks families {missing}; give all of {FAMILIES}")
        if self.steps < 1 or self.eval_every < 1:
            raise ValueError(f"Task {self.name!r}: steps and eval_every must be >= 1")

    def availability(self) -> str | None:
        """None when the task can run here, else the reason it cannot (shown by ``list``)."""
        if self.requires is None:
            return None
        module_name, attr = self.requires.split(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # an import error of any kind means "not available"
            return f"needs {self.requires}: cannot import {module_name} ({type(err).__name__}: {err})"
        if not any(hasattr(module, name) for name in attr.split("|")):
            return f"needs {self.requires}: {module_name} has no {attr.replace('|', ' or ')} yet"
        return None

    def build(self, seed: int, device: torch.device | str = "cpu") -> Problem:
        """A fresh problem with parameters initialized from ``seed``."""
        reason = self.availability()
        if reason is not None:
            raise RuntimeError(f"Task {self.name!r} is not available: {reason}")
        torch.manual_seed(seed)
        return self.builder(seed, torch.device(device))

    def with_steps(self, steps: int, eval_every: int | None = None) -> "Task":
        """A copy with another step budget (used by the tiny CI configuration)."""
        from dataclasses import replace

        return replace(self, steps=steps, eval_every=eval_every or max(1, steps // 10))


def seeded_generator(seed: int, salt: int = 0) -> torch.Generator:
    """A CPU generator for data order and noise, independent of the init RNG stream."""
    gen = torch.Generator()
    gen.manual_seed(10_007 * seed + salt)
    return gen
