"""DeltaMomentum: a momentum memory trained by the delta rule (it forgets along the gradient)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..chain import Chain
from ..levels import DeltaMomentumLevel
from .base import LevelOptimizer, Rule

__all__ = ["DeltaMomentum"]


class DeltaMomentum(LevelOptimizer):
    r"""Delta momentum (Eq. 49): momentum whose inner objective is L2 regression, not a dot product.

    .. math::
        m \leftarrow m\Big(\mu I - \lambda \frac{G^\top G}{\|G\|_F^2}\Big) + g,\qquad
        W \leftarrow W - \eta\,m \ \ (\text{or } g + \mu m \text{ with nesterov})

    Nested Learning reading: one gradient step on :math:`\|m\,g^\top - P\|^2` makes the memory
    erase what it holds along the current gradient's directions before writing it (the delta
    rule of DeltaNet, one level up). The gradient is normalized so the decay's spectrum lies in
    :math:`[\mu - \lambda, \mu]`. Matrices use their row space; a vector ``m`` forgets its
    component along ``g`` (a rank-1 projection). ``delta=0`` is exactly ``torch.optim.SGD``.

    Args:
        params: parameters or param groups.
        lr, momentum, nesterov: as in SGD; weight_decay: coupled, as in SGD.
        delta: :math:`\lambda \in [0, 1]`, how strongly the memory forgets along the gradient.
        maximize: ascend (step along ``+g``), as torch optimizers.
        forget_dtype: the dtype of the forget term's matmuls ``M G^T G`` for float32 (and
            narrower) parameters, accumulated in float32: ``"auto"`` (default) takes
            ``torch.bfloat16`` where bf16 matmuls are native (CUDA GPUs of compute capability
            8.0+, CPUs with AVX512-BF16 or AMX: about 2x cheaper than float32 on GPUs, 5x on such
            a CPU) and the parameter's dtype elsewhere (on an AVX2 CPU a bf16 matmul is emulated,
            80x slower than float32); ``torch.bfloat16`` forces it, None keeps the parameter's
            dtype everywhere. The term is scaled by ``lam / ||G||^2``, so bf16 rounding (relative
            2^-8) moves the buffer by at most about ``lam 2^-8 ||m||`` per step; a test bounds the
            drift from the float32 step. float64 parameters always use float64. A float32
            forget term follows torch's TF32 setting (``allow_tf32``), as any float32 matmul.
        impl, nonfinite: see :class:`~deepopt.optim.base.LevelOptimizer`.

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = deepopt.DeltaMomentum(model.parameters(), lr=0.05, momentum=0.9, delta=0.5)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    weight_decay_mode = "coupled"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.9, delta: float = 0.5,
                 nesterov: bool = False, weight_decay: float = 0.0, *, impl: str = "auto",
                 nonfinite: str = "skip", maximize: bool = False,
                 forget_dtype: torch.dtype | str | None = "auto") -> None:
        rule = self._rule(lr, momentum, delta, nesterov, weight_decay, forget_dtype)
        super().__init__(params, rule.defaults, rule.chains, impl=impl, nonfinite=nonfinite,
                         maximize=maximize)

    @classmethod
    def _rule(cls, lr: float, momentum: float, delta: float, nesterov: bool, weight_decay: float,
              forget_dtype: torch.dtype | str | None = "auto") -> Rule:
        chain = Chain(DeltaMomentumLevel(momentum, delta, nesterov, forget_dtype=forget_dtype))
        defaults = dict(lr=lr, momentum=momentum, delta=delta, nesterov=nesterov, weight_decay=weight_decay)
        return Rule([chain], defaults, cls.weight_decay_mode)
