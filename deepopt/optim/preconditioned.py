"""PreconditionedMomentum: momentum over preconditioned gradients, the preconditioner a slow level."""

from __future__ import annotations

from typing import Any, Iterable

from ..chain import Chain
from ..levels import DiagonalPreconditioner, Momentum
from .base import LevelOptimizer, Rule

__all__ = ["PreconditionedMomentum"]


class PreconditionedMomentum(LevelOptimizer):
    r"""Momentum over a diagonal preconditioner that refreshes every ``precond_period`` steps (Eq. 47).

    .. math::
        v \leftarrow \beta_2 v + (1-\beta_2)\,\overline{g^2} \ \text{(at steps } 1, C+1, 2C+1, \dots),\quad
        m \leftarrow \mu m + \frac{g}{\sqrt{\hat v} + \epsilon},\quad
        W \leftarrow W(1-\eta\lambda) - \eta\,m

    where :math:`\overline{g^2}` is the mean of :math:`g^2` over the preconditioner's chunk.
    Nested Learning reading: two memories at two frequencies: the preconditioner ``P`` (a memory of
    squared gradients, slow when ``precond_period > 1``) feeds the momentum memory
    :math:`m \leftarrow \mu m + P(g)`: "preconditioners as levels". With ``precond_period=1`` and
    ``momentum=0`` it is RMSProp with bias correction.

    Args:
        params: parameters or param groups.
        lr, momentum, nesterov, weight_decay (decoupled): as usual.
        beta2, eps: the preconditioner memory.
        precond_period: its update period C (structural).
        maximize: ascend (step along ``+g``), as torch optimizers.
        impl, nonfinite: see :class:`~deepopt.optim.base.LevelOptimizer`.

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = deepopt.PreconditionedMomentum(model.parameters(), lr=1e-3, precond_period=10)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, precond_period: int = 1, nesterov: bool = False, weight_decay: float = 0.0, *,
                 impl: str = "auto", nonfinite: str = "skip", maximize: bool = False) -> None:
        rule = self._rule(lr, momentum, beta2, eps, precond_period, nesterov, weight_decay)
        super().__init__(params, rule.defaults, rule.chains, impl=impl, nonfinite=nonfinite,
                         maximize=maximize)

    @classmethod
    def _rule(cls, lr: float, momentum: float, beta2: float, eps: float, precond_period: int, nesterov: bool,
              weight_decay: float) -> Rule:
        chain = Chain(DiagonalPreconditioner(beta2, eps, period=precond_period),
                      Momentum(momentum, 0.0, nesterov, form="sgd"))
        defaults = dict(lr=lr, momentum=momentum, dampening=0.0, nesterov=nesterov, beta2=beta2, eps=eps,
                        weight_decay=weight_decay)
        return Rule([chain], defaults, cls.weight_decay_mode)
