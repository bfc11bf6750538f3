"""Newton-Schulz for many matrices at once: batched by shape, bf16, and a Gram form for wide matrices.

The quintic iteration of :func:`deepopt.levels.orthogonal.level.newton_schulz` on ``X`` (``m x n``,
``m <= n``, ``X_0 = M/||M||_F``) is ``X <- P(A) X`` with ``A = X X^T`` and
``P(A) = aI + bA + cA^2``. Two things make it cheaper here:

* **batching**: same-shaped matrices (the layers of a transformer) are stacked into one
  ``(B, m, n)`` tensor and iterated with ``bmm``/``baddbmm``: one launch per matmul for all
  layers instead of one per layer; the last step writes its result already in the caller's
  orientation (``X^T P`` for tall matrices, since ``P`` is symmetric), so no transpose copy.
* **the Gram form** (``method="gram"``), from the symmetry of ``A``: every iterate is
  ``X_k = Q_k X_0`` with ``Q_k`` a polynomial in the symmetric ``A_0``, so all ``A_k``,
  ``P_k``, ``Q_k`` commute and the iteration can run on ``m x m`` matrices only:

      P_k = aI + bA_k + cA_k^2,   Q_{k+1} = P_k Q_k,   A_{k+1} = P_k A_k P_k^T = P_k (P_k A_k),

  with ``X = Q X_0`` formed once at the end. Per step this costs ``8 m^3`` flops instead of
  ``4 m^2 n + 2 m^3``; with two ``m^2 n`` products to restart the recursion at ``restart``
  (``X = Q X_0``, ``A = X X^T``: in bf16 the recursion alone drifts on low-rank inputs) five
  steps cost ``8 m^2 n + 28 m^3`` flops against ``20 m^2 n + 10 m^3``: 0.67x for ``n = 4m``.
  ``method="auto"`` uses it when ``n >= 2m``.

Flops of the standard form per step on ``m x n`` (``m <= n``): ``4 m^2 n + 2 m^3``
(:func:`ns_flops` counts both forms).

Example:
    >>> import torch
    >>> from deepopt.levels.orthogonal.batched import newton_schulz_many
    >>> ms = [torch.randn(16, 64), torch.randn(16, 64), torch.randn(32, 8)]
    >>> outs = newton_schulz_many(ms, dtype=torch.float32)
    >>> [tuple(o.shape) for o in outs]
    [(16, 64), (16, 64), (32, 8)]
    >>> s = torch.linalg.svdvals(outs[0]); bool(s.min() > 0.5 and s.max() < 1.3)
    True
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .level import NS_COEFFICIENTS

__all__ = ["newton_schulz_batched", "newton_schulz_many", "NSBatches", "ns_flops", "METHODS", "GRAM_RATIO",
           "orthogonality_error"]

METHODS = ("auto", "standard", "gram")
#: ``method="auto"`` takes the Gram form when ``n >= GRAM_RATIO * m``.
GRAM_RATIO = 2.0
#: restart step of the Gram form (measured: restarting after two steps keeps bf16 as accurate as torch's).
GRAM_RESTART = 2


def _use_gram(m: int, n: int, method: str) -> bool:
    if method not in METHODS:
        raise ValueError(f"invalid method: {method!r}; use one of {METHODS}")
    return method == "gram" or (method == "auto" and n >= GRAM_RATIO * m and m > 1)


def ns_flops(rows: int, cols: int, steps: int = 5, method: str = "standard") -> float:
    """Matmul flops of ``steps`` Newton-Schulz steps on one ``rows x cols`` matrix."""
    m, n = min(rows, cols), max(rows, cols)
    if not _use_gram(m, n, method) or steps < 1:
        return steps * (4.0 * m * m * n + 2.0 * m**3)
    restart = 0 < GRAM_RESTART < steps
    cubes = 0
    for k in range(steps):
        cubes += 1 + (k > 0 and not (restart and k == GRAM_RESTART))  # A^2, and Q = P Q
        if k < steps - 1 and not (restart and k + 1 == GRAM_RESTART):
            cubes += 2  # A <- P (P A)
    return 2.0 * m**3 * cubes + 2.0 * m * m * n * (2 + 2 * restart)


def newton_schulz_batched(x: Tensor, coefficients: Sequence[float] = NS_COEFFICIENTS, steps: int = 5,
                          eps: float = 1e-7, method: str = "auto") -> Tensor:
    """Orthogonalize each matrix of ``x`` (``(B, rows, cols)``, already in the computation dtype).

    Returns a new contiguous ``(B, rows, cols)`` tensor of ``x``'s dtype.
    """
    if x.ndim != 3:
        raise ValueError(f"newton_schulz_batched: x must be (batch, rows, cols), got shape {tuple(x.shape)}")
    a, b, c = (float(v) for v in coefficients)
    tall = x.size(-2) > x.size(-1)
    X = x.mT if tall else x
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    if steps == 0:
        return X.mT.contiguous() if tall else X.contiguous()
    if _use_gram(X.size(-2), X.size(-1), method):
        Q = _gram_polynomial(X, a, b, c, steps)
        X, Q = Q if isinstance(Q, tuple) else (X, Q)
        return torch.bmm(X.mT, Q) if tall else torch.bmm(Q, X)
    for k in range(steps):
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        if k == steps - 1 and tall:
            return torch.baddbmm(X.mT, X.mT, B, beta=a)  # (aX + BX)^T = aX^T + X^T B, B symmetric
        X = torch.baddbmm(X, B, X, beta=a)
    return X


def _gram_polynomial(X: Tensor, a: float, b: float, c: float, steps: int):
    """``Q`` with ``Q X`` the result (or ``(X_restarted, Q)``); see the module docstring."""
    A = torch.bmm(X, X.mT)
    eye = torch.eye(A.size(-1), dtype=A.dtype, device=A.device)
    Q = None
    restart = 0 < GRAM_RESTART < steps
    for k in range(steps):
        if restart and k == GRAM_RESTART:
            X = torch.bmm(Q, X)
            A = torch.bmm(X, X.mT)
            Q = None
        P = torch.baddbmm(A, A, A, beta=b, alpha=c).add_(eye, alpha=a)
        Q = P if Q is None else torch.bmm(P, Q)
        if k < steps - 1 and not (restart and k + 1 == GRAM_RESTART):
            A = torch.bmm(P, torch.bmm(P, A))
    return (X, Q) if restart else Q


class NSBatches:
    """Stacked input buffers for a list of matrix shapes, so a kernel can write its read-out
    straight into the batch (no stacking copy) and one batched iteration serves each shape.

    Args:
        shapes: ``(rows, cols)`` of every matrix, in order.
        dtype, device: of the buffers (the computation dtype).
    """

    def __init__(self, shapes: Sequence[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> None:
        self.shapes = [tuple(s) for s in shapes]
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(self.shapes):
            self.groups.setdefault(s, []).append(i)
        self.inputs = {s: torch.empty((len(idx), *s), dtype=dtype, device=device) for s, idx in self.groups.items()}
        self._where = {i: (s, j) for s, idx in self.groups.items() for j, i in enumerate(idx)}

    def slot(self, i: int) -> Tensor:
        """The input buffer of matrix ``i`` (a contiguous ``(rows, cols)`` view)."""
        s, j = self._where[i]
        return self.inputs[s][j]

    def run(self, coefficients: Sequence[float] = NS_COEFFICIENTS, steps: int = 5, eps: float = 1e-7,
            method: str = "auto") -> list[Tensor]:
        """Orthogonalize every buffer; returns the outputs in input order (contiguous views)."""
        outs: list[Tensor | None] = [None] * len(self.shapes)
        for s, idx in self.groups.items():
            o = newton_schulz_batched(self.inputs[s], coefficients, steps, eps, method)
            for j, i in enumerate(idx):
                outs[i] = o[j]
        return outs  # type: ignore[return-value]


def newton_schulz_many(ms: Sequence[Tensor], coefficients: Sequence[float] = NS_COEFFICIENTS, steps: int = 5,
                       eps: float = 1e-7, dtype: torch.dtype | None = torch.bfloat16,
                       method: str = "auto") -> list[Tensor]:
    """Orthogonalize a list of matrices (any shapes; tensors of more dimensions as
    ``(shape[0], -1)``), batching the equal shapes. Outputs have ``dtype`` (None: the input's)
    and each input's shape."""
    if not ms:
        return []
    dt = dtype or ms[0].dtype
    shapes = [(m.shape[0], m[0].numel()) for m in ms]
    batches = NSBatches(shapes, dt, ms[0].device)
    for i, m in enumerate(ms):
        batches.slot(i).copy_(m.reshape(shapes[i]))
    return [o.reshape(m.shape) for o, m in zip(batches.run(coefficients, steps, eps, method), ms)]


def orthogonality_error(o: Tensor) -> float:
    """``||O O^T - I||_F / sqrt(m)`` on the smaller side ``m`` (float64)."""
    o = o.reshape(o.shape[0], -1).double()
    if o.shape[0] > o.shape[1]:
        o = o.mT
    eye = torch.eye(o.shape[0], dtype=o.dtype, device=o.device)
    return float((o @ o.mT - eye).norm() / o.shape[0] ** 0.5)
