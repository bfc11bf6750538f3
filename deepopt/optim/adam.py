"""AdamMemory: Adam's moments as element-wise L2 memories (AdamW exactly, or the paper's sums)."""

from __future__ import annotations

from typing import Any, Iterable

from ..chain import Chain
from ..levels import AdamMoments
from .base import LevelOptimizer, Rule

__all__ = ["AdamMemory"]


class AdamMemory(LevelOptimizer):
    r"""Adam as an associative memory. ``form="ema"`` is exactly ``torch.optim.AdamW``.

    ``form="ema"`` (default):

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\ v \leftarrow \beta_2 v + (1-\beta_2) g^2,\
        W \leftarrow W(1 - \eta\lambda) - \eta\,\frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon}

    ``form="accumulate"`` (paper-literal, App. B): :math:`M \leftarrow M + \beta_1 g`,
    :math:`H \leftarrow H + \beta_2 g^2`, :math:`W \leftarrow W - \eta M / (\sqrt{H} + \epsilon)`;
    AdaGrad-like: it never forgets, so its steps shrink as ``H`` grows.

    Nested Learning reading: the moments are the optimal solution of the element-wise regression
    :math:`\sum_i \|m \odot g_i - P\|^2 + \lambda\|m\|^2` with :math:`P = (\sum_i g_i^2)^{1/2}`,
    i.e. a memory mapping gradients to a preconditioned step.

    Args:
        params: parameters or param groups.
        lr: learning rate; betas: ``(beta1, beta2)``; eps: denominator floor.
        weight_decay: decoupled decay :math:`\lambda` (AdamW's default 1e-2).
        amsgrad: divide by the running maximum of ``v`` (AdamW's AMSGrad, exactly).
        form: ``"ema"`` or ``"accumulate"``.
        maximize, foreach, capturable, differentiable, fused: torch.optim.AdamW's arguments (see
            :mod:`deepopt.optim.conventions`), so ``AdamW(**kw)`` -> ``AdamMemory(**kw)`` is a swap.
        impl, nonfinite: see :class:`~deepopt.optim.base.LevelOptimizer`.

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = deepopt.AdamMemory(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, form: str = "ema", *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None, impl: str = "auto",
                 nonfinite: str = "skip") -> None:
        rule = self._rule(lr, betas, eps, weight_decay, amsgrad, form)
        super().__init__(params, rule.defaults, rule.chains, impl=impl, nonfinite=nonfinite, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused)

    @classmethod
    def _rule(cls, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, amsgrad: bool,
              form: str) -> Rule:
        chain = Chain(AdamMoments(betas, eps, form, amsgrad=amsgrad))
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, form=form)
        return Rule([chain], defaults, cls.weight_decay_mode)

    def _upgrade_group(self, group: dict[str, Any]) -> None:
        super()._upgrade_group(group)
        group.setdefault("amsgrad", False)  # checkpoints written before amsgrad existed

    def _optional_keys(self) -> set[str]:
        return super()._optional_keys() | {"amsgrad"}
