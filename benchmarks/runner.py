"""Run optimizers on tasks: one trial, a learning-rate sweep, and the per-task summary.

A *trial* trains one fresh problem (task, seed) with one optimizer at one learning rate and
records the evaluated loss curve. A run that produces a non-finite loss, or an eval loss above
``DIVERGENCE_FACTOR`` times its starting value, stops and counts as diverged (final loss inf);
an optimizer that raises is recorded with its error and also counts as failed, so one broken
optimizer never stops a suite.

Tuning protocol (the same for every optimizer): the sweep multiplies the task's learning-rate
centre for the optimizer's family by each factor (default 1/3, 1, 3) on the first seed; the factor
with the lowest final eval loss wins (ties to the smaller rate) and the remaining seeds run at it.
The best rate sitting at an end of the sweep is flagged (``edge``).

Example:
    >>> from benchmarks.tasks import get_task
    >>> from benchmarks.optimizers import select_optimizers
    >>> task = get_task("quadratic_illcond").with_steps(20, 10)
    >>> t = run_trial(task, select_optimizers(["AdamW"])["AdamW"], 1.0, seed=0)
    >>> t.steps, t.diverged
    ([0, 10, 20], False)
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from .optimizers import OptimizerSpec, build_optimizer
from .tasks import Task

DIVERGENCE_FACTOR = 1e3
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)


@dataclass
class Trial:
    """One training run; ``losses[i]`` is the eval loss after ``steps[i]`` optimizer steps."""

    task: str
    optimizer: str
    lr: float
    factor: float
    seed: int
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    diverged: bool = False
    error: str | None = None

    @property
    def final(self) -> float:
        """Last eval loss, inf when the run diverged or failed."""
        if self.diverged or self.error or not self.losses:
            return math.inf
        return self.losses[-1]

    def to_json(self, curve: bool = True) -> dict:
        out = asdict(self)
        out["final"] = self.final
        if not curve:
            out.pop("steps"), out.pop("losses")
        return out


def lrs_for(task: Task, factor: float) -> dict[str, float]:
    """Every family's rate for one sweep point."""
    return {family: centre * factor for family, centre in task.lr_centres.items()}


def evaluate(problem, optimizer) -> float:
    """``problem.eval_loss()``, with optimizers that keep separate evaluation weights (schedule-free:
    ``optimizer.eval()`` / ``optimizer.train()``) switched to them for the evaluation."""
    switch = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    if switch:
        optimizer.eval()
    try:
        return problem.eval_loss()
    finally:
        if switch:
            optimizer.train()


def run_trial(task: Task, spec: OptimizerSpec, factor: float, seed: int, device: str = "cpu") -> Trial:
    """Train ``task`` (seed ``seed``) with ``spec`` at the sweep point ``factor``."""
    lrs = lrs_for(task, factor)
    trial = Trial(task.name, spec.name, lrs[spec.family], factor, seed)
    try:
        problem = task.build(seed, device)
        optimizer = build_optimizer(spec, problem.model, lrs, task.muon_exclude)
        start = evaluate(problem, optimizer)
        trial.steps.append(0), trial.losses.append(start)
        limit = DIVERGENCE_FACTOR * max(abs(start), 1.0)
        for step in range(1, task.steps + 1):
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = problem.train_loss(step)
            loss.backward()
            optimizer.step()
            if device != "cpu":
                torch.cuda.synchronize()
            trial.seconds += time.perf_counter() - t0
            if not math.isfinite(float(loss.detach())):
                trial.diverged = True
                break
            if step % task.eval_every == 0 or step == task.steps:
                value = evaluate(problem, optimizer)
                trial.steps.append(step), trial.losses.append(value)
                if not math.isfinite(value) or abs(value) > limit:
                    trial.diverged = True
                    break
    except Exception as err:  # recorded, reported, and the suite goes on
        frame = traceback.extract_tb(err.__traceback__)[-1]
        trial.error = f"{type(err).__name__}: {err} (at {frame.filename.split('site-packages/')[-1]}:{frame.lineno})"
    return trial


@dataclass
class OptimizerResult:
    """An optimizer on one task: the sweep on the first seed, the chosen factor and all seeds' trials."""

    optimizer: str
    family: str
    sweep: list[Trial]
    best_factor: float
    seeds: list[Trial]

    @property
    def best_lr(self) -> float:
        return self.seeds[0].lr

    @property
    def edge(self) -> bool:
        factors = sorted(t.factor for t in self.sweep)
        return len(factors) > 1 and self.best_factor in (factors[0], factors[-1])


def sweep_and_seeds(task: Task, spec: OptimizerSpec, seeds: Sequence[int], factors: Sequence[float] = SWEEP_FACTORS,
                    device: str = "cpu", advance: Callable[[str], None] = lambda _: None) -> OptimizerResult:
    """The tuning protocol of the module docstring for one (task, optimizer)."""
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    sweep = []
    for factor in factors:
        sweep.append(run_trial(task, spec, factor, seeds[0], device))
        advance(f"{task.name} / {spec.name} lr x{factor:.3g}")
    best = min(sweep, key=lambda t: (t.final, t.factor))
    runs = [best]
    for seed in seeds[1:]:
        runs.append(run_trial(task, spec, best.factor, seed, device))
        advance(f"{task.name} / {spec.name} seed {seed}")
    return OptimizerResult(spec.name, spec.family, sweep, best.factor, runs)
