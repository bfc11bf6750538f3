"""Batched products whose result is known to be symmetric: the upper triangle of tiles, mirrored.

Every ``m x m`` product of Newton-Schulz is symmetric in exact arithmetic: ``A = X X^T``, ``A^2``,
and in the Gram form ``B A``, ``B Q``, ``B (P A)``, all polynomials in one symmetric matrix (so they
commute and ``(B A)^T = A B = B A``); so is delta momentum's ``G^T G``. :func:`symmetric_baddbmm`
computes

    C = beta * D + alpha * L R^T        (L, R: (batch, m, k); D symmetric or absent)

for such a result. On CUDA in 16-bit dtypes it runs one Triton kernel
(:mod:`deepopt.levels.orthogonal.triton_kernels`) that computes the tiles on and above the
diagonal, each with float32 accumulation as a library matmul, and stores each one twice (at
``(i, j)`` and transposed at ``(j, i)``): about half of the flops. Elsewhere, and with
``impl="reference"``, it is :func:`torch.baddbmm` (the full product, every entry computed).

Example:
    >>> import torch
    >>> from deepopt.levels.orthogonal.symmetric import symmetric_baddbmm
    >>> x = torch.randn(2, 8, 5, dtype=torch.float64)
    >>> bool(torch.allclose(symmetric_baddbmm(x, x, alpha=0.5), 0.5 * x @ x.mT))
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels.launch import interpreting, on_device

__all__ = ["symmetric_baddbmm", "flop_fraction", "uses_kernel", "IMPLS"]

IMPLS = ("auto", "triton", "reference")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
#: the most matrices one launch takes (CUDA's grid limit on its second axis); larger batches go in parts
MAX_BATCH = 65535


def flop_fraction(m: int) -> float:
    """The share of a full ``m x m`` product's entries that a symmetric one needs: ``(m + 1) / (2m)``."""
    return (m + 1) / (2 * m)


def uses_kernel(left: Tensor, impl: str = "auto") -> bool:
    """Whether :func:`symmetric_baddbmm` runs its Triton kernel on ``left`` (auto: a CUDA tensor of a
    16-bit dtype, or any floating tensor under Triton's interpreter)."""
    if impl not in IMPLS:
        raise ValueError(f"invalid impl: {impl!r}; use one of {IMPLS}")
    if impl != "auto":
        return impl == "triton"
    return (left.is_cuda and left.dtype in _KERNEL_DTYPES) or (interpreting() and not left.is_cuda)


def symmetric_baddbmm(left: Tensor, right: Tensor, *, alpha: float = 1.0, beta: float = 0.0,
                      add: Tensor | None = None, impl: str = "auto") -> Tensor:
    """``beta * add + alpha * left @ right^T`` (a new contiguous ``(batch, m, m)`` tensor of
    ``left``'s dtype) for a result known to be symmetric (module docstring). ``add`` must be
    symmetric (the kernel reads its upper triangle of tiles); ``beta = 0`` or ``add=None`` ignores
    it (NaN in it is not propagated). ``impl``: ``"auto"`` (:func:`uses_kernel`), ``"triton"``,
    ``"reference"``."""
    if left.ndim != 3 or right.ndim != 3 or left.shape != right.shape:
        raise ValueError(f"symmetric_baddbmm: left and right must be (batch, m, k) of one shape, got "
                         f"{tuple(left.shape)} and {tuple(right.shape)}")
    batch, m, k = left.shape
    if add is not None and add.shape != (batch, m, m):
        raise ValueError(f"symmetric_baddbmm: add must be (batch, m, m) = {(batch, m, m)}, got {tuple(add.shape)}")
    has_d = add is not None and beta != 0.0
    if not uses_kernel(left, impl):
        if not has_d and alpha == 1.0:
            return torch.bmm(left, right.mT)
        base = add if has_d else torch.empty(batch, m, m, dtype=left.dtype, device=left.device)
        return torch.baddbmm(base, left, right.mT, beta=beta if has_d else 0.0, alpha=alpha)
    if batch > MAX_BATCH:
        parts = [symmetric_baddbmm(left[i:i + MAX_BATCH], right[i:i + MAX_BATCH], alpha=alpha, beta=beta,
                                   add=None if add is None else add[i:i + MAX_BATCH], impl=impl)
                 for i in range(0, batch, MAX_BATCH)]
        return torch.cat(parts)
    from . import triton_kernels as tk

    out = torch.empty(batch, m, m, dtype=left.dtype, device=left.device)
    if out.numel() == 0:
        return out
    d = add if has_d else out
    args = (left, right, d, out, m, k, *left.stride(), *right.stride(), *d.stride(), out.stride(0), out.stride(1),
            float(alpha), float(beta), has_d, left.dtype not in _KERNEL_DTYPES or interpreting())

    def grid(meta):  # the upper triangle of tiles, for every matrix
        t = -(-m // meta["BLOCK"])
        return (t * (t + 1) // 2, batch)

    if interpreting():  # the autotuner times configurations on a GPU: one fixed configuration here
        tk.symmetric_product_kernel[grid](*args, BLOCK=16, BLOCK_K=16)
    else:
        with on_device(out.device):
            tk.symmetric_product_tuned[grid](*args)
    return out
