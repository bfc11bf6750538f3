"""Newton-Schulz orthogonalization as an inner optimizer (paper Eqs. 43-44, 52): the sigma of Muon.

Orthogonalizing a matrix M is the read-out of a memory whose objective is ||O^T O - I||^2; the
quintic Newton-Schulz iteration takes a few steps of that inner optimization:

    X_0 = M / ||M||_F,    X <- a X + (b A + c A^2) X,   A = X X^T,
    (a, b, c) = (3.4445, -4.7750, 2.0315),  5 steps, on the smaller side of the matrix.

The result is close to ``U V^T`` (``M = U S V^T``) with singular values in about [0.7, 1.2].
:func:`newton_schulz` computes in bfloat16 by default, with exactly the operations of
``torch.optim.Muon`` (``ns_method="standard"`` makes ``MuonMemory`` equal it bit for bit). The
group key ``ns_method`` picks the form: ``"standard"`` (this function), ``"gram"`` (the Gram form
of :mod:`deepopt.levels.orthogonal.batched`: the same function in exact arithmetic, fewer flops on
wide matrices and a smaller rounding error than torch's bf16 iteration) or ``"auto"`` (the Gram form
on CUDA for ``n >= 2m``, else the standard one; MuonMemory's and M3's default). Tensors with more than two dimensions are orthogonalized
as the matrix ``(shape[0], prod(shape[1:]))`` (conv filters); vectors and scalars are not matrices
and are left to an element-wise level (``applies_to`` is False for them).

Example:
    >>> import torch
    >>> from deepopt.levels.orthogonal import newton_schulz
    >>> O = newton_schulz(torch.randn(16, 32), dtype=torch.float32)
    >>> s = torch.linalg.svdvals(O)
    >>> bool(s.min() > 0.5 and s.max() < 1.3)
    True
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from ..base import Direction, Level, State, check_nonnegative
from ..precision import ns_compute_dtype

__all__ = ["NewtonSchulz", "newton_schulz", "owner_batched", "check_ns_method", "adjust_lr_ratio", "NS_COEFFICIENTS", "ADJUST_LR_FNS"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "none")


def newton_schulz(m: Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = torch.bfloat16) -> Tensor:
    """Approximately orthogonalize the 2-D tensor ``m`` (pure; returns a tensor of ``dtype``).

    Args:
        m: a matrix; batched input ``(..., rows, cols)`` is also accepted.
        coefficients: ``(a, b, c)`` of the quintic iteration.
        steps: number of iterations.
        eps: floor of the Frobenius norm used to scale ``m``.
        dtype: computation dtype (bfloat16 as torch's Muon; None keeps ``m``'s dtype).
    """
    a, b, c = coefficients
    x = m if dtype is None else m.to(dtype)
    transposed = m.size(-2) > m.size(-1)
    if transposed:
        x = x.mT
    batched = x.ndim > 2
    norm = x.norm(dim=(-2, -1), keepdim=True) if batched else x.norm()
    x = x / norm.clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        if batched:
            update = b * gram + c * (gram @ gram)
            x = a * x + update @ x
        else:
            update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, update, x, beta=a)
    return x.mT if transposed else x


def adjust_lr_ratio(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """Muon's per-matrix learning-rate ratio for a ``(rows, cols)`` matrix.

    ``None``/``"original"``: sqrt(max(1, rows/cols)) (Keller Jordan's Muon);
    ``"match_rms_adamw"``: 0.2 sqrt(max(rows, cols)) (Moonshot: reuse AdamW's lr);
    ``"none"``: 1.
    """
    rows, cols = shape[0], math.prod(shape[1:])
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def owner_batched(xs: list[Tensor], coefficients, steps: int, eps: float, dtype: torch.dtype | None,
                  group: Mapping[str, Any]):
    """On CUDA, what an owner rank runs on its share of a spread Newton-Schulz: the batched form of
    the fused single-process step (by shape, ``ns_method``); None (one matrix at a time, as the
    foreach step) elsewhere."""
    if not xs or not xs[0].is_cuda:
        return None
    from .batched import newton_schulz_many

    method = group.get("ns_method", "standard")
    return lambda ms: newton_schulz_many(ms, coefficients, steps, eps, dtype, method)


def check_ns_method(group: Mapping[str, Any]) -> str:
    """The group's Newton-Schulz form (key ``"ns_method"``, default ``"standard"``), validated."""
    from .batched import METHODS

    method = group.get("ns_method", "standard")
    if method not in METHODS:
        raise ValueError(f"invalid ns_method: {method!r}; use one of {METHODS}")
    return method


class NewtonSchulz(Level):
    """Stateless level: read-out ``O = NS(x)`` with Muon's learning-rate ratio as ``mul``.

    The form is the group's ``ns_method`` (default ``"standard"``: torch's iteration; see the module
    docstring).

    Args:
        ns_coefficients, ns_steps: the iteration (group keys of the same names).
        eps: the floor of the norm that scales the input (group key ``"ns_eps"``; MuonMemory
            maps it to ``"eps"``, the name torch's Muon uses).
        adjust_lr_fn: see :func:`adjust_lr_ratio`.
        ns_dtype: computation dtype (not a group key): ``torch.bfloat16`` as torch's Muon.
    """

    name = "ns"
    #: not element-wise, but only through Newton-Schulz: deepopt.distributed spreads it over ranks
    ns_spread = True

    def __init__(self, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, ns_steps: int = 5,
                 eps: float = 1e-7, adjust_lr_fn: str | None = None,
                 ns_dtype: torch.dtype | None = torch.bfloat16, keys: Mapping[str, str] | None = None) -> None:
        keys = {"eps": "ns_eps", **(keys or {})}  # "eps" is usually a denominator's floor elsewhere
        super().__init__(keys=keys, ns_coefficients=tuple(ns_coefficients), ns_steps=ns_steps, eps=eps,
                         adjust_lr_fn=adjust_lr_fn)
        self.ns_dtype = ns_dtype

    def validate(self, group: Mapping[str, Any]) -> None:
        coeffs, steps = self.hp(group, "ns_coefficients"), self.hp(group, "ns_steps")
        if not (isinstance(coeffs, (tuple, list)) and len(coeffs) == 3):
            raise ValueError(f"invalid ns_coefficients: {coeffs!r}; give three floats (a, b, c)")
        if not (isinstance(steps, int) and 0 <= steps < 100):
            raise ValueError(f"invalid ns_steps: {steps!r}; use an int in [0, 100)")
        check_nonnegative(group, self.key("eps"))
        if self.hp(group, "adjust_lr_fn") not in ADJUST_LR_FNS:
            raise ValueError(f"invalid adjust_lr_fn: {self.hp(group, 'adjust_lr_fn')!r}; use one of {ADJUST_LR_FNS}")
        check_ns_method(group)

    def applies_to(self, p: Tensor, group: Mapping[str, Any]) -> bool:
        flag = group.get("orthogonalize")
        return p.ndim >= 2 if flag is None else bool(flag) and p.ndim >= 2

    def orthogonalize(self, x: Tensor, group: Mapping[str, Any]) -> Tensor:
        """``NS(x)`` for any tensor of two or more dimensions, in ``x``'s shape."""
        return self.orthogonalize_many([x], group)[0]

    def orthogonalize_many(self, xs: list[Tensor], group: Mapping[str, Any]) -> list[Tensor]:
        """``NS(x)`` of each (DTensors: spread over ranks, :func:`deepopt.distributed.orthogonalize_many`)."""
        from ...distributed import orthogonalize_many
        from .batched import orthogonalize_one

        coeffs, steps, eps = tuple(self.hp(group, "ns_coefficients")), self.hp(group, "ns_steps"), self.hp(group, "eps")
        method = check_ns_method(group)
        dt = ns_compute_dtype(self.ns_dtype, method, xs[0].device) if xs and self.ns_dtype else self.ns_dtype
        return orthogonalize_many(xs, lambda m: orthogonalize_one(m, coeffs, steps, eps, dt, method),
                                  dt, owner_batched(xs, coeffs, steps, eps, dt, group))

    def read(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> Direction:
        return Direction(self.orthogonalize(x, group), mul=adjust_lr_ratio(p.shape, self.hp(group, "adjust_lr_fn")))

    def read_(self, states: list[State], xs: list[Tensor], ps: list[Tensor],
              group: Mapping[str, Any], ts: list[int]) -> list[Direction]:
        fn = self.hp(group, "adjust_lr_fn")
        return [Direction(o, mul=adjust_lr_ratio(p.shape, fn)) for o, p in zip(self.orthogonalize_many(xs, group), ps)]
