"""The token-form read y = out + (mixing o (x right^T)) left as fused Triton kernels, forward and backward.

For N copies, mixing M (N, L, L), left A (N, L, o), right B, x X (N, L, i), out (N, L, o) or None:

    s_tr = x_t . right_r,   y_t = out_t + sum_{r <= t} M_tr s_tr left_r.

With g = dL/dy and p_tr = g_t . left_r the gradients are

    dM_tr = p_tr s_tr (r <= t; 0 above the diagonal),   dx_t = sum_{r <= t} M_tr p_tr right_r,
    dleft_r = sum_{t >= r} M_tr s_tr g_t,   dright_r = sum_{t >= r} M_tr p_tr x_t,   dout = g.

M is taken as lower-triangular (what :class:`~.scan.TokenPlan` gives): the kernels never read its
entries above the diagonal, which count as zero and get zero gradient (the torch reference, which
reads them, differs where they are not zero).

Tiling, flash-attention style (the L x L products s, p never reach memory): the forward runs a
program per (copy, block of BT rows t) that loops over the blocks of BR columns r up to the
diagonal, s = x_t right_r^T and y_t += (M o s) left_r in fp32 registers. The backward, without
atomics: one kernel per (copy, t-block) for dx and dM (it also writes dM's zeros above the
diagonal), one per (copy, r-block) that loops over t-blocks from the diagonal down for dleft and
dright, each recomputing s and p. The feature widths i, o are padded to powers of two (>= 16) by
masks; ``tl.dot`` accumulates in fp32, with TF32 inputs when the inputs are fp32 and
``torch.backends.cuda.matmul.allow_tf32`` is set (IEEE fp32 otherwise); fp32, bf16 and fp16
inputs, outputs in their dtype (mixing may be fp32 beside bf16 factors: autocast).

:func:`rank1_read_tokens` picks the kernels for CUDA tensors outside ``torch.compile`` (inductor
fuses the torch expression itself) and the torch expression (:func:`rank1_read_tokens_reference`)
otherwise; ``impl="triton"`` forces the kernels (on the CPU under ``TRITON_INTERPRET=1``).

Example (CPU: the torch path):
    >>> n, length, i, o = 2, 5, 3, 4
    >>> mixing = torch.randn(n, length, length).tril()
    >>> left, right, x = torch.randn(n, length, o), torch.randn(n, length, i), torch.randn(n, length, i)
    >>> y = rank1_read_tokens(mixing, left, right, x)
    >>> loop = torch.stack([sum(mixing[:, t, r, None] * (x[:, t] * right[:, r]).sum(-1, keepdim=True) * left[:, r]
    ...                         for r in range(t + 1)) for t in range(length)], 1)
    >>> y.shape, bool(torch.allclose(y, loop, atol=1e-5))
    (torch.Size([2, 5, 4]), True)
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch path needs no triton
    triton = tl = None

__all__ = ["IMPLS", "rank1_read_tokens", "rank1_read_tokens_reference", "rank1_read_tokens_triton"]

IMPLS = ("auto", "triton", "torch")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 stays with torch (the kernels accumulate in fp32)
#: (BT, BR, num_warps) up to a padded feature width (the widest of i, o): a first guess, not tuned on a GPU.
CONFIGS = {64: (64, 64, 4), 128: (64, 32, 4), 256: (64, 32, 8), None: (32, 32, 8)}


def rank1_read_tokens_reference(mixing, left, right, x, out=None) -> torch.Tensor:
    """The torch expression: (mixing o (x right^T)) left (+ out); reads all of mixing."""
    weighted = mixing * (x @ right.transpose(-1, -2))
    return weighted @ left if out is None else torch.baddbmm(out, weighted, left)


def rank1_read_tokens(mixing, left, right, x, out=None, impl: str = "auto") -> torch.Tensor:
    """sum_{r <= t} mixing_tr (x_t . right_r) left_r (+ out_t) for every token; mixing (N, L, L),
    left (N, L, o), right and x (N, L, i), out (N, L, o) or None.

    ``impl``: "auto" (the kernels for CUDA tensors outside torch.compile, else torch), "triton"
    (the kernels; on the CPU they need TRITON_INTERPRET=1) or "torch"."""
    if impl not in IMPLS:
        raise ValueError(f"invalid impl {impl!r}; use one of {IMPLS}")
    if impl == "torch" or (impl == "auto" and not _kernel_fits(mixing, left, right, x, out)):
        return rank1_read_tokens_reference(mixing, left, right, x, out)
    return rank1_read_tokens_triton(mixing, left, right, x, out)


def _kernel_fits(mixing, left, right, x, out) -> bool:
    """Whether "auto" runs the kernels: CUDA, triton, not compiling, plain 3-d shapes, fp32/bf16/fp16."""
    if triton is None or not x.is_cuda or torch.compiler.is_compiling():
        return False
    return _supported(mixing, left, right, x, out)


def _supported(mixing, left, right, x, out) -> bool:
    tensors = (mixing, left, right, x) + (() if out is None else (out,))
    return _shapes_ok(mixing, left, right, x, out) and all(t.dtype in _DTYPES for t in tensors)


def _shapes_ok(mixing, left, right, x, out) -> bool:
    tensors = (mixing, left, right, x) + (() if out is None else (out,))
    if any(t.ndim != 3 or not t.is_floating_point() or t.device != x.device for t in tensors):
        return False
    n, length, i = x.shape
    o = left.shape[-1]
    return (n * length * i * o > 0 and mixing.shape == (n, length, length) and right.shape == x.shape
            and left.shape == (n, length, o) and (out is None or out.shape == left.shape))


def rank1_read_tokens_triton(mixing, left, right, x, out=None, blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """The kernels (autograd through :class:`_Read`); ``blocks`` = (BT, BR) overrides the tile sizes
    (powers of two >= 16). Under autocast left, right, x and out run in the autocast dtype (mixing
    keeps its own); otherwise they must share a dtype."""
    if triton is None:
        raise RuntimeError("rank1_read_tokens: impl='triton' needs triton")
    if not _shapes_ok(mixing, left, right, x, out):
        raise ValueError("rank1_read_tokens: the kernels take mixing (N, L, L), left/out (N, L, o), right/x (N, L, i)")
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        left, right, x = left.to(dtype), right.to(dtype), x.to(dtype)
        out = None if out is None else out.to(dtype)
    if len({t.dtype for t in (left, right, x) + (() if out is None else (out,))}) > 1:
        raise TypeError("rank1_read_tokens: left, right, x and out must share a dtype")
    if x.dtype not in _DTYPES or mixing.dtype not in _DTYPES:
        raise TypeError(f"rank1_read_tokens: the kernels take {_DTYPES}, not {x.dtype} / {mixing.dtype}")
    with torch.autocast(kind, enabled=False):
        return _Read.apply(mixing, left, right, x, out, blocks)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _config(x, left, blocks):
    bi, bo = _pow2(x.shape[-1]), _pow2(left.shape[-1])
    bt, br, warps = next(c for w, c in CONFIGS.items() if w is None or max(bi, bo) <= w)
    if blocks is not None:
        bt, br = blocks
    prec = "tf32" if x.dtype != torch.float32 or _tf32() else "ieee"
    return dict(BT=bt, BR=br, BI=bi, BO=bo, PREC=prec, num_warps=warps)


def _tf32() -> bool:
    """torch's TF32 switch for fp32 matmuls (the legacy flag; the new API's setting when torch refuses
    to read the legacy one after both were used)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        return getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32"


