"""DeepMomentum (DMGD): the momentum buffer is a small network trained by its own objective."""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from torch import Tensor

from ..chain import Chain
from ..levels.adaptive import DiagonalPreconditioner, FactoredPreconditioner
from ..levels.deep import DeepMemory
from .base import LevelOptimizer, Rule

__all__ = ["DeepMomentum"]


class DeepMomentum(LevelOptimizer):
    r"""Deep momentum gradient descent (Eq. 50): ``W <- W - lr sigma(m_phi(g_t))``.

    The memory of each parameter tensor is a network
    :math:`m_\phi(u) = b + \sum_j w_{2j} \tanh(w_{1j} k + b_{1j})` (element-wise, ``k`` the
    gradient normalized by its RMS) whose parameters learn by gradient descent with decay
    :math:`\mu` on momentum's inner objective :math:`-\langle m_\phi(u), u\rangle`, computed with
    ``torch.func.grad`` (:mod:`deepopt.levels.deep`). Nested Learning reading: momentum is a
    linear memory of gradients trained by one gradient step per token of the gradient stream;
    DMGD gives that memory depth (an MLP), so it can compress the stream non-linearly.
    ``precondition=True`` feeds the memory Adam's preconditioned gradient instead,
    :math:`x_t = g_t / (\sqrt{\hat v_t} + \epsilon)` with :math:`v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2`
    (a :class:`~deepopt.levels.DiagonalPreconditioner` level before the memory, bias-corrected as
    Adam): the memory then sees gradients of one scale in every tensor; ``precondition="factored"``
    divides by Adafactor's factored :math:`\hat v` instead (:class:`~deepopt.levels.FactoredPreconditioner`:
    a mean of :math:`g^2` per row and per column, no second moment per entry). ``normalize=False``
    feeds the memory's MLP its input as it comes, not divided by its RMS over the tensor (for a
    preconditioned input, already of unit scale). ``sigma`` is ``"identity"``, ``"sign"``,
    ``"rms"`` (the read-out divided by its root mean square over the tensor: a step of RMS ``lr``)
    or ``"ns"`` (Newton-Schulz on matrices, identity on the rest; in bf16 as torch's Muon, or in
    float32 on a CPU where bf16 matmuls are emulated: :mod:`deepopt.levels.precision`).

    Reduction: ``inner_lr=0`` (with the default silent MLP init) is exactly
    ``torch.optim.SGD(momentum=momentum)``; with ``precondition=True`` (and no weight decay, which is
    coupled here and decoupled there) it is exactly :class:`~deepopt.PreconditionedMomentum`. The
    memory's initial MLP weights (``memory_init``, a param-group key, so it is saved in
    ``state_dict()``), ``momentum`` and ``inner_lr`` are what :mod:`deepopt.meta` learns.

    Args:
        params: parameters or param groups.
        lr, momentum, weight_decay (coupled, as SGD): as usual.
        inner_lr: the memory network's inner learning rate.
        sigma: read-out map.
        hidden: width of the memory MLP.
        memory_init: initial ``{"w1", "b1", "w2"}`` of shape ``(hidden,)``.
        precondition: False, True (Adam's diagonal ``v``: feed the memory ``g / (sqrt(v_hat) + eps)``)
            or ``"factored"`` (Adafactor's row and column statistics); fixed at construction.
        beta2, eps: the preconditioner's decay and denominator term (param-group keys; with a
            preconditioner only).
        normalize: the memory's MLP reads its input divided by its RMS over the tensor (default)
            or, False, as it is (fixed at construction).
        maximize: ascend (step along ``+g``), as torch optimizers.
        impl, nonfinite: see :class:`~deepopt.optim.base.LevelOptimizer`.

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = deepopt.DeepMomentum(model.parameters(), lr=0.05, momentum=0.9, inner_lr=0.1)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    weight_decay_mode = "coupled"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.9, inner_lr: float = 0.1,
                 sigma: str = "identity", hidden: int = 8, weight_decay: float = 0.0,
                 memory_init: Mapping[str, Tensor] | None = None, precondition: bool | str = False,
                 beta2: float = 0.999, eps: float = 1e-8, *, normalize: bool = True, impl: str = "auto",
                 nonfinite: str = "skip", maximize: bool = False) -> None:
        self.precondition = precondition
        rule = self._rule(lr, momentum, inner_lr, sigma, hidden, weight_decay, memory_init, precondition, beta2, eps,
                          normalize)
        self.memory: DeepMemory = rule.chains[0].levels[-1]
        super().__init__(params, rule.defaults, rule.chains, impl=impl, nonfinite=nonfinite,
                         maximize=maximize)

    @classmethod
    def pretrained(cls, params: Iterable[Any], name: str | os.PathLike = "default", **overrides: Any) -> DeepMomentum:
        r"""DeepMomentum with a pretrained memory: ``W <- W - lr sigma(m_phi(g_t))`` from ``phi_0 =
        memory_init``, with ``momentum``, ``inner_lr``, ``sigma`` and the recommended ``lr`` of the memory.

        ``name``: a shipped memory (``deepopt.pretrained.available()``) or the path of a ``.json``
        memory file (:mod:`deepopt.pretrained`); ``overrides``: any constructor argument (``lr``,
        ``weight_decay``, ``impl``...), which wins over the memory's.

        The recommended ``lr`` is a constant rate learned for runs of tens to hundreds of steps
        (each memory's card says which); for much longer runs decay it with a scheduler (it lives
        in ``group["lr"]``): at 10x its evaluation horizon with a constant rate, the ``default``
        memory (Newton-Schulz read-out) kept training but overfit or oscillated in 5 of 15 runs,
        ``elementwise``, ``adaptive`` (identity read-out over Adam-preconditioned gradients) and
        ``factored`` (over Adafactor-preconditioned gradients, SGD-momentum's state size) in none
        (``benchmarks/results/pretrained``).

        Example:
            >>> import os, tempfile, torch, deepopt
            >>> learned = {"lr": 0.05, "momentum": 0.9, "inner_lr": 0.1,
            ...            "memory_init": {"w1": torch.linspace(0.5, 2, 8), "b1": torch.zeros(8),
            ...                            "w2": torch.full((8,), 0.01)}}
            >>> card = dict.fromkeys(deepopt.pretrained.CARD_KEYS, "a doctest")
            >>> path = deepopt.pretrained.save(os.path.join(tempfile.mkdtemp(), "mine.json"), learned,
            ...                                name="mine", card=card)
            >>> model = torch.nn.Linear(4, 2)
            >>> opt = deepopt.DeepMomentum.pretrained(model.parameters(), name=path, weight_decay=1e-4)
            >>> opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]
            (0.05, 0.0001)
            >>> model(torch.randn(8, 4)).square().mean().backward()
            >>> opt.step()
        """
        from ..pretrained import load  # above the optimizers (it reads the registry)

        return cls(params, **load(name).kwargs(**overrides))

    @classmethod
    def _rule(cls, lr: float, momentum: float, inner_lr: float, sigma: str, hidden: int, weight_decay: float,
              memory_init: Mapping[str, Tensor] | None, precondition: bool | str = False, beta2: float = 0.999,
              eps: float = 1e-8, normalize: bool = True) -> Rule:
        if not (isinstance(precondition, bool) or precondition == "factored"):
            raise ValueError(f"precondition must be True, False or 'factored', got {precondition!r}")
        memory = DeepMemory(momentum, inner_lr, sigma, hidden, memory_init, normalize=normalize)
        defaults = dict(lr=lr, momentum=momentum, inner_lr=inner_lr, sigma=sigma, weight_decay=weight_decay,
                        memory_init=memory.memory_init)
        if not precondition:
            return Rule([Chain(memory)], defaults, cls.weight_decay_mode)
        defaults.update(beta2=beta2, eps=eps)
        pre = FactoredPreconditioner if precondition == "factored" else DiagonalPreconditioner
        return Rule([Chain(pre(beta2, eps), memory)], defaults, cls.weight_decay_mode)
