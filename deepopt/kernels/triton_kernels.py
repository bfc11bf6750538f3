"""Triton kernels of the element-wise optimizer steps (one launch per parameter list).

Every kernel follows :mod:`deepopt.kernels.tables`: program ``b`` handles ``BLOCK`` elements of
row ``blk_row[b]``, whose tensors it finds in ``ptrs[row, col]``; math is float32 whatever the
storage dtypes (``P_DT`` parameter, ``G_DT`` gradient, ``S_DT`` state). Per-row scalars come from
``scal[row, k]``; hyperparameters shared by the list are plain arguments. ``COUPLED`` adds
``wd * p`` to the gradient in registers (SGD-style decay); ``decay`` is ``1 - lr wd`` for
decoupled decay (AdamW-style) and 1 otherwise. The pure-torch twin of each kernel, and the
formulas, are in :mod:`deepopt.kernels.reference`.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------- helpers


@triton.jit
def _row(blk_row, blk_start, numel, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's row, element offsets and mask. ALIGNED (every address 16-byte aligned and
    every numel a multiple of 16, checked on the host) lets the compiler vectorize masked loads."""
    pid = tl.program_id(0)
    row = tl.load(blk_row + pid).to(tl.int64)
    start = tl.load(blk_start + pid)
    n = tl.load(numel + row)
    if ALIGNED:
        start = tl.multiple_of(start, 16)
        n = tl.multiple_of(n, 16)
    offs = start + tl.arange(0, BLOCK)
    return row, offs, offs < n