def _on(x):
    """Launch on x's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


class _Read(torch.autograd.Function):
    """y = out + (tril(mixing) o (x right^T)) left, by the kernels; every input gets a gradient (once
    differentiable: a second backward raises)."""

    @staticmethod
    def forward(ctx, mixing, left, right, x, out, blocks):
        n, length, i = x.shape
        o = left.shape[-1]
        cfg = _config(x, left, blocks)
        y = torch.empty(n, length, o, device=x.device, dtype=x.dtype)
        grid = (n, triton.cdiv(length, cfg["BT"]))  # copies fastest: every copy's last rows first
        src = y if out is None else out
        with _on(x):
            _fwd[grid](mixing, left, right, x, src, y, length, i, o,
                       *_strides(mixing, left, right, x, src, y), HAS_OUT=out is not None, **cfg)
        ctx.save_for_backward(mixing, left, right, x)
        ctx.cfg, ctx.has_out = cfg, out is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        mixing, left, right, x = ctx.saved_tensors
        cfg = ctx.cfg
        n, length, i = x.shape
        o = left.shape[-1]
        dm, dleft, dright, dx = (torch.empty_like(t, memory_format=torch.contiguous_format)
                                 for t in (mixing, left, right, x))
        g = g.to(x.dtype)
        with _on(x):
            _bwd_rows[(n, triton.cdiv(length, cfg["BT"]))](
                mixing, left, right, x, g, dm, dx, length, i, o, *_strides(mixing, left, right, x, g, dm, dx), **cfg)
            _bwd_cols[(n, triton.cdiv(length, cfg["BR"]))](
                mixing, left, right, x, g, dleft, dright, length, i, o,
                *_strides(mixing, left, right, x, g, dleft, dright), **cfg)
        return dm, dleft, dright, dx, (g if ctx.has_out else None), None


if triton is not None:

    @triton.jit
    def _tile(ptr, rows, cols, n_rows, n_cols, s_row, s_col):
        """The (rows, cols) tile of a matrix, zero outside n_rows x n_cols (native dtype)."""
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        return tl.load(ptr + rows[:, None] * s_row + cols[None, :] * s_col, mask=mask, other=0.0)

    @triton.jit
    def _fwd(M, A, B, X, O, Y, L, DI, DO,
             m0, m1, m2, a0, a1, a2, b0, b1, b2, x0, x1, x2, o0, o1, o2, y0, y1, y2,
             HAS_OUT: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr,
             PREC: tl.constexpr):
        """Program (copy, t-block): y_t = out_t + sum_{r <= t} M_tr s_tr left_r over r-blocks to the diagonal."""
        t0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BT  # the longest rows first
        c = tl.program_id(0).to(tl.int64)
        ts, ci, co = t0 + tl.arange(0, BT), tl.arange(0, BI), tl.arange(0, BO)
        x = _tile(X + c * x0, ts, ci, L, DI, x1, x2)
        acc = tl.zeros((BT, BO), dtype=tl.float32)
        for r0 in range(0, tl.minimum(t0 + BT, L), BR):
            rs = r0 + tl.arange(0, BR)
            b = _tile(B + c * b0, rs, ci, L, DI, b1, b2)
            a = _tile(A + c * a0, rs, co, L, DO, a1, a2)
            keep = (rs[None, :] <= ts[:, None]) & (ts[:, None] < L)
            m = tl.load(M + c * m0 + ts[:, None] * m1 + rs[None, :] * m2, mask=keep, other=0.0).to(tl.float32)
            s = tl.dot(x, tl.trans(b), input_precision=PREC)
            acc += tl.dot((m * s).to(a.dtype), a, input_precision=PREC)
        if HAS_OUT:
            acc += _tile(O + c * o0, ts, co, L, DO, o1, o2).to(tl.float32)
        mask = (ts[:, None] < L) & (co[None, :] < DO)
        tl.store(Y + c * y0 + ts[:, None] * y1 + co[None, :] * y2, acc.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_rows(M, A, B, X, G, DM, DX, L, DI, DO,
                  m0, m1, m2, a0, a1, a2, b0, b1, b2, x0, x1, x2, g0, g1, g2, d0, d1, d2, e0, e1, e2,
                  BT: tl.constexpr, BR: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr, PREC: tl.constexpr):
        """Program (copy, t-block): dM_tr = p_tr s_tr (0 above the diagonal), dx_t = sum_r M_tr p_tr right_r."""
        t0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BT
        c = tl.program_id(0).to(tl.int64)
        ts, ci, co = t0 + tl.arange(0, BT), tl.arange(0, BI), tl.arange(0, BO)
        x = _tile(X + c * x0, ts, ci, L, DI, x1, x2)
        g = _tile(G + c * g0, ts, co, L, DO, g1, g2)
        dx = tl.zeros((BT, BI), dtype=tl.float32)
        hi = tl.minimum(t0 + BT, L)
        for r0 in range(0, hi, BR):
            rs = r0 + tl.arange(0, BR)
            b = _tile(B + c * b0, rs, ci, L, DI, b1, b2)
            a = _tile(A + c * a0, rs, co, L, DO, a1, a2)
            keep = (rs[None, :] <= ts[:, None]) & (ts[:, None] < L)
            m = tl.load(M + c * m0 + ts[:, None] * m1 + rs[None, :] * m2, mask=keep, other=0.0).to(tl.float32)
            s = tl.dot(x, tl.trans(b), input_precision=PREC)
            p = tl.dot(g, tl.trans(a), input_precision=PREC)
            inside = (ts[:, None] < L) & (rs[None, :] < L)
            tl.store(DM + c * d0 + ts[:, None] * d1 + rs[None, :] * d2,
                     tl.where(keep, p * s, 0.0).to(DM.dtype.element_ty), mask=inside)
            dx += tl.dot((m * p).to(b.dtype), b, input_precision=PREC)
        for r0 in range(tl.cdiv(hi, BR) * BR, L, BR):  # the zeros above the diagonal
            rs = r0 + tl.arange(0, BR)
            inside = (ts[:, None] < L) & (rs[None, :] < L)
            tl.store(DM + c * d0 + ts[:, None] * d1 + rs[None, :] * d2,
                     tl.zeros((BT, BR), dtype=DM.dtype.element_ty), mask=inside)
        mask = (ts[:, None] < L) & (ci[None, :] < DI)
        tl.store(DX + c * e0 + ts[:, None] * e1 + ci[None, :] * e2, dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_cols(M, A, B, X, G, DA, DB, L, DI, DO,
                  m0, m1, m2, a0, a1, a2, b0, b1, b2, x0, x1, x2, g0, g1, g2, d0, d1, d2, e0, e1, e2,
                  BT: tl.constexpr, BR: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr, PREC: tl.constexpr):
        """Program (copy, r-block): dleft_r = sum_{t >= r} M_tr s_tr g_t, dright_r = sum_{t >= r} M_tr p_tr x_t,
        in the transposed (r, t) layout."""
        r0 = tl.program_id(1) * BR
        c = tl.program_id(0).to(tl.int64)
        rs, ci, co = r0 + tl.arange(0, BR), tl.arange(0, BI), tl.arange(0, BO)
        b = _tile(B + c * b0, rs, ci, L, DI, b1, b2)
        a = _tile(A + c * a0, rs, co, L, DO, a1, a2)
        da = tl.zeros((BR, BO), dtype=tl.float32)
        db = tl.zeros((BR, BI), dtype=tl.float32)
        for t0 in range((r0 // BT) * BT, L, BT):
            ts = t0 + tl.arange(0, BT)
            x = _tile(X + c * x0, ts, ci, L, DI, x1, x2)
            g = _tile(G + c * g0, ts, co, L, DO, g1, g2)
            keep = (rs[:, None] <= ts[None, :]) & (ts[None, :] < L)
            m = tl.load(M + c * m0 + ts[None, :] * m1 + rs[:, None] * m2, mask=keep, other=0.0).to(tl.float32)
            s = tl.dot(b, tl.trans(x), input_precision=PREC)  # s^T: (r, t)
            p = tl.dot(a, tl.trans(g), input_precision=PREC)
            da += tl.dot((m * s).to(g.dtype), g, input_precision=PREC)
            db += tl.dot((m * p).to(x.dtype), x, input_precision=PREC)
        mask = rs[:, None] < L
        tl.store(DA + c * d0 + rs[:, None] * d1 + co[None, :] * d2, da.to(DA.dtype.element_ty),
                 mask=mask & (co[None, :] < DO))
        tl.store(DB + c * e0 + rs[:, None] * e1 + ci[None, :] * e2, db.to(DB.dtype.element_ty),
                 mask=mask & (ci[None, :] < DI))
