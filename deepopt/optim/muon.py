"""MuonMemory: momentum memory read through Newton-Schulz, any parameter list."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..chain import Chain
from ..levels import AdamMoments, Momentum, NewtonSchulz
from ..levels.orthogonal import NS_COEFFICIENTS
from .base import LevelOptimizer, Rule

__all__ = ["MuonMemory"]


class MuonMemory(LevelOptimizer):
    r"""Muon as a memory: on matrices ``torch.optim.Muon`` with the same arguments (exactly, bit for
    bit, with ``ns_method="standard"``).

    .. math::
        B \leftarrow \mu B + (1-\mu) g,\quad \tilde B = (1-\mu) g + \mu B \text{ (nesterov)},\quad
        W \leftarrow W(1-\eta\lambda) - \eta\,r(W)\,\mathrm{NS}_5(\tilde B)

    with ``r`` the shape ratio of ``adjust_lr_fn``. Nested Learning reading: the momentum buffer is
    a memory of gradients and Newton-Schulz is an inner optimizer (of :math:`\|O^\top O - I\|^2`)
    that maps the memory to its read-out (Eqs. 43-44). Parameters of two or more dimensions are
    matrices (conv filters as ``(out, in*k*k)``); every other parameter (biases, norms) goes to an
    element-wise AdamW fallback at ``lr * fallback_lr_ratio``, so ``model.parameters()`` just works.
    Set ``orthogonalize=False`` in a param group to send its matrices (embeddings, output heads) to
    the fallback too. With ``adjust_lr_fn="match_rms_adamw"`` one learning rate suits both.

    Args:
        params: parameters or param groups.
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn: as in
            ``torch.optim.Muon``.
        fallback_betas, fallback_eps, fallback_lr_ratio: the AdamW used for non-matrix parameters.
        ns_dtype: Newton-Schulz dtype (bfloat16, as torch).
        ns_method: the Newton-Schulz form (a group key). ``"auto"`` (default): on CUDA, matrices
            with ``n >= 2m`` (``m <= n`` their sides) take the Gram form, the same function in exact
            arithmetic as torch's iteration with 0.67x its flops at ``n = 4m`` and 5-10x less
            rounding error than torch's bf16 iteration (float16 products, restarted; see
            :mod:`deepopt.levels.orthogonal.batched`); other matrices, and every matrix on the CPU,
            take torch's iteration, in float32 on a CPU without native bf16 matmuls (AVX2: there
            torch emulates bf16, 80x slower; :func:`deepopt.levels.precision.ns_compute_dtype`).
            ``"standard"``: torch's iteration everywhere (bit-equal to ``torch.optim.Muon``). ``"gram"``: the Gram form everywhere.
        maximize: ascend (step along ``+g``), as torch optimizers.
        impl, nonfinite: see :class:`~deepopt.optim.base.LevelOptimizer`.

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = deepopt.MuonMemory(model.parameters(), lr=0.02, fallback_lr_ratio=0.05)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None,
                 fallback_betas: tuple[float, float] = (0.9, 0.95), fallback_eps: float = 1e-8,
                 fallback_lr_ratio: float = 1.0, *, ns_dtype: torch.dtype | None = torch.bfloat16,
                 ns_method: str = "auto", impl: str = "auto", nonfinite: str = "skip",
                 maximize: bool = False) -> None:
        rule = self._rule(lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn,
                          fallback_betas, fallback_eps, fallback_lr_ratio, ns_dtype, ns_method)
        super().__init__(params, rule.defaults, rule.chains, impl=impl, nonfinite=nonfinite,
                         maximize=maximize)

    @classmethod
    def _rule(cls, lr: float, weight_decay: float, momentum: float, nesterov: bool,
              ns_coefficients: tuple[float, float, float], eps: float, ns_steps: int, adjust_lr_fn: str | None,
              fallback_betas: tuple[float, float], fallback_eps: float, fallback_lr_ratio: float,
              ns_dtype: torch.dtype | None, ns_method: str = "auto") -> Rule:
        if not fallback_lr_ratio >= 0:
            raise ValueError(f"invalid fallback_lr_ratio: {fallback_lr_ratio!r}; it must be >= 0")
        muon = Chain(Momentum(momentum, nesterov=nesterov, form="ema"),
                     NewtonSchulz(ns_coefficients, ns_steps, eps, adjust_lr_fn, ns_dtype, keys={"eps": "eps"}))
        fallback = Chain(AdamMoments(fallback_betas, fallback_eps, keys={"betas": "fallback_betas",
                                                                         "eps": "fallback_eps"}),
                         lr_scale="fallback_lr_ratio")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        fallback_betas=tuple(fallback_betas), fallback_eps=fallback_eps,
                        fallback_lr_ratio=fallback_lr_ratio, orthogonalize=None, ns_method=ns_method)
        return Rule([muon, fallback], defaults, cls.weight_decay_mode)

    def _upgrade_group(self, group: dict[str, Any]) -> None:
        super()._upgrade_group(group)
        group.setdefault("ns_method", "standard")  # checkpoints written before ns_method: the form they ran

    def _optional_keys(self) -> set[str]:
        return super()._optional_keys() | {"ns_method"}
