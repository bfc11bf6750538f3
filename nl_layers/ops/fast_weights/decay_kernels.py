"""The element-wise passes of the decay-mix matrix, as Triton kernels beside their torch reference.

For log prefixes c (K, N, L) and column weights w (K, N, L), two passes over (K, N, L, L) tensors:

    tiles:   D[k, n, t, s] = exp(c[k, n, t] - c[k, n, s]) w[k, n, s]          (s <= t, else 0)
    rowcol:  row[k, n, t]  = sum_s X[k, n, t, s] E[k, n, t, s] w[k, n, s],
             col[k, n, s]  = sum_t X[k, n, t, s] E[k, n, t, s]                 (E: D with w = 1)

``tiles`` builds the decay products (with the step sizes folded into their columns) in one write;
``rowcol`` gives the gradient of a loss through D with respect to c and w from X = dLoss/dD,
recomputing E from c instead of reading D: dc = row - w col, dw = col. On a GPU each is one
pass that reads only what it needs (torch's path: a broadcast difference, a mask, an exponential
and a multiplication, each a pass over L x L; then a product with D and two sums).

:func:`decay_tiles` / :func:`decay_rowcol` run the kernels (``impl="triton"``: CUDA, or the CPU
interpreter with ``TRITON_INTERPRET=1``) or the torch expressions (``impl="torch"``, the
reference); ``"auto"`` takes the kernels for float32/bfloat16/float16 CUDA tensors when triton
imports, torch.compile is not tracing (inductor fuses the torch path itself) and
``nl_layers.set_triton_kernels`` has not turned them off. The column sums
are added without atomics (per-program partial sums, then one torch sum): deterministic.

Example:
    >>> c = torch.tensor([[[0.0, -1.0, -3.0]]])
    >>> decay_tiles(c, torch.ones_like(c), impl="torch")[0, 0]
    tensor([[1.0000, 0.0000, 0.0000],
            [0.3679, 1.0000, 0.0000],
            [0.0498, 0.1353, 1.0000]])
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._kernels import IMPLS, resolve_impl, triton_kernels_enabled
from .cross import _above

try:  # triton is optional: without it only the torch path runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["IMPLS", "kernel_ok", "decay_rowcol", "decay_rowcol_torch", "decay_tiles", "decay_tiles_torch"]

#: tile of one ``tiles`` program (rows x columns); rows of one ``rowcol`` program, which walks the
#: columns up to the diagonal in COL_BLOCK steps
TILE, ROW_BLOCK, COL_BLOCK, WARPS = 64, 32, 64, 4
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _exponent(c: Tensor) -> Tensor:
    """c_t - c_s (..., L, L), -inf above the diagonal (exp gives exactly 0 there)."""
    length = c.shape[-1]
    return c[..., :, None] - c[..., None, :] + _above(length, length, 1, c)


def decay_tiles_torch(c: Tensor, w: Tensor) -> Tensor:
    """The torch path of :func:`decay_tiles`."""
    return _exponent(c).exp_().mul_(w[..., None, :])


def decay_rowcol_torch(x: Tensor, c: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """The torch path of :func:`decay_rowcol`."""
    p = x * _exponent(c).exp_()
    return (p * w[..., None, :]).sum(-1), p.sum(-2)


def kernel_ok(*ts: Tensor) -> bool:
    """Whether "auto" takes the kernels for these tensors."""
    return (triton is not None and triton_kernels_enabled() and all(t.is_cuda and t.dtype in _KERNEL_DTYPES[:3] for t in ts)
            and not torch.compiler.is_compiling())


def _impl(impl: str, *ts: Tensor) -> str:
    return resolve_impl(impl, lambda: kernel_ok(*ts), triton is not None)


def decay_tiles(c: Tensor, w: Tensor, impl: str = "auto") -> Tensor:
    """D (*batch, L, L) from c, w (*batch, L): D_ts = exp(c_t - c_s) w_s for s <= t, else 0 (see the module doc)."""
    if _impl(impl, c, w) == "torch":
        return decay_tiles_torch(c, w)
    length = c.shape[-1]
    c2, w2 = c.reshape(-1, length).contiguous(), w.to(c.dtype).reshape(-1, length).contiguous()
    out = torch.empty(*c.shape, length, dtype=c.dtype, device=c.device)
    if out.numel():
        nt = triton.cdiv(length, TILE)
        _tiles_kernel[(c2.shape[0], nt, nt)](c2, w2, out, length, BT=TILE, ACC=_acc(c), num_warps=WARPS)
    return out


def decay_rowcol(x: Tensor, c: Tensor, w: Tensor, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """(row, col) (*batch, L) for X (*batch, L, L) and c, w (*batch, L) (see the module doc); X's
    entries above the diagonal are not read."""
    if _impl(impl, x, c, w) == "torch":
        return decay_rowcol_torch(x, c, w)
    length = c.shape[-1]
    x2 = x.reshape(-1, length, length)
    x2 = x2 if x2.stride(-1) == 1 and x2.stride(-2) == length else x2.contiguous()
    c2, w2 = c.reshape(-1, length).contiguous(), w.to(c.dtype).reshape(-1, length).contiguous()
    rows = triton.cdiv(length, ROW_BLOCK)
    row = torch.empty(c2.shape, dtype=c.dtype, device=c.device)
    part = torch.zeros(c2.shape[0], rows, length, dtype=torch.float64 if c.dtype == torch.float64 else torch.float32,
                       device=c.device)
    if row.numel():
        _rowcol_kernel[(c2.shape[0], rows)](x2, c2, w2, row, part, length, x2.stride(0), BM=ROW_BLOCK,
                                            BN=COL_BLOCK, ACC=_acc(c), num_warps=WARPS)
    return row.reshape(c.shape), part.sum(1).to(c.dtype).reshape(c.shape)


def _acc(t: Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


if triton is not None:

    @triton.jit
    def _tiles_kernel(c, w, out, L, BT: tl.constexpr, ACC: tl.constexpr):
        """One BT x BT tile of D for batch row program_id(0): exp(c_t - c_s) w_s below the diagonal."""
        b = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        s = tl.program_id(2) * BT + tl.arange(0, BT)
        mt, ms = t < L, s < L
        ct = tl.load(c + b * L + t, mask=mt, other=0.0).to(ACC)
        cs = tl.load(c + b * L + s, mask=ms, other=0.0).to(ACC)
        ws = tl.load(w + b * L + s, mask=ms, other=0.0).to(ACC)
        below = s[None, :] <= t[:, None]
        d = tl.where(below, tl.exp(tl.minimum(ct[:, None] - cs[None, :], 0.0)) * ws[None, :], 0.0)
        tl.store(out + b * L * L + t[:, None] * L + s[None, :], d.to(out.dtype.element_ty),
                 mask=mt[:, None] & ms[None, :])

    @triton.jit
    def _rowcol_kernel(x, c, w, row, part, L, sxb, BM: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr):
        """Rows t of one BM block: row_t = sum_s P_ts w_s over the columns up to the diagonal, and
        this block's column sums part[b, block, s] = sum_t P_ts, with P = X exp(c_t - c_s) (s <= t)."""
        b = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        t = blk * BM + tl.arange(0, BM)
        mt = t < L
        ct = tl.load(c + b * L + t, mask=mt, other=0.0).to(ACC)
        acc = tl.zeros((BM,), dtype=ACC)
        xb = x + b * sxb
        for s0 in range(0, tl.minimum(blk * BM + BM, L), BN):
            s = s0 + tl.arange(0, BN)
            ms = s < L
            cs = tl.load(c + b * L + s, mask=ms, other=0.0).to(ACC)
            ws = tl.load(w + b * L + s, mask=ms, other=0.0).to(ACC)
            keep = (s[None, :] <= t[:, None]) & mt[:, None] & ms[None, :]
            xv = tl.load(xb + t[:, None] * L + s[None, :], mask=keep, other=0.0).to(ACC)
            p = tl.where(keep, xv * tl.exp(tl.minimum(ct[:, None] - cs[None, :], 0.0)), 0.0)
            acc += tl.sum(p * ws[None, :], axis=1)
            tl.store(part + (b * tl.num_programs(1) + blk) * L + s, tl.sum(p, axis=0), mask=ms)
        tl.store(row + b * L + t, acc.to(row.dtype.element_ty), mask=mt)
