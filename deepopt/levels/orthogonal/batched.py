"""Newton-Schulz for many matrices at once: batched by shape, and a Gram form for wide matrices.

The quintic iteration of :func:`deepopt.levels.orthogonal.level.newton_schulz` on ``X`` (``m x n``,
``m <= n``, ``X_0 = M/||M||_F``) is ``X <- P(A) X`` with ``A = X X^T`` and
``P(A) = aI + bA + cA^2``. Two things make it cheaper here:

* **batching**: same-shaped matrices (the layers of a transformer) are stacked into one
  ``(B, m, n)`` tensor and iterated with ``bmm``/``baddbmm``: one launch per matmul for all
  layers instead of one per layer; the last step writes its result already in the caller's
  orientation (``X^T P`` for tall matrices, since ``P`` is symmetric), so no transpose copy.
* **the Gram form** (``method="gram"``): every iterate is ``X_k = Q_k X_0`` with ``Q_k`` a
  polynomial in the symmetric ``A_0``, so all ``A_k``, ``B_k = bA_k + cA_k^2`` and ``Q_k`` commute
  and the iteration runs on ``m x m`` matrices only, ``P_k`` applied in factored form
  (``P_k Y = aY + B_k Y``, one ``baddbmm`` with ``beta=a``):

      B_k = b A_k + c A_k^2,   Q_{k+1} = a Q_k + B_k Q_k  (Q_1 = aI + B_0),
      A_{k+1} = P_k (P_k A_k)                              (= X_{k+1} X_{k+1}^T),

  and ``X = Q X_0`` formed at the end. In exact arithmetic it equals the standard form (tested in
  float64).

**Stability of the Gram form.** ``Q_k`` maps a direction of singular value ``s`` to about
``a^k s`` while ``s`` is small, so after ``k`` steps its entries span ``a^k`` (``a^5 = 484``) and
the final ``Q X_0`` amplifies the rounding of the small directions by that much; the ``A_k``
recursion also drifts from ``Q_k X_0`` (its rounding is never re-read from ``X``). Two remedies
make the Gram form *more* accurate than torch's bf16 iteration instead of less:

* **restart** every ``GRAM_RESTART = 3`` steps: ``X_3 = Q_3 X_0`` and ``A_3 = X_3 X_3^T`` are
  recomputed from ``X`` and ``Q`` starts again from ``I`` (five steps: segments of 3 and 2, so
  ``Q`` spans at most ``a^3 = 41``);
* **float16 products** for a bfloat16 (or float16) input: the same tensor-core rate as bf16 and
  3 more mantissa bits (unit roundoff 2^-11 against 2^-8), with float32 accumulation as bf16. Its
  narrower range is kept safe by scaling: ``X' = sqrt(n) X_0`` (entries of RMS ``1/sqrt(m)``, at
  most ``sqrt(n)``), ``A = X' X'^T / n`` and ``O = Q X' / sqrt(n)`` (the scale in the matmul's
  ``alpha``); ``A``, ``B``, ``Q`` have norms below 2, 5 and 41. ``P`` is never materialized: its
  diagonal ``a + ...`` is nearly the same number on every row, so rounding it would round all
  rows the same way (a bias of the gain, measured 0.2%); ``beta=a`` keeps ``a`` in float32.

Measured against float64 (``benchmarks/ns_accuracy.py``; the rounding error
``||O - O_64||_F / ||O_64||_F``): torch's bf16 iteration 0.011-0.18 by input family, the Gram form
0.002-0.02 (5-10x smaller), with the orthogonality error of the exact iteration to +-0.001.

* **symmetric products** (CUDA, ``method`` auto or gram): every ``m x m`` product above is
  symmetric in exact arithmetic (``A``, ``A^2``, and in the Gram form ``B A``, ``B Q``,
  ``B (P A)``: polynomials in one symmetric matrix), so only its upper triangle of tiles is
  computed and mirrored (:func:`~deepopt.levels.orthogonal.symmetric.symmetric_baddbmm`, one
  Triton kernel for 16-bit inputs: about half of the flops, float32 accumulation as the library
  matmul). Only ``P X`` (or ``Q X``) is a full product.

Flops on ``m x n`` (``m <= n``, five steps, full products): standard ``5 (4 m^2 n + 2 m^3)``; Gram
``8 m^2 n + 28 m^3`` (a segment of ``L`` steps costs ``4L - 3`` products of ``2 m^3`` and two of
``2 m^2 n``): 0.67x for ``n = 4m``, break-even at ``n = 1.5 m``; with symmetric products
(counted as half): standard ``5 (3 m^2 n + m^3)``, Gram ``6 m^2 n + 14 m^3`` (:func:`ns_flops`
counts each). ``method="auto"`` takes the Gram form for ``n >= 2m`` on CUDA,
symmetric products on CUDA for every shape; on the CPU (slow float16 matmuls) it is the standard
form with full products, which is torch's iteration exactly, except that on a CPU without native
bf16 matmuls (AVX2) it computes a 16-bit request in float32
(:func:`~deepopt.levels.precision.ns_compute_dtype`: torch's bf16 iteration is emulated there,
80x slower than float32). ``method="standard"`` is torch's iteration on every device.

Example:
    >>> import torch
    >>> from deepopt.levels.orthogonal.batched import newton_schulz_many
    >>> ms = [torch.randn(16, 64), torch.randn(16, 64), torch.randn(32, 8)]
    >>> outs = newton_schulz_many(ms, dtype=torch.float32)
    >>> [tuple(o.shape) for o in outs]
    [(16, 64), (16, 64), (32, 8)]
    >>> s = torch.linalg.svdvals(outs[0]); bool(s.min() > 0.5 and s.max() < 1.3)
    True
    >>> g = newton_schulz_many([ms[0].double()], dtype=None, method="gram")[0]
    >>> c = newton_schulz_many([ms[0].double()], dtype=None, method="standard")[0]
    >>> bool((g - c).abs().max() < 1e-10)  # the same function in exact arithmetic
    True
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..precision import ns_compute_dtype
from .level import NS_COEFFICIENTS
from .symmetric import flop_fraction, symmetric_baddbmm

__all__ = ["newton_schulz_batched", "gram_newton_schulz", "newton_schulz_many", "orthogonalize_one", "NSBatches",
           "ns_flops", "METHODS", "GRAM_RATIO", "GRAM_RESTART", "orthogonality_error"]

METHODS = ("auto", "standard", "gram")
#: ``method="auto"`` takes the Gram form when ``n >= GRAM_RATIO * m`` (on CUDA).
GRAM_RATIO = 2.0
#: steps between restarts of the Gram form (``X = Q X_0``, ``A = X X^T``): five steps run as 3 + 2.
GRAM_RESTART = 3


def _use_gram(m: int, n: int, method: str, device: torch.device | str | None = None) -> bool:
    """Whether ``method`` runs the Gram form on an ``m x n`` matrix (``m <= n``) on ``device``
    (None: as on CUDA)."""
    if method not in METHODS:
        raise ValueError(f"invalid method: {method!r}; use one of {METHODS}")
    if method == "gram":
        return True
    cuda = device is None or torch.device(device).type == "cuda"
    return method == "auto" and cuda and n >= GRAM_RATIO * m and m > 1


def _use_symmetric(method: str, device: torch.device | str | None = None) -> bool:
    """Whether ``method`` computes the symmetric products on their upper triangle of tiles on
    ``device`` (None: as on CUDA): auto and gram on CUDA."""
    cuda = device is None or torch.device(device).type == "cuda"
    return cuda and method in ("auto", "gram")


def _product(left: Tensor, right: Tensor, sym: bool, alpha: float = 1.0, beta: float = 0.0,
             add: Tensor | None = None) -> Tensor:
    """``beta * add + alpha * left @ right^T`` for a symmetric result: on its upper triangle of tiles
    if ``sym``, else one ``bmm``/``baddbmm`` (callers pass ``right = A.mT`` for ``left @ A``: the
    same call as ``baddbmm(add, left, A)``)."""
    return symmetric_baddbmm(left, right, alpha=alpha, beta=beta, add=add, impl="auto" if sym else "reference")


def _segments(steps: int) -> list[int]:
    """Lengths of the Gram form's segments between restarts (5 -> [3, 2])."""
    return [min(GRAM_RESTART, steps - k) for k in range(0, steps, GRAM_RESTART)]


