"""Fused Triton kernels for the decay mix, mix = D^a D^m (N, L, L), forward and backward.

From the stacked log prefixes c = (ca, cm) (2, N, L), cx_t = sum_{i <= t} log x_i, the decay
products are D^x_ts = exp(cx_t - cx_s) for s <= t (else 0), and

    mix_tr = sum_{r <= j <= t} exp(ca_t - ca_j) exp(cm_j - cm_r)          (0 for r > t).

The torch reference (:class:`scan._DecayMix`) materialises both D's (2, N, L, L) and saves them
for the backward; these kernels never store them: each program regenerates its D tiles in
registers from the prefix vectors and multiplies them with ``tl.dot``. Only c (2, N, L) is saved.

Forward: a program per (n, t-block, r-block); below the diagonal it loops over the j-blocks
between them, ``acc += D^a[t, j] @ D^m[j, r]``; blocks above the diagonal store zeros (the
output is ``torch.empty``, so every element is written once).

Backward, for the upstream gradient g (N, L, L):

    G^a = (g D^m^T) * D^a,   G^m = (D^a^T g) * D^m,
    dca = G^a 1 - G^a^T 1,   dcm = G^m 1 - G^m^T 1           (row sums minus column sums).

Only g's lower triangle (r <= t) enters (D^m_jr D^a_tj vanishes unless r <= j <= t), so the
kernels read g's blocks on and below the diagonal only; the torch reference gives the same
numbers for a full g. A program per (n, P-block, Q-block), Q <= P, computes one G tile (P rows,
Q columns) and writes its row sums to ``part[w, n, Q, P-block]`` and minus its column sums to
``part[w, n, P, Q-block]`` (the diagonal block: their difference, once), so every slot of the
(2, N, nblocks, L) buffer is written exactly once, without atomics; dc = part.sum(2) in torch
(deterministic).

Numerics: the prefixes are non-increasing (log a, log m <= 0), so every generated entry
exp(cx_t - cx_s), s <= t, is in [0, 1]; each is formed as the difference first, then one exp,
with masked entries set to -inf before the exp (exp(-inf) = 0): no overflow, no product of
large and small factors. Math is float32 (float64 for float64 c); the dot runs at
``input_precision="ieee"`` by default (:data:`PRECISION`): TF32 would round the D tiles to a
10-bit mantissa (relative errors ~1e-3 in mix), far above the 1e-5 the float32 tests ask, and
the L^3 / 3 flops per copy are small next to the L^2 bytes either way. ``precision="tf32"`` is
accepted for measuring (benchmarks/layers/mix_kernel_bench.py).

Example (on CPU the kernels need Triton's interpreter, TRITON_INTERPRET=1; the default
dispatch there is the torch reference):
    >>> from nl_layers.ops.fast_weights.scan import decay_mix
    >>> c = torch.stack([-0.1 * torch.rand(2, 5), -torch.rand(2, 5)]).cumsum(-1)
    >>> decay_mix(c, impl="torch").shape
    torch.Size([2, 5, 5])
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

__all__ = ["PRECISION", "DecayMixKernel", "block_size", "mix_backward", "mix_forward"]

PRECISION = "ieee"  # see the module docstring: TF32 is not accurate enough for the mix's tests


def block_size(c: torch.Tensor) -> int:
    """Tile edge: 64 on a GPU (32 for float64: register pressure), 16 in the interpreter (so that a
    small L still spans several blocks)."""
    if not c.is_cuda:
        return 16
    return 32 if c.dtype == torch.float64 else 64


@triton.jit
def _decay_tile(c_rows, c_cols, rows, cols, length):
    """exp(c_rows[i] - c_cols[k]) where cols[k] <= rows[i] < length, else 0 (difference first, then exp)."""
    keep = (cols[None, :] <= rows[:, None]) & (rows[:, None] < length) & (cols[None, :] < length)
    return tl.exp(tl.where(keep, c_rows[:, None] - c_cols[None, :], float("-inf")))


@triton.jit
def _mix_fwd_kernel(c_ptr, mix_ptr, N, L, BLOCK: tl.constexpr, PREC: tl.constexpr):
    """Program (n, tb, rb): mix[n, t-block, r-block] = sum_{rb <= jb <= tb} D^a[t, j] @ D^m[j, r]."""
    n = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    rb = tl.program_id(2)
    ar = tl.arange(0, BLOCK)
    t = tb * BLOCK + ar
    r = rb * BLOCK + ar
    out = mix_ptr + n * L * L + t[:, None] * L + r[None, :]
    inside = (t[:, None] < L) & (r[None, :] < L)
    ca = c_ptr + n * L  # ca row n; cm is N rows further
    cm = c_ptr + (N + n) * L
    if rb > tb:
        tl.store(out, tl.zeros((BLOCK, BLOCK), dtype=mix_ptr.dtype.element_ty), mask=inside)
    else:
        ca_t = tl.load(ca + t, mask=t < L, other=0.0)
        cm_r = tl.load(cm + r, mask=r < L, other=0.0)
        acc = tl.zeros((BLOCK, BLOCK), dtype=ca_t.dtype)
        for jb in range(rb, tb + 1):
            j = jb * BLOCK + ar
            ca_j = tl.load(ca + j, mask=j < L, other=0.0)
            cm_j = tl.load(cm + j, mask=j < L, other=0.0)
            da = _decay_tile(ca_t, ca_j, t, j, L)  # D^a[t, j]
            dm = _decay_tile(cm_j, cm_r, j, r, L)  # D^m[j, r]
            acc += tl.dot(da, dm, input_precision=PREC)
        tl.store(out, acc.to(mix_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _store_sums(part_ptr, g_tile, w, n, p, q, N, L, NB, BLOCK: tl.constexpr):
    """Row sums of the (P-block x Q-block) tile to part[w, n, q, P positions], minus its column
    sums to part[w, n, p, Q positions]."""
    ar = tl.arange(0, BLOCK)
    rows = p * BLOCK + ar
    cols = q * BLOCK + ar
    base = part_ptr + (w * N + n) * NB * L
    row_sum = tl.sum(g_tile, axis=1)
    col_sum = tl.sum(g_tile, axis=0)
    if p == q:  # same positions: one store of the difference
        tl.store(base + q * L + rows, row_sum - col_sum, mask=rows < L)
    else:
        tl.store(base + q * L + rows, row_sum, mask=rows < L)
        tl.store(base + p * L + cols, -col_sum, mask=cols < L)


@triton.jit
def _mix_bwd_kernel(c_ptr, g_ptr, part_ptr, N, L, NB, g_sn, g_st, g_sr, BLOCK: tl.constexpr, PREC: tl.constexpr):
    """Programs (w * N + n, pb, qb), qb <= pb (the others return).
    w = 0: the G^a tile (t = P, j = Q) = (sum_{rb <= qb} g[t, r] D^m[j, r]^T) * D^a[t, j];
    w = 1: the G^m tile (j = P, r = Q) = (sum_{tb >= pb} D^a[t, j]^T g[t, r]) * D^m[j, r]."""
    wn = tl.program_id(0).to(tl.int64)
    w = wn // N
    n = wn % N
    pb = tl.program_id(1)
    qb = tl.program_id(2)
    if qb <= pb:
        ar = tl.arange(0, BLOCK)
        p = pb * BLOCK + ar
        q = qb * BLOCK + ar
        ca = c_ptr + n * L
        cm = c_ptr + (N + n) * L
        g_n = g_ptr + n * g_sn
        if w == 0:  # t = p, j = q
            ca_t = tl.load(ca + p, mask=p < L, other=0.0)
            ca_j = tl.load(ca + q, mask=q < L, other=0.0)
            cm_j = tl.load(cm + q, mask=q < L, other=0.0)
            acc = tl.zeros((BLOCK, BLOCK), dtype=ca_t.dtype)
            for rb in range(0, qb + 1):
                r = rb * BLOCK + ar
                cm_r = tl.load(cm + r, mask=r < L, other=0.0)
                inside = (p[:, None] < L) & (r[None, :] < L)
                g = tl.load(g_n + p[:, None] * g_st + r[None, :] * g_sr, mask=inside, other=0.0)
                dm_t = tl.trans(_decay_tile(cm_j, cm_r, q, r, L))  # D^m[j, r]^T: (r, j)
                acc += tl.dot(g.to(ca_t.dtype), dm_t, input_precision=PREC)
            tile = acc * _decay_tile(ca_t, ca_j, p, q, L)
        else:  # j = p, r = q
            ca_j = tl.load(ca + p, mask=p < L, other=0.0)
            cm_j = tl.load(cm + p, mask=p < L, other=0.0)
            cm_r = tl.load(cm + q, mask=q < L, other=0.0)
            acc = tl.zeros((BLOCK, BLOCK), dtype=ca_j.dtype)
            for tb in range(pb, NB):
                t = tb * BLOCK + ar
                ca_t = tl.load(ca + t, mask=t < L, other=0.0)
                inside = (t[:, None] < L) & (q[None, :] < L)
                g = tl.load(g_n + t[:, None] * g_st + q[None, :] * g_sr, mask=inside, other=0.0)
                da_t = tl.trans(_decay_tile(ca_t, ca_j, t, p, L))  # D^a[t, j]^T: (j, t)
                acc += tl.dot(da_t, g.to(ca_j.dtype), input_precision=PREC)
            tile = acc * _decay_tile(cm_j, cm_r, p, q, L)
        _store_sums(part_ptr, tile, w, n, pb, qb, N, L, NB, BLOCK)


def _work_dtype(c: torch.Tensor) -> torch.dtype:
    return torch.float64 if c.dtype == torch.float64 else torch.float32


def _device(c: torch.Tensor):
    return torch.cuda.device(c.device) if c.is_cuda else contextlib.nullcontext()


def mix_forward(c: torch.Tensor, block: int | None = None, precision: str = PRECISION) -> torch.Tensor:
    """mix (N, L, L) in c's dtype from c (2, N, L); math in float32 (float64 for float64 c)."""
    _, n, length = c.shape
    block = block or block_size(c)
    cw = c.to(_work_dtype(c)).contiguous()
    mix = torch.empty(n, length, length, dtype=c.dtype, device=c.device)
    nb = triton.cdiv(length, block)
    if n and length:
        with _device(c):
            _mix_fwd_kernel[(n, nb, nb)](cw, mix, n, length, BLOCK=block, PREC=precision)
    return mix


def mix_backward(c: torch.Tensor, g: torch.Tensor, block: int | None = None,
                 precision: str = PRECISION) -> torch.Tensor:
    """dc (2, N, L) in c's dtype, the gradient through mix = D^a D^m for upstream g (N, L, L) (its lower triangle)."""
    _, n, length = c.shape
    block = block or block_size(c)
    work = _work_dtype(c)
    cw = c.to(work).contiguous()
    nb = triton.cdiv(length, block)
    part = torch.empty(2, n, nb, length, dtype=work, device=c.device)
    if n and length:
        with _device(c):
            _mix_bwd_kernel[(2 * n, nb, nb)](
                cw, g, part, n, length, nb, *g.stride(), BLOCK=block, PREC=precision
            )
    return part.sum(2).to(c.dtype)


class DecayMixKernel(torch.autograd.Function):
    """mix = D^a D^m from c (2, N, L) by the kernels; saves only c (the torch reference saves both D's)."""

    @staticmethod
    def forward(ctx, c, block=None):
        ctx.save_for_backward(c)
        ctx.block = block
        return mix_forward(c, block)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (c,) = ctx.saved_tensors
        return mix_backward(c, g, ctx.block), None
