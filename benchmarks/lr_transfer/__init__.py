"""``python -m benchmarks.lr_transfer``: each optimizer's best learning rate relative to AdamW's.

Sweeps every registered optimizer (the torch baselines and ``deepopt.OPTIMIZERS``) over a fixed
rate grid (1e-4 ... 3, half-decade steps) on two small MLP tasks, 200 steps, 2 seeds, and reports
per optimizer the best rate, its ratio to AdamW's best rate, the loss there and at AdamW's best
rate (what a drop-in replacement that keeps AdamW's rate gets), and a rule of thumb over the tasks.
A few minutes on one CPU thread. Writes ``results.json`` and ``results.md`` to
``./runs/lr_transfer-<time>/`` (``--update-results``: ``benchmarks/results/lr_transfer/``).
Modules: :mod:`.tasks`, :mod:`.sweep`, :mod:`.report`, :mod:`.cli`.

Example:
    >>> from benchmarks.lr_transfer import GRID
    >>> GRID[0], GRID[-1]
    (0.0001, 3.0)
"""

from .sweep import GRID

__all__ = ["GRID"]