def ns_flops(rows: int, cols: int, steps: int = 5, method: str = "standard") -> float:
    """Matmul flops of ``steps`` Newton-Schulz steps on one ``rows x cols`` matrix (``method="auto"``
    counted as on CUDA)."""
    m, n = min(rows, cols), max(rows, cols)
    f = flop_fraction(m) if _use_symmetric(method) else 1.0
    if not _use_gram(m, n, method) or steps < 1:
        return steps * (2.0 * m * m * n * (1.0 + f) + 2.0 * m**3 * f)
    seg = _segments(steps)
    return 2.0 * m**3 * f * sum(4 * L - 3 for L in seg) + 2.0 * m * m * n * (1.0 + f) * len(seg)


def newton_schulz_batched(x: Tensor, coefficients: Sequence[float] = NS_COEFFICIENTS, steps: int = 5,
                          eps: float = 1e-7, method: str = "auto", symmetric: bool | None = None) -> Tensor:
    """Orthogonalize each matrix of ``x`` (``(B, rows, cols)``, already in the computation dtype).

    ``symmetric`` (default: as ``method`` takes it on ``x``'s device) computes ``A`` and ``A^2`` on
    their upper triangle of tiles. Returns a new contiguous ``(B, rows, cols)`` tensor of ``x``'s dtype.
    """
    if x.ndim != 3:
        raise ValueError(f"newton_schulz_batched: x must be (batch, rows, cols), got shape {tuple(x.shape)}")
    a, b, c = (float(v) for v in coefficients)
    tall = x.size(-2) > x.size(-1)
    sym = _use_symmetric(method, x.device) if symmetric is None else bool(symmetric)
    if steps > 0 and _use_gram(min(x.shape[-2:]), max(x.shape[-2:]), method, x.device):
        return gram_newton_schulz(x, (a, b, c), steps, eps, sym)
    X = x.mT if tall else x
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    if steps == 0:
        return X.mT.contiguous() if tall else X.contiguous()
    for k in range(steps):
        A = _product(X, X, sym)
        B = _product(A, A.mT, sym, alpha=c, beta=b, add=A)
        if k == steps - 1 and tall:
            return torch.baddbmm(X.mT, X.mT, B, beta=a)  # (aX + BX)^T = aX^T + X^T B, B symmetric
        X = torch.baddbmm(X, B, X, beta=a)
    return X


