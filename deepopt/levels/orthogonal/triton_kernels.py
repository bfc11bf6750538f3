"""Triton kernel of the orthogonal family: a batched product whose result is known to be symmetric.

``C = beta D + alpha L R^T`` (``L``, ``R``: ``(batch, m, k)``, any strides; ``D``, ``C``:
``(batch, m, m)``) on square tiles: program ``(t, b)`` computes tile ``(i, j)``, ``i <= j``, of
matrix ``b`` (``t`` enumerates the upper triangle of tiles) with float32 accumulation and stores it
at ``(i, j)`` and, transposed, at ``(j, i)``: ``(T + 1) / (2T)`` of the full product's tiles
(``T = ceil(m / BLOCK)``). Its reference is :func:`torch.baddbmm`
(:func:`deepopt.levels.orthogonal.symmetric.symmetric_baddbmm` with ``impl="reference"``).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: the autotuner's choices (square output tiles: BLOCK x BLOCK, BLOCK_K along the inner dimension):
#: the two that won an H100 sweep of five at 24 x 2048 x {2048, 8192} (each one more compilation)
CONFIGS = [
    triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
]


@triton.jit
def _tile(t):
    """Tile ``(i, j)``, ``i <= j``, of the ``t``-th upper-triangle tile (column-major over the
    triangle: ``t = j (j + 1) / 2 + i``)."""
    j = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    j = tl.where((j + 1) * (j + 2) // 2 <= t, j + 1, j)  # float rounding of the square root
    j = tl.where(j * (j + 1) // 2 > t, j - 1, j)
    return t - j * (j + 1) // 2, j


@triton.jit
def symmetric_product_kernel(L, R, D, C, M, K, s_lb, s_lm, s_lk, s_rb, s_rm, s_rk, s_db, s_dm, s_dn, s_cb, s_cm,
                             alpha, beta, HAS_D: tl.constexpr, F32_DOT: tl.constexpr, BLOCK: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """One tile of ``C = beta D + alpha L R^T`` and its mirror (module docstring); ``C`` row-major.
    ``F32_DOT``: the products in float32 (IEEE), for float32 inputs, and for 16-bit ones in Triton's
    interpreter, whose bfloat16 ``dot`` reads the bits wrongly (widening is exact)."""
    ti, tj = _tile(tl.program_id(0))
    b = tl.program_id(1).to(tl.int64)
    ri = ti * BLOCK + tl.arange(0, BLOCK)
    rj = tj * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    lp = L + b * s_lb + ri[:, None] * s_lm + rk[None, :] * s_lk
    rp = R + b * s_rb + rj[None, :] * s_rm + rk[:, None] * s_rk
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        left = tl.load(lp, mask=(ri[:, None] < M) & (rk[None, :] + k < K), other=0.0)
        right = tl.load(rp, mask=(rj[None, :] < M) & (rk[:, None] + k < K), other=0.0)
        if F32_DOT:
            acc = tl.dot(left.to(tl.float32), right.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(left, right, acc)
        lp += BLOCK_K * s_lk
        rp += BLOCK_K * s_rk
    acc = acc * alpha
    inside = (ri[:, None] < M) & (rj[None, :] < M)
    if HAS_D:
        acc += beta * tl.load(D + b * s_db + ri[:, None] * s_dm + rj[None, :] * s_dn, mask=inside,
                              other=0.0).to(tl.float32)
    out = acc.to(C.dtype.element_ty)
    tl.store(C + b * s_cb + ri[:, None] * s_cm + rj[None, :], out, mask=inside)
    if ti != tj:
        tl.store(C + b * s_cb + rj[:, None] * s_cm + ri[None, :], tl.trans(out), mask=tl.trans(inside))


symmetric_product_tuned = triton.autotune(CONFIGS, key=["M", "K", "HAS_D"])(symmetric_product_kernel)
