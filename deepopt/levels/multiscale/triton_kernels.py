"""Triton kernels of M3 (multi-scale momentum): the memories' write and the read-out step.

Conventions (tables, dtypes, ``COUPLED``, the non-finite flag ``found``) in
:mod:`deepopt.kernels.triton_lib`; each kernel's tensor-by-tensor reference and its math are in
:mod:`deepopt.levels.multiscale.fused`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...kernels.triton_lib import _cast, _col, _grad, _ld, _row


# ----------------------------------------------------------------------------- M3 (multi-scale momentum)
@triton.jit
def m3_write_kernel(ptrs, numel, blk_row, blk_start, found, scal, c_v, c_g2, eps, lr, decay, wd,
                    NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
                    S_DT: tl.constexpr, KF: tl.constexpr, KS: tl.constexpr, STEP: tl.constexpr,
                    COUPLED: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False,
                    CHECK: tl.constexpr = False):
    """Columns p, g, v, m (KF fast levels, then KS slow ones), acc (KS slow levels).
    scal = (den_scale, then per level: c_m, c_g, boundary, read weight).
    v = c_v v + c_g2 g^2; fast: m = c_m m + c_g g; slow: acc += g, at a boundary m = c_m m + c_g acc,
    acc = 0. STEP (element-wise parameters): p = decay p - lr (sum_i w_i m_i) / (sqrt(v) s + eps)."""
    row, offs, mask = _row(blk_row, blk_start, numel, found, BLOCK, ALIGNED, CHECK)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    g = _grad(ptrs, row, offs, mask, wd, pp, NCOL, G_DT, COUPLED, ALIGNED)
    vp = _col(ptrs, row, 2, NCOL, S_DT, ALIGNED)
    v = c_v * _ld(vp, offs, mask) + c_g2 * g * g
    tl.store(vp + offs, _cast(v, S_DT), mask=mask)
    num = tl.zeros([BLOCK], dtype=tl.float32)
    sc = scal + row * NSCAL
    for i in tl.static_range(KF):
        mp = _col(ptrs, row, 3 + i, NCOL, S_DT, ALIGNED)
        m = tl.load(sc + 1 + 4 * i) * _ld(mp, offs, mask) + tl.load(sc + 2 + 4 * i) * g
        tl.store(mp + offs, _cast(m, S_DT), mask=mask)
        num += tl.load(sc + 4 + 4 * i) * m
    for j in tl.static_range(KS):
        k = KF + j
        mp = _col(ptrs, row, 3 + k, NCOL, S_DT, ALIGNED)
        ap = _col(ptrs, row, 3 + KF + KS + j, NCOL, S_DT, ALIGNED)
        m = _ld(mp, offs, mask)
        acc = _ld(ap, offs, mask) + g
        hit = tl.load(sc + 3 + 4 * k) != 0
        m = tl.where(hit, tl.load(sc + 1 + 4 * k) * m + tl.load(sc + 2 + 4 * k) * acc, m)
        tl.store(mp + offs, _cast(m, S_DT), mask=mask)
        tl.store(ap + offs, _cast(tl.where(hit, 0.0, acc), S_DT), mask=mask)
        num += tl.load(sc + 4 + 4 * k) * m
    if STEP:
        den = tl.sqrt(v) * tl.load(sc) + eps
        tl.store(pp + offs, _cast(_ld(pp, offs, mask) * decay - lr * num / den, P_DT), mask=mask)


@triton.jit
def m3_read_kernel(ptrs, numel, blk_row, blk_start, found, scal, red, eps, lr, decay, target,
                   NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, S_DT: tl.constexpr,
                   OF_DT: tl.constexpr, OS_DT: tl.constexpr, KF: tl.constexpr, KS: tl.constexpr,
                   PASS: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False,
                   CHECK: tl.constexpr = False):
    """Columns p, v, O (KF fast read-outs of dtype OF_DT, KS held slow ones of OS_DT);
    scal = (den_scale, w_0, ..., w_{K-1}). d = (sum_i w_i O_i) / (sqrt(v) s + eps).
    PASS 0: red[row] += sum d^2; PASS 1: p = decay p - lr (target / rms(d)) d (RMS off: no
    matching, pass 1 only)."""
    row, offs, mask = _row(blk_row, blk_start, numel, found, BLOCK, ALIGNED, CHECK)
    sc = scal + row * NSCAL
    num = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(KF):
        num += tl.load(sc + 1 + i) * _ld(_col(ptrs, row, 2 + i, NCOL, OF_DT, ALIGNED), offs, mask)
    for j in tl.static_range(KS):
        num += tl.load(sc + 1 + KF + j) * _ld(_col(ptrs, row, 2 + KF + j, NCOL, OS_DT, ALIGNED), offs, mask)
    d = num / (tl.sqrt(_ld(_col(ptrs, row, 1, NCOL, S_DT, ALIGNED), offs, mask)) * tl.load(sc) + eps)
    if PASS == 0:
        tl.atomic_add(red + row, tl.sum(d * d, 0))
    else:
        if RMS:
            rms = tl.sqrt(tl.load(red + row) / tl.load(numel + row).to(tl.float32))
            d = d * (target / (rms + 1e-30))
        pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
        tl.store(pp + offs, _cast(_ld(pp, offs, mask) * decay - lr * d, P_DT), mask=mask)