def gram_newton_schulz(x: Tensor, coefficients: Sequence[float] = NS_COEFFICIENTS, steps: int = 5,
                       eps: float = 1e-7, symmetric: bool = False) -> Tensor:
    """The Gram form (module docstring) on ``x`` (``(B, rows, cols)``): products in float16 for a
    16-bit ``x``, else in ``x``'s dtype, the ``m x m`` ones on their upper triangle of tiles if
    ``symmetric``; returns a contiguous tensor of ``x``'s dtype and shape. Its reference is the
    standard form (:func:`newton_schulz_batched` with ``method="standard"``), equal in exact
    arithmetic."""
    a, b, c = (float(v) for v in coefficients)
    tall = x.size(-2) > x.size(-1)
    X = x.mT if tall else x
    batch, m, n = X.shape
    dt = torch.float16 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    scale = math.sqrt(n)  # X' = sqrt(n) X_0: entries far from float16's smallest normal (6e-5)
    acc = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=acc).clamp(min=eps)
    X = torch.mul(X, scale / norm, out=torch.empty(batch, m, n, dtype=dt, device=x.device))
    inv = 1.0 / (scale * scale)
    Q = None
    for L in _segments(steps):
        if Q is not None:  # restart: X = Q X, read A again from X
            X = torch.bmm(Q, X)
        A = _product(X, X, symmetric, alpha=inv)
        for k in range(L):  # every m x m product is symmetric (A, B, Q: polynomials in one A_0)
            B = _product(A, A.mT, symmetric, alpha=c, beta=b, add=A)
            if k < L - 1:
                PA = _product(B, A.mT, symmetric, beta=a, add=A)
                A = _product(B, PA.mT, symmetric, beta=a, add=PA)
            if k == 0:  # Q = aI + B, in B's memory (B is not read again)
                Q = B
                d = Q.diagonal(dim1=-2, dim2=-1)
                d.copy_(d.to(acc) + a)  # a in float32 (a float16 scalar add may round a first)
            else:
                Q = _product(B, Q.mT, symmetric, beta=a, add=Q)
    if tall:  # O^T = X^T Q^T: the tall input's orientation, contiguous
        out = torch.baddbmm(torch.empty(batch, n, m, dtype=dt, device=x.device), X.mT, Q.mT, beta=0.0,
                            alpha=1.0 / scale)
    else:
        out = torch.baddbmm(torch.empty_like(X), Q, X, beta=0.0, alpha=1.0 / scale)
    return out if out.dtype == x.dtype else out.to(x.dtype)


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
    dt = ns_compute_dtype(dtype or ms[0].dtype, method, ms[0].device)
    shapes = [(m.shape[0], m[0].numel()) for m in ms]
    batches = NSBatches(shapes, dt, ms[0].device)
    for i, m in enumerate(ms):
        batches.slot(i).copy_(m.reshape(shapes[i]))
    return [o.reshape(m.shape) for o, m in zip(batches.run(coefficients, steps, eps, method), ms)]


def orthogonalize_one(m: Tensor, coefficients: Sequence[float] = NS_COEFFICIENTS, steps: int = 5, eps: float = 1e-7,
                      dtype: torch.dtype | None = torch.bfloat16, method: str = "standard") -> Tensor:
    """One matrix (``(rows, cols)``; the foreach path): the Gram form where ``method`` takes it on
    this shape and device, else torch's iteration
    (:func:`~deepopt.levels.orthogonal.level.newton_schulz`). Output of ``dtype`` (None: ``m``'s)."""
    from .level import newton_schulz

    r, c = m.shape[0], m[0].numel()
    dtype = ns_compute_dtype(dtype or m.dtype, method, m.device)
    if steps > 0 and _use_gram(min(r, c), max(r, c), method, m.device):
        return newton_schulz_many([m], coefficients, steps, eps, dtype, method)[0]
    return newton_schulz(m, tuple(coefficients), steps, eps, dtype)


def orthogonality_error(o: Tensor) -> float:
    """``||O O^T - I||_F / sqrt(m)`` on the smaller side ``m`` (float64)."""
    o = o.reshape(o.shape[0], -1).double()
    if o.shape[0] > o.shape[1]:
        o = o.mT
    eye = torch.eye(o.shape[0], dtype=o.dtype, device=o.device)
    return float((o @ o.mT - eye).norm() / o.shape[0] ** 0.5)
