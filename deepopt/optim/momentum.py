"""MomentumMemory: SGD with momentum read as a memory of gradients."""

from __future__ import annotations

from typing import Any, Iterable

from ..chain import Chain
from ..levels import Momentum
from .base import LevelOptimizer, Rule

__all__ = ["MomentumMemory"]


class MomentumMemory(LevelOptimizer):
    r"""Momentum as an associative memory: exactly ``torch.optim.SGD`` with the same arguments.

    .. math::
        g \leftarrow g + \lambda W, \quad m \leftarrow \mu m + (1 - \tau) g, \quad
        W \leftarrow W - \eta\,(g + \mu m \text{ if nesterov else } m)

    Nested Learning reading: ``m`` is the one-step solution of
    :math:`\min_m -\langle m, g_t\rangle + \frac{1}{2}\|m - \mu m_{t-1}\|^2`, a Hebbian memory that
    compresses the gradient stream (paper Eqs. 10-13, 33). The first step copies ``g`` into the
    buffer, as torch does.

    Args:
        params: parameters or param groups (a group may set ``period`` for a slow level).
        lr: learning rate :math:`\eta`.
        momentum: decay :math:`\mu` of the memory (default 0.9; SGD's is 0).
        dampening: :math:`\tau`.
        weight_decay: coupled L2 penalty :math:`\lambda` (added to the gradient, as SGD).
        nesterov: apply the look-ahead read-out.
        maximize, foreach, differentiable, fused: torch.optim.SGD's arguments, in SGD's order (see
            :mod:`deepopt.optim.conventions`), so ``SGD(**kw)`` -> ``MomentumMemory(**kw)`` is a swap.
        impl, nonfinite: see :class:`~deepopt.optim.base.LevelOptimizer`.

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = deepopt.MomentumMemory(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    weight_decay_mode = "coupled"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 impl: str = "auto", nonfinite: str = "skip") -> None:
        rule = self._rule(lr, momentum, dampening, nesterov, weight_decay)
        super().__init__(params, rule.defaults, rule.chains, impl=impl, nonfinite=nonfinite, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)

    @classmethod
    def _rule(cls, lr: float, momentum: float, dampening: float, nesterov: bool, weight_decay: float) -> Rule:
        chain = Chain(Momentum(momentum, dampening, nesterov, form="sgd"))
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay)
        return Rule([chain], defaults, cls.weight_decay_mode)
