r"""Continual-learning metrics over the accuracy matrix, as the literature defines them.

``R[i][j]`` is the metric on task ``j`` after training on tasks ``0..i`` (``T x T``), ``b[j]`` the
metric of the untrained model on task ``j``:

.. math::
    \text{ACC} = \tfrac1T \textstyle\sum_j R_{T-1,j}, \qquad
    \text{BWT} = \tfrac1{T-1} \textstyle\sum_{j<T-1} (R_{T-1,j} - R_{j,j}), \qquad
    \text{FWT} = \tfrac1{T-1} \textstyle\sum_{j>0} (R_{j-1,j} - b_j)

(Lopez-Paz and Ranzato 2017); learning accuracy (plasticity, Riemer et al. 2019)
:math:`\text{LA} = \tfrac1T \sum_j R_{j,j}`; forgetting (Chaudhry et al. 2018)
:math:`F = \tfrac1{T-1}\sum_{j<T-1} \max_{i<T-1} R_{i,j} - R_{T-1,j}`. Note
:math:`\text{ACC} = \text{LA} + \tfrac{T-1}{T}\,\text{BWT}`: the average trades plasticity against
forgetting. With ``higher_is_better=False`` (a loss) BWT, FWT and forgetting are negated so that a
negative BWT always means forgetting.

Example:
    >>> R = [[0.9, 0.1], [0.5, 0.8]]
    >>> round(average_accuracy(R), 3), round(backward_transfer(R), 3), round(learning_accuracy(R), 3)
    (0.65, -0.4, 0.85)
    >>> per_task_curves(R)
    [[0.9, 0.5], [0.8]]
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["average_accuracy", "backward_transfer", "forward_transfer", "learning_accuracy", "forgetting",
           "per_task_curves", "summarize"]

Matrix = Sequence[Sequence[float]]


def _check(matrix: Matrix, need: int = 1) -> int:
    n = len(matrix)
    if n < need or any(len(row) != n for row in matrix):
        raise ValueError(f"matrix must be a T x T accuracy matrix (row i = after task i) with T >= {need}; "
                         f"got {n} rows of lengths {[len(r) for r in matrix]}")
    for row in matrix:
        for v in row:
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"matrix entries must be finite numbers, got {v!r}")
    return n


def average_accuracy(matrix: Matrix) -> float:
    """Mean metric over all tasks after the last one: (1/T) sum_j R[T-1][j]."""
    n = _check(matrix)
    return sum(matrix[-1]) / n


def learning_accuracy(matrix: Matrix) -> float:
    """Plasticity: mean metric on each task right after learning it, (1/T) sum_j R[j][j]."""
    n = _check(matrix)
    return sum(matrix[j][j] for j in range(n)) / n


def backward_transfer(matrix: Matrix, higher_is_better: bool = True) -> float:
    """(1/(T-1)) sum_{j<T-1} (R[T-1][j] - R[j][j]); negative = forgetting (needs T >= 2)."""
    n = _check(matrix, 2)
    value = sum(matrix[-1][j] - matrix[j][j] for j in range(n - 1)) / (n - 1)
    return value if higher_is_better else -value


def forward_transfer(matrix: Matrix, untrained: Sequence[float], higher_is_better: bool = True) -> float:
    """(1/(T-1)) sum_{j>0} (R[j-1][j] - b[j]) with ``untrained`` = b (needs T >= 2)."""
    n = _check(matrix, 2)
    if len(untrained) != n:
        raise ValueError(f"untrained must hold one metric per task ({n}), got {len(untrained)}; pass the "
                         "untrained model's metric on every task")
    value = sum(matrix[j - 1][j] - untrained[j] for j in range(1, n)) / (n - 1)
    return value if higher_is_better else -value


def forgetting(matrix: Matrix, higher_is_better: bool = True) -> float:
    """(1/(T-1)) sum_{j<T-1} (best earlier R[i][j] - R[T-1][j]); >= 0 when higher is better."""
    n = _check(matrix, 2)
    pick = max if higher_is_better else min
    value = sum(pick(matrix[i][j] for i in range(j, n - 1)) - matrix[-1][j] for j in range(n - 1)) / (n - 1)
    return value if higher_is_better else -value


def per_task_curves(matrix: Matrix) -> list[list[float]]:
    """Task j's metric from the moment it was learned on: [R[j][j], R[j+1][j], ..., R[T-1][j]]."""
    n = _check(matrix)
    return [[matrix[i][j] for i in range(j, n)] for j in range(n)]


def summarize(matrix: Matrix, untrained: Sequence[float] | None = None, higher_is_better: bool = True) -> dict:
    """Every metric above in one dict (``fwt`` only when ``untrained`` is given).

    Example:
        >>> s = summarize([[0.9, 0.1], [0.5, 0.8]], untrained=[0.1, 0.1])
        >>> sorted(s)
        ['average', 'bwt', 'curves', 'forgetting', 'fwt', 'learning_accuracy']
    """
    out = {"average": average_accuracy(matrix), "learning_accuracy": learning_accuracy(matrix),
           "bwt": backward_transfer(matrix, higher_is_better), "forgetting": forgetting(matrix, higher_is_better),
           "curves": per_task_curves(matrix)}
    if untrained is not None:
        out["fwt"] = forward_transfer(matrix, untrained, higher_is_better)
    return out
