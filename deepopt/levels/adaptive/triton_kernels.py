"""Triton kernels of the adaptive family: Adam's moments (both forms), preconditioned momentum, and
the factored second moment (its statistics and the helper that divides by it).

Conventions (tables, dtypes, ``COUPLED``, the non-finite flag ``found``) in
:mod:`deepopt.kernels.triton_lib`; each kernel's tensor-by-tensor reference and its math are in
:mod:`deepopt.levels.adaptive.fused`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...kernels.triton_lib import _cast, _col, _grad_p, _ld, _row, _upto


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


# ----------------------------------------------------------------------------- factored second moment
@triton.jit
def factored_sums_kernel(ptrs, numel, blk_row, blk_start, found, ncols, wd,
                         NCOL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, COUPLED: tl.constexpr,
                         RC: tl.constexpr, TR: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                         BLOCK: tl.constexpr = 0, ALIGNED: tl.constexpr = False, CHECK: tl.constexpr = False,
                         FLAG_OUT: tl.constexpr = False):
    """Columns p, g; float32 scratch rows at column RC (one per matrix row) and RC + 1 (one per
    column), zero before: add the row and column sums of ``u^2`` (u the decayed gradient), the row
    seen as a (numel / ncols[row], ncols[row]) matrix. Program = one tile (TR rows x BC columns,
    :meth:`~deepopt.kernels.tables.RowSet.tile_tables`), walked in chunks of BR rows: one atomic per
    row of a chunk (a reduction across lanes), the chunks' squares summed in registers and over the
    tile's rows once at its end (across warps), one atomic per column. FLAG_OUT (CHECK off): set
    ``found`` where a gradient entry is NaN or +-Inf (this pass reads every gradient first; the
    entries' verdicts gather in registers, one reduction per tile). ALIGNED: 16-byte aligned rows
    whose column counts are multiples of 16, so that a chunk's rows load as vectors."""
    pid = tl.program_id(0)
    row = tl.load(blk_row + pid).to(tl.int64)
    tile = tl.load(blk_start + pid)
    nc = tl.load(ncols + row).to(tl.int64)
    if ALIGNED:
        nc = tl.multiple_of(nc, 16)
    nr = _upto(tl.load(numel + row), found, CHECK) // nc
    ntc = tl.cdiv(nc, BC)
    ti = tile // ntc
    jj = (tile - ti * ntc) * BC + tl.arange(0, BC)
    jm = jj < nc
    i_end = tl.minimum(ti * TR + TR, nr)
    gp = _col(ptrs, row, 1, NCOL, G_DT, ALIGNED)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    rp = _col(ptrs, row, RC, NCOL, tl.float32, ALIGNED)
    cp = _col(ptrs, row, RC + 1, NCOL, tl.float32, ALIGNED)
    acc = tl.zeros([BR, BC], dtype=tl.float32)
    bad = tl.zeros([BR, BC], dtype=tl.int32)
    for i0 in range(ti * TR, i_end, BR):
        ii = i0 + tl.arange(0, BR)
        im = ii < i_end
        offs = ii[:, None] * nc + jj[None, :]
        mask = im[:, None] & jm[None, :]
        g = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32)
        if FLAG_OUT:
            bad |= ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)
        if COUPLED:
            g += wd * tl.load(pp + offs, mask=mask, other=0.0).to(tl.float32)
        u2 = g * g
        tl.atomic_add(rp + ii, tl.sum(u2, 1), mask=im)
        acc += u2
    tl.atomic_add(cp + jj, tl.sum(acc, 0), mask=jm)
    if FLAG_OUT:
        if tl.max(tl.max(bad, 1), 0) > 0:
            tl.store(found, 1.0)


