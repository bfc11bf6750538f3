"""Benchmark metrics: steps to target, spread over seeds, performance profiles, continual transfer.

Steps to target (AlgoPerf style): the first evaluated step whose loss is <= the target; ``None``
(infinite) if the run never gets there. The ``quality`` suite's target for a task is the loss that
*every* AdamW seed reaches at AdamW's best learning rate (the worst seed's best loss), so AdamW
reaches it by construction and a ratio below 1 means "fewer steps than AdamW".

Performance profile (Dolan & More, 2002; used by AlgoPerf): with cost c[t][s] of solver s on task t
(steps to target, infinite on failure), r[t][s] = c[t][s] / min_s' c[t][s'], and
rho_s(tau) = |{t : r[t][s] <= tau}| / |tasks|. rho_s(1) is the fraction of tasks where s is
(jointly) fastest; rho_s(tau -> inf) the fraction it solves at all.

Continual learning (Lopez-Paz & Ranzato, 2017, GEM): R[i][j] is the metric on task j after training
on tasks 0..i, b[j] the metric of the untrained model on task j; with T tasks,
  average = 1/T sum_j R[T-1][j]
  BWT     = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j])   (negative = forgetting)
  FWT     = 1/(T-1) sum_{j>0}   (R[j-1][j] - b[j])       (positive = earlier tasks helped)
For metrics where lower is better (bits per character) both transfers are negated, so in every
table negative BWT means forgetting.

Example:
    >>> steps_to_target([0, 10, 20], [3.0, 1.0, 0.5], target=1.0)
    10
    >>> backward_transfer([[0.9, 0.1], [0.5, 0.8]])
    -0.4
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence


def steps_to_target(steps: Sequence[int], losses: Sequence[float], target: float) -> int | None:
    """First step whose loss is <= ``target`` (None when never reached)."""
    if len(steps) != len(losses):
        raise ValueError(f"steps ({len(steps)}) and losses ({len(losses)}) must have the same length")
    for step, loss in zip(steps, losses):
        if math.isfinite(loss) and loss <= target:
            return int(step)
    return None


def best_loss(losses: Sequence[float]) -> float:
    """Smallest finite loss of a curve (inf if none is finite)."""
    finite = [x for x in losses if math.isfinite(x)]
    return min(finite) if finite else math.inf


def target_from_reference(reference_curves: Sequence[Sequence[float]]) -> float:
    """The loss every reference seed reaches: the largest of the seeds' best losses."""
    if not reference_curves:
        raise ValueError("target_from_reference needs at least one reference curve")
    return max(best_loss(c) for c in reference_curves)


def spread(values: Sequence[float | None]) -> dict[str, float | int]:
    """Median, mean, std, min, max over the finite values and how many were not finite (None/inf)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    failed = len(values) - len(finite)
    if not finite:
        return {"median": math.inf, "mean": math.inf, "std": 0.0, "min": math.inf, "max": math.inf,
                "n": len(values), "failed": failed}
    return {"median": statistics.median(finite), "mean": statistics.fmean(finite),
            "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "min": min(finite), "max": max(finite), "n": len(values), "failed": failed}


def cost_of_seeds(steps: Sequence[int | None]) -> float:
    """A solver's cost on one task from its seeds' steps to target: the median, inf if half or more failed."""
    as_float = sorted(math.inf if s is None else float(s) for s in steps)
    if not as_float:
        return math.inf
    return float(statistics.median(as_float))


def performance_ratios(costs: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """r[t][s] = c[t][s] / min_s c[t][s]; a task no solver finishes gives inf for all."""
    ratios: dict[str, dict[str, float]] = {}
    for task, by_solver in costs.items():
        best = min(by_solver.values(), default=math.inf)
        ratios[task] = {}
        for solver, cost in by_solver.items():
            if not math.isfinite(cost) or not math.isfinite(best):
                ratios[task][solver] = math.inf
            elif best <= 0:
                ratios[task][solver] = 1.0 if cost <= 0 else math.inf
            else:
                ratios[task][solver] = cost / best
    return ratios


def performance_profile(costs: Mapping[str, Mapping[str, float]], taus: Sequence[float]) -> dict[str, list[float]]:
    """rho_s(tau) for every solver s and every tau (see module doc)."""
    ratios = performance_ratios(costs)
    solvers = sorted({s for by_solver in costs.values() for s in by_solver})
    n_tasks = len(ratios)
    if n_tasks == 0:
        raise ValueError("performance_profile needs at least one task")
    return {s: [sum(1 for t in ratios if ratios[t].get(s, math.inf) <= tau) / n_tasks for tau in taus]
            for s in solvers}


def _check_matrix(matrix: Sequence[Sequence[float]]) -> int:
    n = len(matrix)
    if n < 2 or any(len(row) != n for row in matrix):
        raise ValueError(f"the accuracy matrix must be T x T with T >= 2, got {n} rows of lengths "
                         f"{[len(r) for r in matrix]}")
    return n


def average_final(matrix: Sequence[Sequence[float]]) -> float:
    """Mean metric over all tasks after training on the last one."""
    n = _check_matrix(matrix)
    return sum(matrix[-1]) / n


def backward_transfer(matrix: Sequence[Sequence[float]], higher_is_better: bool = True) -> float:
    """1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j]), negated when lower is better (negative = forgetting)."""
    n = _check_matrix(matrix)
    value = sum(matrix[-1][j] - matrix[j][j] for j in range(n - 1)) / (n - 1)
    return value if higher_is_better else -value


def forward_transfer(matrix: Sequence[Sequence[float]], untrained: Sequence[float],
                     higher_is_better: bool = True) -> float:
    """1/(T-1) sum_{j>0} (R[j-1][j] - b[j]), negated when lower is better."""
    n = _check_matrix(matrix)
    if len(untrained) != n:
        raise ValueError(f"untrained must have one entry per task ({n}), got {len(untrained)}")
    value = sum(matrix[j - 1][j] - untrained[j] for j in range(1, n)) / (n - 1)
    return value if higher_is_better else -value
