"""Batched products whose result is known to be symmetric: compute the upper block staircase, mirror it.

Every ``m x m`` product of Newton-Schulz is symmetric in exact arithmetic: ``A = X X^T``, ``A^2``,
and in the Gram form ``B A``, ``B Q``, ``B (P A)``, all polynomials in one symmetric matrix (so they
commute and ``(B A)^T = A B = B A``). :func:`symmetric_baddbmm` computes

    C = beta * D + alpha * L R^T        (L, R: (batch, m, k); D symmetric or absent)

for such a result on ``q`` row blocks (boundaries ``s_0 = 0 < s_1 < ... < s_q = m``): block row
``i`` is one ``baddbmm`` of ``L[s_i:s_{i+1}]`` against ``R[s_i:]`` (the diagonal block and
everything right of it), and the blocks below the diagonal blocks are the transposes of those
above (``q - 1`` copies). That is ``(q + 1) / (2q)`` of the flops (q = 4: 0.625), in ``q``
launches of the same library matmul, each computed entry the same dot product as in the full
product.

Example:
    >>> import torch
    >>> from deepopt.levels.orthogonal.symmetric import symmetric_baddbmm
    >>> x = torch.randn(2, 8, 5, dtype=torch.float64)
    >>> c = symmetric_baddbmm(x, x, blocks=3)
    >>> bool(torch.allclose(c, x @ x.mT)), bool(torch.equal(c[:, 3:, :3], c[:, :3, 3:].mT))
    (True, True)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["symmetric_baddbmm", "block_bounds", "flop_fraction", "BLOCK_ROWS", "MAX_BLOCKS"]

#: rows per block of :func:`block_bounds` (at least; boundaries are multiples of 64)
BLOCK_ROWS = 512
#: most blocks by default (the flops fall as (q + 1) / (2q); each block is one more launch)
MAX_BLOCKS = 4


def block_bounds(m: int, blocks: int | None = None) -> list[int]:
    """Boundaries ``[0, s_1, ..., m]`` of ``blocks`` row blocks (default: ``m // BLOCK_ROWS``, at
    most ``MAX_BLOCKS``, at least 1); inner boundaries are rounded to multiples of 64 (tensor-core
    tiles) where ``m`` allows, and empty blocks are dropped."""
    q = max(1, min(MAX_BLOCKS, m // BLOCK_ROWS)) if blocks is None else int(blocks)
    if q < 1:
        raise ValueError(f"blocks must be at least 1, got {blocks}")
    step = 64 if m >= 64 * q else 1
    inner = sorted({min(m, round(m * i / q / step) * step) for i in range(1, q)} - {0, m})
    return [0, *inner, m]


def flop_fraction(m: int, blocks: int | None = None) -> float:
    """The share of the full product's flops that :func:`symmetric_baddbmm` computes on ``m`` rows
    (``(q + 1) / (2q)`` for ``q`` equal blocks; 1 for one block)."""
    b = block_bounds(m, blocks)
    return sum((hi - lo) * (m - lo) for lo, hi in zip(b[:-1], b[1:])) / (m * m)


def symmetric_baddbmm(left: Tensor, right: Tensor, *, alpha: float = 1.0, beta: float = 0.0,
                      add: Tensor | None = None, blocks: int | None = None) -> Tensor:
    """``beta * add + alpha * left @ right^T`` (a new ``(batch, m, m)`` tensor of ``left``'s dtype)
    for a result known to be symmetric (module docstring); ``add`` must be symmetric (it is read
    on the staircase only: the diagonal blocks and above). ``beta = 0`` ignores ``add`` (NaN in it
    is not propagated)."""
    if left.ndim != 3 or right.ndim != 3 or left.shape != right.shape:
        raise ValueError(f"symmetric_baddbmm: left and right must be (batch, m, k) of one shape, got "
                         f"{tuple(left.shape)} and {tuple(right.shape)}")
    batch, m, _ = left.shape
    if add is not None and add.shape != (batch, m, m):
        raise ValueError(f"symmetric_baddbmm: add must be (batch, m, m) = {(batch, m, m)}, got {tuple(add.shape)}")
    out = torch.empty(batch, m, m, dtype=left.dtype, device=left.device)
    bounds = block_bounds(m, blocks)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        dst = out[:, lo:hi, lo:]
        src = dst if add is None or beta == 0.0 else add[:, lo:hi, lo:]
        torch.baddbmm(src, left[:, lo:hi], right[:, lo:].mT, beta=0.0 if src is dst else beta, alpha=alpha,
                      out=dst)
    for lo, hi in zip(bounds[1:-1], bounds[2:]):
        out[:, lo:hi, :lo].copy_(out[:, :lo, lo:hi].mT)
    return out
