"""NestedOptimizer: any user-composed stack of levels as a torch optimizer."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from ..chain import Chain
from ..levels.base import Level
from .base import LevelOptimizer, Rule

__all__ = ["NestedOptimizer"]


class NestedOptimizer(LevelOptimizer):
    r"""A chain of levels of your choosing: ``W <- W - lr * read(level_K(... level_1(g)))``.

    Each parameter goes through ``levels``; a parameter that some level does not apply to (a
    vector for :class:`~deepopt.levels.NewtonSchulz`) goes through ``fallback``, by default the
    same levels minus those that do not apply, so ``model.parameters()`` of any model works.
    Levels may have periods (slow levels); their hyperparameters live in the param groups.

    Args:
        params: parameters or param groups.
        levels: the levels, input side first.
        lr: learning rate; weight_decay: decay, ``weight_decay_mode`` ``"decoupled"`` or ``"coupled"``.
        fallback: levels for parameters the main chain does not apply to.
        maximize: ascend (step along ``+g``), as torch optimizers.
        impl, nonfinite: see :class:`~deepopt.optim.base.LevelOptimizer`.

    Example:
        >>> import torch, deepopt
        >>> from deepopt.levels import Momentum, NewtonSchulz, DiagonalPreconditioner
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = deepopt.NestedOptimizer(model.parameters(), lr=0.02, levels=[
        ...     DiagonalPreconditioner(period=10), Momentum(0.9, form="ema", period=2), NewtonSchulz()])
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(self, params: Iterable[Any], levels: Sequence[Level], lr: float = 1e-3, weight_decay: float = 0.0,
                 weight_decay_mode: str = "decoupled", fallback: Sequence[Level] | None = None, *,
                 impl: str = "auto", nonfinite: str = "skip", maximize: bool = False) -> None:
        rule = self._rule(levels, lr, weight_decay, weight_decay_mode, fallback)
        self.weight_decay_mode = rule.weight_decay_mode
        super().__init__(params, rule.defaults, rule.chains, impl=impl, nonfinite=nonfinite,
                         maximize=maximize)

    @classmethod
    def _rule(cls, levels: Sequence[Level], lr: float, weight_decay: float, weight_decay_mode: str,
              fallback: Sequence[Level] | None) -> Rule:
        if weight_decay_mode not in ("decoupled", "coupled"):
            raise ValueError(f"invalid weight_decay_mode: {weight_decay_mode!r}; use 'decoupled' or 'coupled'")
        if not levels or not all(isinstance(lvl, Level) for lvl in levels):
            raise ValueError("levels must be a non-empty list of deepopt.levels.Level objects")
        chains = [Chain(*levels)]
        if fallback is not None:
            chains.append(Chain(*fallback))
        else:
            rest = [lvl for lvl in levels if type(lvl).applies_to is Level.applies_to]
            if rest and len(rest) < len(levels):
                chains.append(Chain(*rest))
        return Rule(chains, dict(lr=lr, weight_decay=weight_decay), weight_decay_mode)
