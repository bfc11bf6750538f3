"""``LevelMonitor``: log what each parameter level (update period) does, to the Trainer's loggers.

Per level ``C`` (the parameters of period ``C``), every ``logging_interval`` optimizer steps:

* ``levels/period_C/update_norm``: ``||W_t - W_{t-1}||`` over the level, at its latest update;
* ``levels/period_C/update_fraction``: fraction of the optimizer steps so far that changed it
  (``1/C`` for a slow level under :class:`MultiTimescale`);
* ``levels/period_C/param_norm``: ``||W||`` over the level;
* ``levels/period_C/state/<key>_norm``: norm over the level of each optimizer memory buffer
  (``exp_avg``, ``momentum_buffer``, deepopt's namespaced buffers ...), i.e. momentum norms per level;
* ``levels/memory/<name>``: ``optimizer.memory_stats()`` of deepopt optimizers (when it exists).

The levels come from, in order: the ``levels`` argument, a :class:`MultiTimescale` callback, a
:class:`NestLevels` callback, the ``"period"`` key of the optimizer's param groups (deepopt
optimizers), else everything is one level of period 1.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from lightning.pytorch.loggers import CSVLogger
    >>> from deepopt.lightning import LevelMonitor, MultiTimescale
    >>> trainer = Trainer(callbacks=[MultiTimescale({"encoder.*": 4}), LevelMonitor()],
    ...                   logger=CSVLogger("logs"), max_steps=10)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from ._periods import resolve_levels, validate_levels
from .multi_timescale import MultiTimescale
from .nest_levels import NestLevels

from ..distributed import is_dtensor

__all__ = ["LevelMonitor", "level_state_norms"]


def _sq(t: Tensor) -> float:
    """Sum of squares of ``t``; for a DTensor shard, over the whole tensor (the same on every rank)."""
    s = t.detach().double().pow(2).sum()
    return float(s.full_tensor() if is_dtensor(s) else s)


def _norm(tensors: Iterable[Tensor]) -> float:
    return sum(_sq(t) for t in tensors) ** 0.5


def level_state_norms(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> dict[str, float]:
    """Norm over ``params`` of every tensor buffer the optimizer keeps for them (``{key: norm}``).

    Scalars (step counters) are left out. Example: ``{"exp_avg": 0.3, "exp_avg_sq": 1e-4}``.
    """
    sq: dict[str, float] = {}
    for p in params:
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, Tensor) and value.numel() > 1:
                sq[key] = sq.get(key, 0.0) + _sq(value)
    return {k: v ** 0.5 for k, v in sq.items()}


class LevelMonitor(Callback):
    """Log per-level update norms, update fractions and optimizer memory statistics.

    Args:
        levels: level specification ``{name or pattern: period}``; ``None`` = find it (see the
            module docstring).
        logging_interval: log every this many optimizer steps (default: ``trainer.log_every_n_steps``).
        prefix: prefix of every logged key.

    Attributes:
        history: every logged dict (with its ``"step"``), for plots and tests.
        periods: ``{name: period}`` the monitor uses, known from the first optimizer step.
    """

    def __init__(self, levels: Mapping[str, int] | None = None, logging_interval: int | None = None,
                 prefix: str = "levels/") -> None:
        if logging_interval is not None and (not isinstance(logging_interval, int) or logging_interval < 1):
            raise ValueError(f"logging_interval must be an int >= 1 or None, got {logging_interval!r}")
        self.levels = None if levels is None else validate_levels(levels)
        self.logging_interval = logging_interval
        self.prefix = prefix
        self.history: list[dict[str, float]] = []
        self.periods: dict[str, int] = {}
        self._reset()

    def _reset(self) -> None:
        self._bound = False
        self._level_params: dict[int, list[Tensor]] = {}
        self._level_of: dict[int, int] = {}  # id(param) -> period
        self._snapshots: dict[int, tuple[Tensor, Tensor]] = {}
        self._steps = 0
        self._updates: dict[int, int] = {}
        self._last_update_norm: dict[int, float] = {}

    # ----------------------------------------------------------------- which params are which level
    def _find_periods(self, trainer: Trainer, named: list[tuple[str, Tensor]]) -> dict[str, int]:
        names = [n for n, _ in named]
        if self.levels is not None:
            return resolve_levels(names, self.levels)
        for cb in trainer.callbacks:
            if isinstance(cb, MultiTimescale) and cb.periods:
                return {n: cb.periods.get(n, 1) for n in names}
        for cb in trainer.callbacks:
            if isinstance(cb, NestLevels) and cb.nested_levels:
                return resolve_levels(names, cb.nested_levels, strict=False)
        by_id = {id(p): n for n, p in named}
        out = dict.fromkeys(names, 1)
        for opt in trainer.optimizers:
            for group in getattr(opt, "param_groups", []):
                for p in group["params"]:
                    if id(p) in by_id:
                        out[by_id[id(p)]] = int(group.get("period", 1))
        return out

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    def _bind(self, trainer: Trainer, pl_module: LightningModule) -> None:
        named = list(pl_module.named_parameters())
        self.periods = self._find_periods(trainer, named)
        for name, p in named:
            c = self.periods[name]
            self._level_params.setdefault(c, []).append(p)
            self._level_of[id(p)] = c
        self._level_params = dict(sorted(self._level_params.items()))
        self._updates = dict.fromkeys(self._level_params, 0)
        self._last_update_norm = dict.fromkeys(self._level_params, 0.0)
        self._bound = True

    # ----------------------------------------------------------------- measuring
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._bound:
            self._bind(trainer, pl_module)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in self._level_of:
                    self._snapshots[id(p)] = (p, p.detach().clone())

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self._snapshots:
            return
        sq = dict.fromkeys(self._level_params, 0.0)
        for pid, (p, before) in self._snapshots.items():
            sq[self._level_of[pid]] += _sq(p.detach() - before)
        self._snapshots = {}
        self._steps += 1
        for c, s in sq.items():
            if s > 0.0:
                self._updates[c] += 1
                self._last_update_norm[c] = s ** 0.5
        interval = self.logging_interval or trainer.log_every_n_steps
        if self._steps % interval == 0:
            self._log(trainer)

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        """The current per-level statistics (what is logged)."""
        out: dict[str, float] = {}
        optimizers = [getattr(o, "_optimizer", o) for o in trainer.optimizers]
        for c, params in self._level_params.items():
            key = f"{self.prefix}period_{c}/"
            out[key + "update_norm"] = self._last_update_norm[c]
            out[key + "update_fraction"] = self._updates[c] / max(self._steps, 1)
            out[key + "param_norm"] = _norm(params)
            for opt in optimizers:
                for name, value in level_state_norms(opt, params).items():
                    out[f"{key}state/{name}_norm"] = value
        for opt in optimizers:
            stats = getattr(opt, "memory_stats", None)
            if callable(stats):
                for name, value in stats().items():
                    out[f"{self.prefix}memory/{name}"] = float(value)
        return out

    def _log(self, trainer: Trainer) -> None:
        metrics = self.metrics(trainer)
        self.history.append({"step": trainer.global_step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