@triton.jit
def _col(ptrs, row, c: tl.constexpr, NCOL: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Column c of the row: ``ptrs`` holds byte offsets from the table's own address, so the
    pointer arithmetic starts from an argument the compiler knows is 16-byte aligned."""
    off = tl.load(ptrs + row * NCOL + c)
    if ALIGNED:
        off = tl.multiple_of(off, 16)
    return (ptrs.to(tl.pointer_type(tl.int8)) + off).to(tl.pointer_type(DT))


@triton.jit
def _ld(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _grad(ptrs, row, offs, mask, wd, pp, NCOL: tl.constexpr, G_DT: tl.constexpr, COUPLED: tl.constexpr,
          ALIGNED: tl.constexpr):
    """Column 1 is the gradient; with COUPLED the decayed gradient ``g + wd p`` (``pp`` = p's pointer)."""
    g = _ld(_col(ptrs, row, 1, NCOL, G_DT, ALIGNED), offs, mask)
    if COUPLED:
        g += wd * _ld(pp, offs, mask)
    return g


@triton.jit
def _cast(x, DT: tl.constexpr):
    """float32 -> DT rounding to nearest even (explicit for bf16: Triton's CPU interpreter truncates)."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(DT)
    return x.to(DT)


@triton.jit
def _tanh(x):
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


# ----------------------------------------------------------------------------- momentum


@triton.jit
def momentum_kernel(ptrs, numel, blk_row, blk_start, scal, a, c_g, lr, decay, wd,
                    NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
                    S_DT: tl.constexpr, O_DT: tl.constexpr, EMA: tl.constexpr, NESTEROV: tl.constexpr,
                    COUPLED: tl.constexpr, TO_OUT: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Columns p, g, buf[, out]. sgd: buf = first ? g : a buf + c_g g; ema: buf = lerp(buf, g, c_g).
    Read d = buf or its Nesterov look-ahead; then p = decay p - lr d, or (TO_OUT) out = d."""
    row, offs, mask = _row(blk_row, blk_start, numel, BLOCK, ALIGNED)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    g = _grad(ptrs, row, offs, mask, wd, pp, NCOL, G_DT, COUPLED, ALIGNED)
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
        p = _ld(pp, offs, mask)
        tl.store(pp + offs, _cast(p * decay - lr * d, P_DT), mask=mask)


@triton.jit
def apply_kernel(ptrs, numel, blk_row, blk_start, scal, decay,
                 NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, O_DT: tl.constexpr,
                 BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Columns p, o: p = decay p - alpha[row] o (the step after an orthogonalized read-out)."""
    row, offs, mask = _row(blk_row, blk_start, numel, BLOCK, ALIGNED)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    o = _ld(_col(ptrs, row, 1, NCOL, O_DT, ALIGNED), offs, mask)
    alpha = tl.load(scal + row * NSCAL)
    tl.store(pp + offs, _cast(_ld(pp, offs, mask) * decay - alpha * o, P_DT), mask=mask)


# ----------------------------------------------------------------------------- Adam


@triton.jit
def adam_kernel(ptrs, numel, blk_row, blk_start, scal, c_m, c_g, c_v, c_g2, eps, decay, wd,
                NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
                S_DT: tl.constexpr, COUPLED: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Columns p, g, m, v: m = c_m m + c_g g, v = c_v v + c_g2 g^2,
    p = decay p - s1 m / (sqrt(v) s2 + eps) with (s1, s2) = scal[row]."""
    row, offs, mask = _row(blk_row, blk_start, numel, BLOCK, ALIGNED)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    g = _grad(ptrs, row, offs, mask, wd, pp, NCOL, G_DT, COUPLED, ALIGNED)
    mp = _col(ptrs, row, 2, NCOL, S_DT, ALIGNED)
    vp = _col(ptrs, row, 3, NCOL, S_DT, ALIGNED)
    m = c_m * _ld(mp, offs, mask) + c_g * g
    v = c_v * _ld(vp, offs, mask) + c_g2 * g * g
    tl.store(mp + offs, _cast(m, S_DT), mask=mask)
    tl.store(vp + offs, _cast(v, S_DT), mask=mask)
    s1 = tl.load(scal + row * NSCAL)
    s2 = tl.load(scal + row * NSCAL + 1)
    p = _ld(pp, offs, mask)
    tl.store(pp + offs, _cast(p * decay - s1 * m / (tl.sqrt(v) * s2 + eps), P_DT), mask=mask)


# ----------------------------------------------------------------------------- preconditioned momentum


@triton.jit
def precond_momentum_kernel(ptrs, numel, blk_row, blk_start, scal, b2, eps, a, c_g, lr, decay, wd,
                            NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
                            S_DT: tl.constexpr, NESTEROV: tl.constexpr, PERIODIC: tl.constexpr,
                            COUPLED: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Columns p, g, v, buf[, acc]; scal = (first, boundary, 1/chunk, 1/sqrt(1 - b2^tl)).
    v <- b2 v + (1 - b2) g^2 (periodic: acc += g^2, written as acc/chunk at boundaries);
    x = g / (sqrt(v)/sqrt(bc2) + eps); buf = first ? x : a buf + c_g x; p = decay p - lr read(buf)."""
    row, offs, mask = _row(blk_row, blk_start, numel, BLOCK, ALIGNED)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    g = _grad(ptrs, row, offs, mask, wd, pp, NCOL, G_DT, COUPLED, ALIGNED)
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
    tl.store(pp + offs, _cast(_ld(pp, offs, mask) * decay - lr * d, P_DT), mask=mask)


# ----------------------------------------------------------------------------- delta momentum


@triton.jit
def delta_reduce_kernel(ptrs, numel, blk_row, blk_start, red, wd,
                        NCOL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
                        COUPLED: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Columns p, g, buf: red[row] += (<buf, g>, ||g||^2) (float32 atomics)."""
    row, offs, mask = _row(blk_row, blk_start, numel, BLOCK, ALIGNED)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    g = _grad(ptrs, row, offs, mask, wd, pp, NCOL, G_DT, COUPLED, ALIGNED)
    buf = _ld(_col(ptrs, row, 2, NCOL, S_DT, ALIGNED), offs, mask)
    tl.atomic_add(red + row * 2, tl.sum(buf * g, 0))
    tl.atomic_add(red + row * 2 + 1, tl.sum(g * g, 0))


@triton.jit
def delta_update_kernel(ptrs, numel, blk_row, blk_start, scal, red, a, lam, lr, decay, wd,
                        NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
                        S_DT: tl.constexpr, F_DT: tl.constexpr, NESTEROV: tl.constexpr,
                        COUPLED: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Columns p, g, buf, f; scal = (first, is_vector); red = (<buf, g>, ||g||^2).
    buf = first ? g : a buf - lam c f + g with c f = <buf,g> g/||g||^2 (vectors; f unused) or
    f/||g||^2 (matrices: f = buf G^T G computed by a matmul); p = decay p - lr read(buf)."""
    row, offs, mask = _row(blk_row, blk_start, numel, BLOCK, ALIGNED)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    g = _grad(ptrs, row, offs, mask, wd, pp, NCOL, G_DT, COUPLED, ALIGNED)
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
    tl.store(pp + offs, _cast(_ld(pp, offs, mask) * decay - lr * d, P_DT), mask=mask)


# ----------------------------------------------------------------------------- M3 (multi-scale momentum)


@triton.jit
def m3_write_kernel(ptrs, numel, blk_row, blk_start, scal, c_v, c_g2, eps, lr, decay, wd,
                    NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
                    S_DT: tl.constexpr, KF: tl.constexpr, KS: tl.constexpr, STEP: tl.constexpr,
                    COUPLED: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Columns p, g, v, m (KF fast levels, then KS slow ones), acc (KS slow levels).
    scal = (den_scale, then per level: c_m, c_g, boundary, read weight).
    v = c_v v + c_g2 g^2; fast: m = c_m m + c_g g; slow: acc += g, at a boundary m = c_m m + c_g acc,
    acc = 0. STEP (element-wise parameters): p = decay p - lr (sum_i w_i m_i) / (sqrt(v) s + eps)."""
    row, offs, mask = _row(blk_row, blk_start, numel, BLOCK, ALIGNED)
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
def m3_read_kernel(ptrs, numel, blk_row, blk_start, scal, red, eps, lr, decay, target,
                   NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, S_DT: tl.constexpr,
                   OF_DT: tl.constexpr, OS_DT: tl.constexpr, KF: tl.constexpr, KS: tl.constexpr,
                   PASS: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Columns p, v, O (KF fast read-outs of dtype OF_DT, KS held slow ones of OS_DT);
    scal = (den_scale, w_0, ..., w_{K-1}). d = (sum_i w_i O_i) / (sqrt(v) s + eps).
    PASS 0: red[row] += sum d^2; PASS 1: p = decay p - lr (target / rms(d)) d (RMS off: no
    matching, pass 1 only)."""
    row, offs, mask = _row(blk_row, blk_start, numel, BLOCK, ALIGNED)
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


# ----------------------------------------------------------------------------- deep momentum


@triton.jit
def deep_sumsq_kernel(ptrs, numel, blk_row, blk_start, red, wd,
                      NCOL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, COUPLED: tl.constexpr,
                      BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Columns p, g: red[row] += sum u^2 (u the decayed gradient), for k = u / rms(u)."""
    row, offs, mask = _row(blk_row, blk_start, numel, BLOCK, ALIGNED)
    u = _grad(ptrs, row, offs, mask, wd, _col(ptrs, row, 0, NCOL, P_DT, ALIGNED), NCOL, G_DT, COUPLED, ALIGNED)
    tl.atomic_add(red + row, tl.sum(u * u, 0))


@triton.jit
def _features(ptrs, row, offs, mask, wd, red, numel, NCOL: tl.constexpr, P_DT: tl.constexpr,
              G_DT: tl.constexpr, S_DT: tl.constexpr, COUPLED: tl.constexpr, H: tl.constexpr,
              HP: tl.constexpr, WC: tl.constexpr, ALIGNED: tl.constexpr):
    """u, k = u/rms(u), and the memory MLP's (w1, b1, w2) of this row (columns WC, WC+1, WC+2)."""
    u = _grad(ptrs, row, offs, mask, wd, _col(ptrs, row, 0, NCOL, P_DT, ALIGNED), NCOL, G_DT, COUPLED, ALIGNED)
    rms = tl.sqrt(tl.load(red + row) / tl.load(numel + row).to(tl.float32))
    k = u / (rms + 1e-30)
    j = tl.arange(0, HP)
    jm = j < H
    w1 = tl.load(_col(ptrs, row, WC, NCOL, S_DT, ALIGNED) + j, mask=jm, other=0.0).to(tl.float32)
    b1 = tl.load(_col(ptrs, row, WC + 1, NCOL, S_DT, ALIGNED) + j, mask=jm, other=0.0).to(tl.float32)
    w2 = tl.load(_col(ptrs, row, WC + 2, NCOL, S_DT, ALIGNED) + j, mask=jm, other=0.0).to(tl.float32)
    return u, k, j, jm, w1, b1, w2


@triton.jit
def deep_inner_kernel(ptrs, numel, blk_row, blk_start, red, sums, a, wd,
                      NCOL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
                      COUPLED: tl.constexpr, LEARN: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                      WC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Columns p, g, bias, then w1, b1, w2 at WC: bias = a bias + u, and (LEARN) the inner gradient's sums
    sums[row] += (sum u h_j, sum u (1 - h_j^2), sum u (1 - h_j^2) k), h_j = tanh(w1_j k + b1_j)."""
    row, offs, mask = _row(blk_row, blk_start, numel, BLOCK, ALIGNED)
    u, k, j, jm, w1, b1, w2 = _features(ptrs, row, offs, mask, wd, red, numel, NCOL, P_DT, G_DT, S_DT,
                                        COUPLED, H, HP, WC, ALIGNED)
    bp = _col(ptrs, row, 2, NCOL, S_DT, ALIGNED)
    tl.store(bp + offs, _cast(a * _ld(bp, offs, mask) + u, S_DT), mask=mask)
    if LEARN:
        h = _tanh(k[:, None] * w1[None, :] + b1[None, :])
        uu = tl.where(mask, u, 0.0)[:, None]
        s = sums + row * 3 * HP + j
        tl.atomic_add(s, tl.sum(uu * h, 0), mask=jm)
        dh = uu * (1.0 - h * h)
        tl.atomic_add(s + HP, tl.sum(dh, 0), mask=jm)
        tl.atomic_add(s + 2 * HP, tl.sum(dh * k[:, None], 0), mask=jm)


@triton.jit
def deep_phi_kernel(ptrs, numel, sums, a, eta, NCOL: tl.constexpr, S_DT: tl.constexpr, H: tl.constexpr,
                    HP: tl.constexpr, WC: tl.constexpr, ALIGNED: tl.constexpr = False):
    """One program per row: w2 = a w2 + eta S_w2/n, w1 += eta w2_old S_w1/n, b1 += eta w2_old S_b1/n."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, HP)
    jm = j < H
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
def deep_read_kernel(ptrs, numel, blk_row, blk_start, red, lr, decay, wd,
                     NCOL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
                     O_DT: tl.constexpr, COUPLED: tl.constexpr, SIGN: tl.constexpr, TO_OUT: tl.constexpr,
                     H: tl.constexpr, HP: tl.constexpr, WC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Columns p, g, bias[, out], then w1, b1, w2 at WC: read m(u) = bias + sum_j w2_j tanh(w1_j k + b1_j)
    (new memory), sigma = sign or identity; p = decay p - lr sigma(m), or (TO_OUT) out = m."""
    row, offs, mask = _row(blk_row, blk_start, numel, BLOCK, ALIGNED)
    u, k, j, jm, w1, b1, w2 = _features(ptrs, row, offs, mask, wd, red, numel, NCOL, P_DT, G_DT, S_DT,
                                        COUPLED, H, HP, WC, ALIGNED)
    h = _tanh(k[:, None] * w1[None, :] + b1[None, :])
    d = _ld(_col(ptrs, row, 2, NCOL, S_DT, ALIGNED), offs, mask) + tl.sum(h * w2[None, :], 1)
    if SIGN:
        d = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    if TO_OUT:
        tl.store(_col(ptrs, row, 3, NCOL, O_DT, ALIGNED) + offs, _cast(d, O_DT), mask=mask)
    else:
        pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
        tl.store(pp + offs, _cast(_ld(pp, offs, mask) * decay - lr * d, P_DT), mask=mask)
