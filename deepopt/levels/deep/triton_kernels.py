"""Triton kernels of deep momentum: the gradient's scale, the memory's write and inner gradient, the read.

The memory MLP's tiles are (hidden, BLOCK), elements along the fast axis: Triton then spreads the
elements over a warp's lanes and keeps every hidden unit of an element in one thread, so the read's
sum over hidden units needs no shuffles and the 1-D gradient needs no layout conversion. (The
(BLOCK, hidden) orientation put the 8 hidden units on 8 lanes: 96 shuffles and 8 layout
conversions per thread and tile in the read, all of it compute in a kernel that is compute-bound.)

Conventions (tables, dtypes, ``COUPLED``, the non-finite flag ``found``) in
:mod:`deepopt.kernels.triton_lib`; each kernel's tensor-by-tensor reference and its math are in
:mod:`deepopt.levels.deep.fused`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...kernels.triton_lib import _cast, _col, _grad, _grad_checked, _ld, _row, _row_limit, _tanh_for, _upto
from ..adaptive.triton_kernels import _factored


# ----------------------------------------------------------------------------- deep momentum
@triton.jit
def deep_sumsq_kernel(ptrs, numel, blk_row, blk_start, found, red, wd, den, b2, eps, ncols,
                      NCOL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
                      COUPLED: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False,
                      CHECK: tl.constexpr = False, FLAG_OUT: tl.constexpr = False, PRE: tl.constexpr = False,
                      VC: tl.constexpr = 0, FACT: tl.constexpr = False, SC: tl.constexpr = 0):
    """Columns p, g: red[row] += sum u^2 (u the decayed gradient), for k = u / rms(u); with PRE, u is
    the preconditioned gradient (:func:`_preconditioned`, the second moment not stored here), with
    FACT divided by the factored second moment (written before, :func:`_factored`). FLAG_OUT
    (with CHECK off): also set the non-finite flag ``found`` to 1 where a gradient entry is NaN or
    +-Inf, so this pass, which reads every gradient anyway, is the step's check (the kernels after it
    read the flag)."""
    row, offs, mask = _row(blk_row, blk_start, numel, found, BLOCK, ALIGNED, CHECK)
    u = _grad_checked(ptrs, row, offs, mask, wd, _col(ptrs, row, 0, NCOL, P_DT, ALIGNED), found, NCOL, G_DT,
                      COUPLED, ALIGNED, FLAG_OUT)
    if PRE:
        u = _preconditioned(ptrs, row, offs, mask, u, den, b2, eps, NCOL, S_DT, VC, ALIGNED, True, False)
    if FACT:
        u = _factored(ptrs, row, offs, tl.load(blk_start + tl.program_id(0)), mask, u, eps, ncols, NCOL, SC, ALIGNED,
                      BLOCK)
    tl.atomic_add(red + row, tl.sum(u * u, 0))


@triton.jit
def _preconditioned(ptrs, row, offs, mask, g, den, b2, eps, NCOL: tl.constexpr, S_DT: tl.constexpr,
                    VC: tl.constexpr, ALIGNED: tl.constexpr, WRITE: tl.constexpr, STORE: tl.constexpr):
    """``g / (sqrt(v) den[row] + eps)`` with v column VC: WRITE first (``v = b2 v + (1 - b2) g^2``,
    rounded to the state's dtype as stored; STORE: stored), else v as held (written this step)."""
    vp = _col(ptrs, row, VC, NCOL, S_DT, ALIGNED)
    if WRITE:
        v = _cast(b2 * _ld(vp, offs, mask) + (1.0 - b2) * g * g, S_DT)
        if STORE:
            tl.store(vp + offs, v, mask=mask)
        v = v.to(tl.float32)
    else:
        v = _ld(vp, offs, mask)
    return tl.where(mask, g / (tl.sqrt(v) * tl.load(den + row) + eps), 0.0)


@triton.jit
def _features(ptrs, row, offs, start, mask, wd, red, numel, den, b2, eps, ncols, BLOCK: tl.constexpr,
              NCOL: tl.constexpr,
              P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr, COUPLED: tl.constexpr, H: tl.constexpr,
              HP: tl.constexpr, WC: tl.constexpr, ALIGNED: tl.constexpr, PRE: tl.constexpr, VC: tl.constexpr,
              FACT: tl.constexpr, NORM: tl.constexpr):
    """u (PRE / FACT: preconditioned by the second moment written this step), k = u/rms(u) (NORM) or
    u, and the memory MLP's (w1, b1, w2) of this row (columns WC, WC+1, WC+2; FACT: the read's factors
    at WC+3, WC+4)."""
    u = _grad(ptrs, row, offs, mask, wd, _col(ptrs, row, 0, NCOL, P_DT, ALIGNED), NCOL, G_DT, COUPLED, ALIGNED)
    if PRE:
        u = _preconditioned(ptrs, row, offs, mask, u, den, b2, eps, NCOL, S_DT, VC, ALIGNED, False, False)
    if FACT:
        u = _factored(ptrs, row, offs, start, mask, u, eps, ncols, NCOL, WC + 3, ALIGNED, BLOCK)
    k = u
    if NORM:
        k = u / (tl.sqrt(tl.load(red + row) / tl.load(numel + row).to(tl.float32)) + 1e-30)
    j = tl.arange(0, HP)
    jm = j < H
    w1 = tl.load(_col(ptrs, row, WC, NCOL, S_DT, ALIGNED) + j, mask=jm, other=0.0).to(tl.float32)
    b1 = tl.load(_col(ptrs, row, WC + 1, NCOL, S_DT, ALIGNED) + j, mask=jm, other=0.0).to(tl.float32)
    w2 = tl.load(_col(ptrs, row, WC + 2, NCOL, S_DT, ALIGNED) + j, mask=jm, other=0.0).to(tl.float32)
    return u, k, j, jm, w1, b1, w2


@triton.jit
def deep_inner_kernel(ptrs, numel, blk_row, blk_start, found, red, sums, a, wd, den, b2, eps, ncols,
                      NCOL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
                      COUPLED: tl.constexpr, LEARN: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                      WC: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr, ALIGNED: tl.constexpr = False,
                      CHECK: tl.constexpr = False, PRE: tl.constexpr = False, VC: tl.constexpr = 0,
                      FACT: tl.constexpr = False, NORM: tl.constexpr = True):
    """Columns p, g, bias, then w1, b1, w2 at WC: bias = a bias + u, and (LEARN) the inner gradient's sums
    sums[row] += (sum u h_j, sum u (1 - h_j^2), sum u (1 - h_j^2) k), h_j = tanh(w1_j k + b1_j). With
    PRE (second moment in column VC, written and stored here), u is the preconditioned gradient; with
    FACT divided by the factored second moment (its read's factors at WC+3, WC+4, written before);
    NORM off: k = u.

    The block is walked in slices of SUB elements whose (HP, SUB) products add up in registers; the
    sums over elements cross the lanes once per block (a block of BLOCK = 8 SUB pays one reduction
    for eight slices)."""
    row, offs0, n = _row_limit(blk_row, blk_start, numel, found, SUB, ALIGNED, CHECK)
    start = tl.load(blk_start + tl.program_id(0))
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    bp = _col(ptrs, row, 2, NCOL, S_DT, ALIGNED)
    rms = 1.0
    if NORM:
        rms = tl.sqrt(tl.load(red + row) / tl.load(numel + row).to(tl.float32)) + 1e-30
    j = tl.arange(0, HP)
    jm = j < H
    w1 = tl.load(_col(ptrs, row, WC, NCOL, S_DT, ALIGNED) + j, mask=jm, other=0.0).to(tl.float32)
    b1 = tl.load(_col(ptrs, row, WC + 1, NCOL, S_DT, ALIGNED) + j, mask=jm, other=0.0).to(tl.float32)
    acc_h = tl.zeros([HP, SUB], dtype=tl.float32)
    acc_d = tl.zeros([HP, SUB], dtype=tl.float32)
    acc_dk = tl.zeros([HP, SUB], dtype=tl.float32)
    for c in range(0, BLOCK, SUB):
        offs = offs0 + c
        mask = offs < n
        u = _grad(ptrs, row, offs, mask, wd, pp, NCOL, G_DT, COUPLED, ALIGNED)
        if PRE:
            u = _preconditioned(ptrs, row, offs, mask, u, den, b2, eps, NCOL, S_DT, VC, ALIGNED, True, True)
        if FACT:
            u = _factored(ptrs, row, offs, start, mask, u, eps, ncols, NCOL, WC + 3, ALIGNED, BLOCK)
        tl.store(bp + offs, _cast(a * _ld(bp, offs, mask) + u, S_DT), mask=mask)
        if LEARN:
            k = u
            if NORM:
                k = u / rms
            h = _tanh_for(w1[:, None] * k[None, :] + b1[:, None], S_DT)
            uu = tl.where(mask, u, 0.0)[None, :]
            acc_h += uu * h
            dh = uu * (1.0 - h * h)
            acc_d += dh
            acc_dk += dh * k[None, :]
    if LEARN:
        s = sums + row * 3 * HP + j
        tl.atomic_add(s, tl.sum(acc_h, 1), mask=jm)
        tl.atomic_add(s + HP, tl.sum(acc_d, 1), mask=jm)
        tl.atomic_add(s + 2 * HP, tl.sum(acc_dk, 1), mask=jm)


@triton.jit
def deep_phi_kernel(ptrs, numel, found, sums, a, eta, NCOL: tl.constexpr, S_DT: tl.constexpr, H: tl.constexpr,
                    HP: tl.constexpr, WC: tl.constexpr, ALIGNED: tl.constexpr = False,
                    CHECK: tl.constexpr = False):
    """One program per row: w2 = a w2 + eta S_w2/n, w1 += eta w2_old S_w1/n, b1 += eta w2_old S_b1/n."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, HP)
    jm = j < _upto(H, found, CHECK)
    n = tl.load(numel + row).to(tl.float32)
    p1 = _col(ptrs, row, WC, NCOL, S_DT, ALIGNED)
    pb = _col(ptrs, row, WC + 1, NCOL, S_DT, ALIGNED)
    p2 = _col(ptrs, row, WC + 2, NCOL, S_DT, ALIGNED)
    w1 = tl.load(p1 + j, mask=jm, other=0.0).to(tl.float32)
    b1 = tl.load(pb + j, mask=jm, other=0.0).to(tl.float32)
    w2 = tl.load(p2 + j, mask=jm, other=0.0).to(tl.float32)
    s = sums + row * 3 * HP + j
    s_h = tl.load(s, mask=jm, other=0.0)
    s_b = tl.load(s + HP, mask=jm, other=0.0)
    s_w = tl.load(s + 2 * HP, mask=jm, other=0.0)
    tl.store(p2 + j, _cast(a * w2 + eta * s_h / n, S_DT), mask=jm)
    tl.store(p1 + j, _cast(w1 + eta * w2 * s_w / n, S_DT), mask=jm)
    tl.store(pb + j, _cast(b1 + eta * w2 * s_b / n, S_DT), mask=jm)


@triton.jit
def deep_read_kernel(ptrs, numel, blk_row, blk_start, found, red, sq, lr, decay, wd, den, b2, eps, ncols,
                     NCOL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
                     O_DT: tl.constexpr, COUPLED: tl.constexpr, SIGN: tl.constexpr, TO_OUT: tl.constexpr,
                     H: tl.constexpr, HP: tl.constexpr, WC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False,
                     CHECK: tl.constexpr = False, SUMSQ: tl.constexpr = False, PRE: tl.constexpr = False,
                     VC: tl.constexpr = 0, FACT: tl.constexpr = False, NORM: tl.constexpr = True):
    """Columns p, g, bias[, out], then w1, b1, w2 at WC: read m(u) = bias + sum_j w2_j tanh(w1_j k + b1_j)
    (new memory), sigma = sign or identity; p = decay p - lr sigma(m), or (TO_OUT) out = m, and with
    SUMSQ sq[row] += sum m^2 (the "rms" read-out's scale)."""
    row, offs, mask = _row(blk_row, blk_start, numel, found, BLOCK, ALIGNED, CHECK)
    start = tl.load(blk_start + tl.program_id(0))
    u, k, j, jm, w1, b1, w2 = _features(ptrs, row, offs, start, mask, wd, red, numel, den, b2, eps, ncols, BLOCK,
                                        NCOL, P_DT, G_DT, S_DT, COUPLED, H, HP, WC, ALIGNED, PRE, VC, FACT, NORM)
    h = _tanh_for(w1[:, None] * k[None, :] + b1[:, None], S_DT)  # (HP, BLOCK): the hidden units' sum stays in a thread
    d = _ld(_col(ptrs, row, 2, NCOL, S_DT, ALIGNED), offs, mask) + tl.sum(h * w2[:, None], 0)
    if SIGN:
        d = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    if TO_OUT:
        tl.store(_col(ptrs, row, 3, NCOL, O_DT, ALIGNED) + offs, _cast(d, O_DT), mask=mask)
        if SUMSQ:
            tl.atomic_add(sq + row, tl.sum(tl.where(mask, d * d, 0.0), 0))
    else:
        pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
        tl.store(pp + offs, _cast(_ld(pp, offs, mask) * decay - lr * d, P_DT), mask=mask)
