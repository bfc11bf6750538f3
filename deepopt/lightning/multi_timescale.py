"""``MultiTimescale``: slow and fast parameter levels for any LightningModule, as a callback.

The callback is a thin adapter over :class:`deepopt.lightning._periods.PeriodicGradients`: one per
optimizer, called from ``on_before_optimizer_step``. A parameter of period ``C`` accumulates its
gradients over ``C`` optimizer steps and is stepped only at steps ``t % C == 0`` with their mean;
its optimizer state advances only then (held gradients are set to ``None``, which every torch
optimizer skips).

How it composes with the rest of the Trainer:

* ``accumulate_grad_batches=k``: periods count *optimizer* steps; each step's gradient is the
  one Lightning accumulated over its ``k`` micro-batches.
* gradient clipping (``gradient_clip_val``): Lightning clips right after this hook, so it clips
  the gradient the optimizer steps with: fast gradients on held steps, fast gradients plus the
  reduced slow chunk at a boundary.
* mixed precision: the hook runs after ``GradScaler.unscale_``; a step the scaler skips (inf/nan
  gradients) is neither accumulated nor counted, nor is one that a deepopt optimizer skips
  (``nonfinite="skip"``, its default).
* several param groups, LR schedulers, any torch or deepopt optimizer, manual optimization with
  several optimizers (one counter each).
* checkpoints: the step counters and the open chunks go into ``state_dict``; a run resumed with
  ``Trainer.fit(ckpt_path=...)`` continues exactly as if it had not stopped.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from deepopt.lightning import MultiTimescale
    >>> trainer = Trainer(callbacks=[MultiTimescale({"encoder.*": 4, "head.*": 1})],
    ...                   max_steps=10, logger=False, enable_checkpointing=False)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ._periods import REDUCTIONS, PeriodicGradients, resolve_levels, validate_levels

__all__ = ["MultiTimescale"]


def _raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under a ``LightningOptimizer`` wrapper (or the optimizer itself)."""
    return getattr(optimizer, "_optimizer", optimizer)


def _grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads)


def step_will_be_skipped(trainer: Trainer, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the coming step will not happen: a GradScaler skips it (an unscaled gradient is not
    finite), or a deepopt optimizer with ``nonfinite="skip"`` will (same condition)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    skips = (scaler is not None and scaler.is_enabled()) or getattr(optimizer, "nonfinite", None) == "skip"
    return skips and not _grads_finite(optimizer)


class MultiTimescale(Callback):
    """Give the parameters of any LightningModule update periods (multi-timescale levels).

    Args:
        levels: ``{parameter name or fnmatch pattern: period}`` over the names of
            ``pl_module.named_parameters()`` (e.g. ``{"backbone.*": 8}``), or the spec returned
            by ``nl_layers.nest``. Unmatched parameters have period 1. ``None``: take the levels
            from the :class:`NestLevels` callbacks of the Trainer (set in their ``setup``).
        reduce: ``"mean"`` (default) or ``"sum"`` of a chunk's gradients at the boundary.
        strict: raise if a key of ``levels`` matches no parameter (catches typos).
        module: dotted path of the submodule whose parameter names ``levels`` uses (e.g.
            ``"model"`` for ``levels=nl_layers.nest(self.model)``); ``""`` = the LightningModule.

    Attributes:
        periods: ``{name: period}`` of every parameter, known from ``on_fit_start``.
    """

    def __init__(self, levels: Mapping[str, int] | None = None, reduce: str = "mean",
                 strict: bool = True, module: str = "") -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if not isinstance(module, str):
            raise TypeError(f"module must be a dotted submodule path (str), got {type(module).__name__}")
        if levels is not None:
            prefix = f"{module}." if module else ""
            levels = {prefix + k: c for k, c in validate_levels(levels).items()}
        self.levels = levels
        self.reduce = reduce
        self.strict = strict
        self.periods: dict[str, int] = {}
        self._by_optimizer: dict[int, PeriodicGradients] = {}
        self._order: list[PeriodicGradients] = []
        self._pending: dict[str, Any] | None = None

    # ----------------------------------------------------------------- binding
    def _level_spec(self, trainer: Trainer) -> dict[str, int]:
        if self.levels is not None:
            return self.levels
        spec: dict[str, int] = {}
        for cb in trainer.callbacks:
            nested = getattr(cb, "nested_levels", None)
            if nested is not None:
                spec.update(nested)
        if not spec:
            raise ValueError(
                "MultiTimescale(levels=None) takes its levels from a NestLevels callback among "
                "Trainer(callbacks=[...]); none was found (or nest found no block). Pass "
                "levels={'pattern': period} or add deepopt.lightning.NestLevels(...)."
            )
        return spec

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        spec = self._level_spec(trainer)
        named = list(pl_module.named_parameters())
        self.periods = resolve_levels([n for n, _ in named], spec, strict=self.strict)
        name_of = {id(p): n for n, p in named}
        self._by_optimizer, self._order = {}, []
        for opt in trainer.optimizers:
            opt = _raw_optimizer(opt)
            pairs = [(name_of[id(p)], p) for g in opt.param_groups for p in g["params"] if id(p) in name_of]
            periodic = PeriodicGradients(pairs, spec, self.reduce, strict=False)
            self._by_optimizer[id(opt)] = periodic
            self._order.append(periodic)
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    # ----------------------------------------------------------------- the step
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        opt = _raw_optimizer(optimizer)
        periodic = self._by_optimizer.get(id(opt))
        if periodic is None:
            raise RuntimeError(
                "MultiTimescale saw an optimizer it was not bound to; optimizers must be created by "
                "configure_optimizers (they are bound in on_fit_start)"
            )
        periodic.before_step(skip=step_will_be_skipped(trainer, opt))

    @property
    def steps(self) -> list[int]:
        """Optimizer steps counted so far, one entry per optimizer."""
        return [p.step for p in self._order]

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        if not self._order:
            return dict(self._pending or {})
        return {"reduce": self.reduce, "optimizers": [p.state_dict() for p in self._order]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._order:
            self._load(state_dict)
        else:
            self._pending = dict(state_dict)

    def _load(self, state: Mapping[str, Any]) -> None:
        saved = state["optimizers"]
        if len(saved) != len(self._order):
            raise ValueError(f"checkpoint has MultiTimescale state for {len(saved)} optimizers, "
                             f"this run has {len(self._order)}")
        for periodic, s in zip(self._order, saved):
            periodic.load_state_dict(s)

    def __repr__(self) -> str:
        return f"MultiTimescale(levels={self.levels!r}, reduce={self.reduce!r})"
