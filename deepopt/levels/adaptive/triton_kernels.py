"""Triton kernels of the adaptive family: Adam's moments (both forms) and preconditioned momentum.

Conventions (tables, dtypes, ``COUPLED``, the non-finite flag ``found``) in
:mod:`deepopt.kernels.triton_lib`; each kernel's tensor-by-tensor reference and its math are in
:mod:`deepopt.levels.adaptive.fused`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...kernels.triton_lib import _cast, _col, _grad_p, _ld, _row


# ----------------------------------------------------------------------------- Adam
@triton.jit
def adam_kernel(ptrs, numel, blk_row, blk_start, found, scal, c_m, c_g, c_v, c_g2, eps, decay, wd,
                NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
                S_DT: tl.constexpr, COUPLED: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False,
                CHECK: tl.constexpr = False):
    """Columns p, g, m, v: m = c_m m + c_g g, v = c_v v + c_g2 g^2,
    p = decay p - s1 m / (sqrt(v) s2 + eps) with (s1, s2) = scal[row]."""
    row, offs, mask = _row(blk_row, blk_start, numel, found, BLOCK, ALIGNED, CHECK)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    g, p = _grad_p(ptrs, row, offs, mask, wd, pp, NCOL, G_DT, COUPLED, ALIGNED, True)
    mp = _col(ptrs, row, 2, NCOL, S_DT, ALIGNED)
    vp = _col(ptrs, row, 3, NCOL, S_DT, ALIGNED)
    m = c_m * _ld(mp, offs, mask) + c_g * g
    v = c_v * _ld(vp, offs, mask) + c_g2 * g * g
    tl.store(mp + offs, _cast(m, S_DT), mask=mask)
    tl.store(vp + offs, _cast(v, S_DT), mask=mask)
    s1 = tl.load(scal + row * NSCAL)
    s2 = tl.load(scal + row * NSCAL + 1)
    tl.store(pp + offs, _cast(p * decay - s1 * m / (tl.sqrt(v) * s2 + eps), P_DT), mask=mask)

# ----------------------------------------------------------------------------- preconditioned momentum
@triton.jit
def precond_momentum_kernel(ptrs, numel, blk_row, blk_start, found, scal, b2, eps, a, c_g, lr, decay, wd,
                            NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
                            S_DT: tl.constexpr, NESTEROV: tl.constexpr, PERIODIC: tl.constexpr,
                            COUPLED: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False,
                            CHECK: tl.constexpr = False):
    """Columns p, g, v, buf[, acc]; scal = (first, boundary, 1/chunk, 1/sqrt(1 - b2^tl)).
    v <- b2 v + (1 - b2) g^2 (periodic: acc += g^2, written as acc/chunk at boundaries);
    x = g / (sqrt(v)/sqrt(bc2) + eps); buf = first ? x : a buf + c_g x; p = decay p - lr read(buf)."""
    row, offs, mask = _row(blk_row, blk_start, numel, found, BLOCK, ALIGNED, CHECK)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    g, p = _grad_p(ptrs, row, offs, mask, wd, pp, NCOL, G_DT, COUPLED, ALIGNED, True)
    vp = _col(ptrs, row, 2, NCOL, S_DT, ALIGNED)
    v = _ld(vp, offs, mask)
    if PERIODIC:
        ap = _col(ptrs, row, 4, NCOL, S_DT, ALIGNED)
        acc = _ld(ap, offs, mask) + g * g
        hit = tl.load(scal + row * NSCAL + 1) != 0
        v = tl.where(hit, b2 * v + (1.0 - b2) * (acc * tl.load(scal + row * NSCAL + 2)), v)
        tl.store(ap + offs, _cast(tl.where(hit, 0.0, acc), S_DT), mask=mask)
    else:
        v = b2 * v + (1.0 - b2) * g * g
    tl.store(vp + offs, _cast(v, S_DT), mask=mask)
    x = g / (tl.sqrt(v) * tl.load(scal + row * NSCAL + 3) + eps)
    bp = _col(ptrs, row, 3, NCOL, S_DT, ALIGNED)
    first = tl.load(scal + row * NSCAL)
    buf = tl.where(first != 0, x, a * _ld(bp, offs, mask) + c_g * x)
    tl.store(bp + offs, _cast(buf, S_DT), mask=mask)
    d = buf
    if NESTEROV:
        d = x + a * buf
    tl.store(pp + offs, _cast(p * decay - lr * d, P_DT), mask=mask)
