"""Triton kernels of the momentum family: momentum (MomentumMemory, Muon's momentum) and delta momentum.

Conventions (tables, dtypes, ``COUPLED``, the non-finite flag ``found``) in
:mod:`deepopt.kernels.triton_lib`; each kernel's tensor-by-tensor reference and its math are in
:mod:`deepopt.levels.momentum.fused`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...kernels.triton_lib import _cast, _col, _grad_checked, _grad_p, _ld, _row


# ----------------------------------------------------------------------------- momentum
@triton.jit
def momentum_kernel(ptrs, numel, blk_row, blk_start, found, scal, a, c_g, lr, decay, wd,
                    NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
                    S_DT: tl.constexpr, O_DT: tl.constexpr, EMA: tl.constexpr, NESTEROV: tl.constexpr,
                    COUPLED: tl.constexpr, TO_OUT: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False,
                    CHECK: tl.constexpr = False):
    """Columns p, g, buf[, out]. sgd: buf = first ? g : a buf + c_g g; ema: buf = lerp(buf, g, c_g).
    Read d = buf or its Nesterov look-ahead; then p = decay p - lr d, or (TO_OUT) out = d."""
    row, offs, mask = _row(blk_row, blk_start, numel, found, BLOCK, ALIGNED, CHECK)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    g, p = _grad_p(ptrs, row, offs, mask, wd, pp, NCOL, G_DT, COUPLED, ALIGNED, not TO_OUT)
    bp = _col(ptrs, row, 2, NCOL, S_DT, ALIGNED)
    buf = _ld(bp, offs, mask)
    if EMA:
        new = buf + c_g * (g - buf)
        d = new
        if NESTEROV:
            d = g + a * (new - g)
    else:
        first = tl.load(scal + row * NSCAL)
        new = tl.where(first != 0, g, a * buf + c_g * g)
        d = new
        if NESTEROV:
            d = g + a * new
    tl.store(bp + offs, _cast(new, S_DT), mask=mask)
    if TO_OUT:
        tl.store(_col(ptrs, row, 3, NCOL, O_DT, ALIGNED) + offs, _cast(d, O_DT), mask=mask)
    else:
        tl.store(pp + offs, _cast(p * decay - lr * d, P_DT), mask=mask)

# ----------------------------------------------------------------------------- delta momentum
@triton.jit
def delta_reduce_kernel(ptrs, numel, blk_row, blk_start, found, scal, red, wd,
                        NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
                        S_DT: tl.constexpr, LO_DT: tl.constexpr, COUPLED: tl.constexpr, LO: tl.constexpr,
                        BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False, CHECK: tl.constexpr = False,
                        FLAG_OUT: tl.constexpr = False):
    """Columns p, g, buf[, buf_lo, g_lo]: red[row] += (<buf, g>, ||g||^2) (float32 atomics). With LO,
    rows whose flag (scal's last column) is set also store buf and g (the decayed gradient with COUPLED) in LO_DT
    into columns 3 and 4: the forget term's matmul inputs, written by the pass that reads them anyway.
    FLAG_OUT (with CHECK off): also set the non-finite flag ``found`` where a gradient entry is NaN or
    +-Inf: this pass, which reads every gradient and stores only scratch, is the step's check."""
    row, offs, mask = _row(blk_row, blk_start, numel, found, BLOCK, ALIGNED, CHECK)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    g = _grad_checked(ptrs, row, offs, mask, wd, pp, found, NCOL, G_DT, COUPLED, ALIGNED, FLAG_OUT)
    buf = _ld(_col(ptrs, row, 2, NCOL, S_DT, ALIGNED), offs, mask)
    tl.atomic_add(red + row * 2, tl.sum(buf * g, 0))
    tl.atomic_add(red + row * 2 + 1, tl.sum(g * g, 0))
    if LO:
        lo = mask & ((offs * 0 + tl.load(scal + row * NSCAL + NSCAL - 1)) != 0)  # (a tensor condition: the interpreter's `&`)
        tl.store(_col(ptrs, row, 3, NCOL, LO_DT, ALIGNED) + offs, _cast(buf, LO_DT), mask=lo)
        tl.store(_col(ptrs, row, 4, NCOL, LO_DT, ALIGNED) + offs, _cast(g, LO_DT), mask=lo)


@triton.jit
def delta_update_kernel(ptrs, numel, blk_row, blk_start, found, scal, red, a, lam, lr, decay, wd,
                        NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
                        S_DT: tl.constexpr, F_DT: tl.constexpr, NESTEROV: tl.constexpr,
                        COUPLED: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False,
                        CHECK: tl.constexpr = False):
    """Columns p, g, buf, f; scal = (first, is_vector); red = (<buf, g>, ||g||^2).
    buf = first ? g : a buf - lam c f + g with c f = <buf,g> g/||g||^2 (vectors; f unused) or
    f/||g||^2 (matrices: f = buf G^T G computed by a matmul); p = decay p - lr read(buf)."""
    row, offs, mask = _row(blk_row, blk_start, numel, found, BLOCK, ALIGNED, CHECK)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    g, p = _grad_p(ptrs, row, offs, mask, wd, pp, NCOL, G_DT, COUPLED, ALIGNED, True)
    bp = _col(ptrs, row, 2, NCOL, S_DT, ALIGNED)
    buf = _ld(bp, offs, mask)
    first = tl.load(scal + row * NSCAL)
    vec = tl.load(scal + row * NSCAL + 1)
    dot = tl.load(red + row * 2)
    sq = tl.load(red + row * 2 + 1)
    f = _ld(_col(ptrs, row, 3, NCOL, F_DT, ALIGNED), offs, mask)  # vectors: a same-sized dummy (their buffer)
    f = tl.where(vec != 0, g, f)
    num = tl.where(vec != 0, dot, 1.0)
    coef = tl.where(sq > 0, lam * num / tl.where(sq > 0, sq, 1.0), 0.0)
    new = tl.where(first != 0, g, a * buf - coef * f + g)
    tl.store(bp + offs, _cast(new, S_DT), mask=mask)
    d = new
    if NESTEROV:
        d = g + a * new
    tl.store(pp + offs, _cast(p * decay - lr * d, P_DT), mask=mask)