@triton.jit
def factored_moment_kernel(ptrs, numel, found, ncols, den, b2, eps1, NCOL: tl.constexpr, F_DT: tl.constexpr,
                           FC: tl.constexpr, RC: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr = False,
                           CHECK: tl.constexpr = False):
    """One program per row: the statistics r (column FC) and c (FC + 1) from the sums at RC, RC + 1,
    ``r = b2 r + (1 - b2) (sum_j u_ij^2 / cols + eps1)``, c likewise over rows, both stored in F_DT;
    then the sums' scratch is overwritten with the read's factors ``sqrt(r_i)`` and ``sqrt(c_j /
    mean(r)) den[row]`` (so the kernels after it divide by one product per element)."""
    row = tl.program_id(0).to(tl.int64)
    nc = tl.load(ncols + row).to(tl.int64)
    nr = _upto(tl.load(numel + row), found, CHECK) // nc
    nc = tl.where(nr > 0, nc, 0)
    fr = nr.to(tl.float32)
    fc = nc.to(tl.float32)
    rp = _col(ptrs, row, FC, NCOL, F_DT, ALIGNED)
    cp = _col(ptrs, row, FC + 1, NCOL, F_DT, ALIGNED)
    rs = _col(ptrs, row, RC, NCOL, tl.float32, ALIGNED)
    cs = _col(ptrs, row, RC + 1, NCOL, tl.float32, ALIGNED)
    total = tl.zeros([CHUNK], dtype=tl.float32)
    for k in range(0, nr, CHUNK):
        o = k + tl.arange(0, CHUNK)
        m = o < nr
        r = _cast(b2 * _ld(rp, o, m) + (1.0 - b2) * (_ld(rs, o, m) / fc + eps1), F_DT)
        tl.store(rp + o, r, mask=m)
        r = r.to(tl.float32)
        tl.store(rs + o, tl.sqrt(r), mask=m)
        total += tl.where(m, r, 0.0)
    scale = tl.load(den + row) / tl.sqrt(tl.sum(total, 0) / fr)
    for k in range(0, nc, CHUNK):
        o = k + tl.arange(0, CHUNK)
        m = o < nc
        c = _cast(b2 * _ld(cp, o, m) + (1.0 - b2) * (_ld(cs, o, m) / fr + eps1), F_DT)
        tl.store(cp + o, c, mask=m)
        tl.store(cs + o, tl.sqrt(c.to(tl.float32)) * scale, mask=m)


@triton.jit
def _factored(ptrs, row, offs, start, mask, g, eps, ncols, NCOL: tl.constexpr, SC: tl.constexpr,
              ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """``g / (a_i b_j + eps)`` for the elements ``offs`` (at most BLOCK of them from ``start``) of a
    row seen as a matrix with ``ncols[row]`` columns (rows of fewer than 2^31 elements): ``a =
    sqrt(r)`` at column SC and ``b = sqrt(c / mean r) / sqrt(1 - b2^t)`` at SC + 1 (float32, written
    this step by :func:`factored_moment_kernel`). The element's matrix row and column come from one
    32-bit division for ``start`` and, per element, one comparison (rows of at least BLOCK columns:
    a block wraps at most once) or a float32 quotient corrected by one (``x / cols`` is below ``1 +
    BLOCK / cols``, so the float estimate is off by less than one): no integer division per element."""
    nc = tl.load(ncols + row).to(tl.int32)
    s32 = start.to(tl.int32)
    i0 = s32 // nc
    x = (offs - start).to(tl.int32) + (s32 - i0 * nc)  # the offset from row i0's start: below cols + BLOCK
    if nc >= BLOCK:
        q = (x >= nc).to(tl.int32)
    else:
        q = (x.to(tl.float32) * (1.0 / nc.to(tl.float32))).to(tl.int32)
        r = x - q * nc
        q = tl.where(r < 0, q - 1, tl.where(r >= nc, q + 1, q))
    a = tl.load(_col(ptrs, row, SC, NCOL, tl.float32, ALIGNED) + (i0 + q), mask=mask, other=1.0)
    b = tl.load(_col(ptrs, row, SC + 1, NCOL, tl.float32, ALIGNED) + (x - q * nc), mask=mask, other=1.0)
    return tl.where(mask, g / (a * b + eps), 0.0)
