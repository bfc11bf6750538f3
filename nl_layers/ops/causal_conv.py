"""Causal depthwise convolution over time in the (B, T, C) layout, with Triton kernels.

With ``W`` = width, weight ``w`` (C, 1, W) (``w[:, 0, -1]`` multiplies the current input) and
``xf = cat(cache, x)`` along time (B, W-1+T, C) (the cache is the previous call's last W-1
inputs, zeros when None):

    y[b, t, c]      = sum_j w[c, j] xf[b, t + j, c]                       j < W
    new_cache       = xf[:, T:]                                           (last W-1 inputs)
    dxf[b, p, c]    = sum_j w[c, j] dy[b, p - j, c]                       0 <= p - j < T
    dx = dxf[:, W-1:],   dcache = dxf[:, :W-1]
    dw[c, j]        = sum_{b, t} dy[b, t, c] xf[b, t + j, c]

:func:`causal_conv1d` runs the Triton kernels (``impl="triton"``: CUDA, or the CPU interpreter
with ``TRITON_INTERPRET=1``) or the torch path (``impl="torch"``: ``F.conv1d(groups=C)`` on the
transposed input, the reference); ``"auto"`` (default) takes the kernels for CUDA tensors when
triton imports, torch.compile is not tracing and ``nl_layers.set_triton_kernels`` has not turned
them off. The kernels read x in place (any strides with
the channel stride 1), accumulate in float32 (float64 for float64 inputs) and write y, dx, dcache
in the input dtypes; dw is summed without atomics (per-program partial sums, then one torch sum),
so it is deterministic.

Example:
    >>> import torch
    >>> w = torch.zeros(3, 1, 2); w[:, 0, -1] = 1.0; w[:, 0, 0] = 0.5   # y_t = x_t + x_{t-1} / 2
    >>> y, cache = causal_conv1d(torch.ones(1, 3, 3), w, impl="torch")
    >>> y[0, :, 0], cache.shape
    (tensor([1.0000, 1.5000, 1.5000]), torch.Size([1, 1, 3]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._kernels import triton_kernels_enabled

try:  # triton is optional: without it only the torch path runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["IMPLS", "causal_conv1d", "causal_conv1d_torch"]

IMPLS = ("auto", "triton", "torch")
#: rows x channels (and warps) of one forward program; the backward program walks BT-row steps
#: over ROWS rows. Chosen without a GPU, for few registers (sm_90 cubins, W = 4 with a cache:
#: forward 54, backward 72, no spills); ``python -m benchmarks.layers.causal_conv_bench --sweep``
#: times alternatives.
FWD_BT, FWD_BC, FWD_WARPS = 16, 64, 4
BWD_BT, BWD_BC, BWD_ROWS, BWD_WARPS = 16, 32, 128, 4
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def new_cache(x: Tensor, cache: Tensor | None, width: int) -> Tensor:
    """The last ``width - 1`` inputs of ``cat(cache, x)`` (zeros for a None cache), a view of x when T >= width - 1."""
    b, t, c = x.shape
    if t >= width - 1:
        return x[:, t - (width - 1):]
    cache = x.new_zeros(b, width - 1, c) if cache is None else cache
    return torch.cat([cache[:, t:], x], dim=1)


def causal_conv1d_torch(x: Tensor, weight: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The torch path: ``F.conv1d(groups=C)`` on the transposed (B, C, T) input; y is a transposed view.
    Without a cache the zeros are the convolution's own padding (both sides; the last W - 1 outputs
    are dropped): no zeros tensor, cat or pad, one operator forward and one backward fewer."""
    width, c, t = weight.shape[-1], x.shape[-1], x.shape[1]
    if cache is None:
        y = F.conv1d(x.transpose(1, 2), weight, padding=width - 1, groups=c)[..., :t].transpose(1, 2)
    else:
        y = F.conv1d(torch.cat([cache, x], dim=1).transpose(1, 2), weight, groups=c).transpose(1, 2)
    return y, new_cache(x, cache, width)


def causal_conv1d(x: Tensor, weight: Tensor, cache: Tensor | None = None, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """``(y, new_cache)`` of the causal depthwise convolution of x (B, T, C) by weight (C, 1, W); see the module doc."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if _kernel_ok(x) else "torch"
    if impl == "torch":
        return causal_conv1d_torch(x, weight, cache)
    if triton is None:
        raise RuntimeError("causal_conv1d(impl='triton') needs triton")
    width, x_in = weight.shape[-1], x
    if torch.is_autocast_enabled(x.device.type):  # as F.conv1d under autocast: y in the autocast dtype
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"causal_conv1d kernels take float32/bfloat16/float16/float64, got {x.dtype}")
    if cache is not None and cache.shape != (x.shape[0], width - 1, x.shape[2]):
        want = (x.shape[0], width - 1, x.shape[2])
        raise ValueError(f"cache must be (B, width-1, C) = {want}, got {tuple(cache.shape)}")
    if not _fits(x):
        raise ValueError(f"causal_conv1d kernels: one batch of x {tuple(x.shape)} has 2**31 elements or more")
    y = _CausalConv.apply(x, weight, None if cache is None else cache.to(x.dtype))  # the kernels read both alike
    return y, new_cache(x_in, cache, width)  # the cache keeps the input's dtype, as the torch path's


def _kernel_ok(x: Tensor) -> bool:
    return (triton is not None and triton_kernels_enabled() and x.is_cuda and x.dtype in _KERNEL_DTYPES[:3]
            and _fits(x) and not torch.compiler.is_compiling())


def _fits(x: Tensor) -> bool:
    """The kernels address one batch's rows with int32 offsets."""
    return x.shape[1] * max(x.stride(1), x.shape[2]) < 2**31


def _rows(x: Tensor) -> Tensor:
    """x with channel stride 1 (a copy only when it is not), read in place by the kernels."""
    return x if x.stride(-1) == 1 else x.contiguous()


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, cache):
        x = _rows(x)
        ctx.cache_shape = None if cache is None else cache.shape  # (B, 0, C) when W = 1: nothing to read
        cache = None if cache is None or cache.shape[1] == 0 else cache.contiguous()
        w = weight.detach().reshape(weight.shape[0], weight.shape[-1]).t().contiguous()  # (W, C): taps as rows
        y = _forward(x, w, cache)
        ctx.save_for_backward(x, w, cache)
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w, cache = ctx.saved_tensors
        dx, dw, dcache = _backward(x, w, cache, dy.contiguous())
        dw = dw.to(ctx.weight_dtype).unsqueeze(1)
        if ctx.needs_input_grad[2] and dcache is None:  # W = 1: an empty cache
            dcache = dy.new_zeros(ctx.cache_shape)
        return dx, dw, (dcache if ctx.needs_input_grad[2] else None)


def _forward(x: Tensor, w: Tensor, cache: Tensor | None) -> Tensor:
    b, t, c = x.shape
    width = w.shape[0]
    y = torch.empty(b, t, c, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    nt = triton.cdiv(t, FWD_BT)
    has_cache = cache is not None
    _fwd_kernel[(b * nt, triton.cdiv(c, FWD_BC))](
        x, cache if has_cache else x, w, y, t, c, nt, x.stride(0), x.stride(1),
        W=width, HAS_CACHE=has_cache, BT=FWD_BT, BC=FWD_BC, ACC=_acc(x), num_warps=FWD_WARPS)
    return y


def _acc(x: Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _backward(x: Tensor, w: Tensor, cache: Tensor | None, dy: Tensor):
    """(dx, dw (C, W) in the accumulation dtype, dcache or None). Programs cover ROWS positions of xf each."""
    b, t, c = x.shape
    width = w.shape[0]
    has_cache = cache is not None
    p0 = 0 if has_cache else width - 1  # without a cache, positions p < W-1 hold zeros: skip them
    npos = t + width - 1 - p0
    dx = torch.empty(b, t, c, dtype=x.dtype, device=x.device)
    dcache = torch.empty_like(cache) if has_cache else None
    if x.numel() == 0:
        return dx, w.new_zeros(c, width, dtype=torch.float32), (torch.zeros_like(cache) if has_cache else None)
    rows = min(BWD_ROWS, triton.cdiv(npos, BWD_BT) * BWD_BT)
    np_ = triton.cdiv(npos, rows)
    wp = triton.next_power_of_2(width)
    partial = torch.empty(b * np_, width, c, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                          device=x.device)
    _bwd_kernel[(b * np_, triton.cdiv(c, BWD_BC))](
        x, cache if has_cache else x, w, dy, dx, dcache if has_cache else dx, partial,
        t, c, np_, p0, x.stride(0), x.stride(1),
        W=width, WP=wp, HAS_CACHE=has_cache, STEPS=rows // BWD_BT, BT=BWD_BT, BC=BWD_BC, ACC=_acc(x),
        num_warps=BWD_WARPS)
    dw = partial.sum(0).t()
    return dx, dw, dcache


if triton is not None:

    @triton.jit
    def _load_xf(xb, cb, p, cols, mask, C, sxt, W: tl.constexpr, HAS_CACHE: tl.constexpr, ACC: tl.constexpr):
        """xf[b, p, cols] (BT, BC) in ACC: x at p >= W-1, the cache (or zeros) below, in one load.
        ``xb``, ``cb``: batch b's x and cache (same dtype), addressed with int32 offsets (host:
        one batch < 2**31 elements)."""
        tx = p - (W - 1)
        inx = tx >= 0
        at_x = xb + tx[:, None] * sxt + cols[None, :]
        if HAS_CACHE:
            v = tl.load(tl.where(inx[:, None], at_x, cb + p[:, None] * C + cols[None, :]), mask=mask, other=0.0)
        else:
            v = tl.load(at_x, mask=mask & inx[:, None], other=0.0)
        return v.to(ACC)

    @triton.jit
    def _fwd_kernel(x, cache, w, y, T, C, NT, sxb, sxt,
                    W: tl.constexpr, HAS_CACHE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
        """y[b, t] = sum_j w[:, j] xf[b, t + j] for BT times and BC channels."""
        b = (tl.program_id(0) // NT).to(tl.int64)
        t = (tl.program_id(0) % NT) * BT + tl.arange(0, BT)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        mc = cols < C
        mask = (t < T)[:, None] & mc[None, :]
        xb, cb = x + b * sxb, cache + b * (W - 1) * C
        acc = tl.zeros((BT, BC), dtype=ACC)
        for j in tl.static_range(W):
            wj = tl.load(w + j * C + cols, mask=mc, other=0.0).to(ACC)
            acc += wj[None, :] * _load_xf(xb, cb, t + j, cols, mask, C, sxt, W, HAS_CACHE, ACC)
        tl.store(y + b * T * C + t[:, None] * C + cols[None, :], acc.to(y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(x, cache, w, dy, dx, dcache, partial, T, C, NP, P0, sxb, sxt,
                    W: tl.constexpr, WP: tl.constexpr, HAS_CACHE: tl.constexpr, STEPS: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
        """dxf[b, p] = sum_j w[:, j] dy[b, p - j] over STEPS * BT positions p of xf (from P0),
        stored to dx (p >= W-1) or dcache; partial[row, j] = sum_p dy[b, p - j] xf[b, p]. The
        products of taps j < 4 add up in (BT, BC) tiles, summed over rows once at the end; taps
        j >= 4 (W > 4) are summed over rows at every step."""
        b = (tl.program_id(0) // NP).to(tl.int64)
        start = P0 + (tl.program_id(0) % NP) * (STEPS * BT)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        mc = cols < C
        js = tl.arange(0, WP)
        xb, cb, dyb, dxb = x + b * sxb, cache + b * (W - 1) * C, dy + b * T * C, dx + b * T * C
        dw = tl.zeros((WP, BC), dtype=ACC)
        a0 = tl.zeros((BT, BC), dtype=ACC)
        a1 = tl.zeros((BT, BC), dtype=ACC)
        a2 = tl.zeros((BT, BC), dtype=ACC)
        a3 = tl.zeros((BT, BC), dtype=ACC)
        for s in range(tl.minimum(STEPS, tl.cdiv(T + W - 1 - start, BT))):
            lo = start + s * BT
            p = lo + tl.arange(0, BT)
            mask = (p < T + W - 1)[:, None] & mc[None, :]
            xf = _load_xf(xb, cb, p, cols, mask, C, sxt, W, HAS_CACHE, ACC)
            acc = tl.zeros((BT, BC), dtype=ACC)
            for j in tl.static_range(W):
                td = p - j
                md = mask & ((td >= 0) & (td < T))[:, None]
                g = tl.load(dyb + td[:, None] * C + cols[None, :], mask=md, other=0.0).to(ACC)
                wj = tl.load(w + j * C + cols, mask=mc, other=0.0).to(ACC)
                acc += wj[None, :] * g
                if j == 0:
                    a0 += g * xf
                elif j == 1:
                    a1 += g * xf
                elif j == 2:
                    a2 += g * xf
                elif j == 3:
                    a3 += g * xf
                else:
                    dw += tl.where(js[:, None] == j, tl.sum(g * xf, axis=0)[None, :], 0.0)
            tx = p - (W - 1)
            tl.store(dxb + tx[:, None] * C + cols[None, :], acc.to(dx.dtype.element_ty), mask=mask & (tx >= 0)[:, None])
            if HAS_CACHE:
                if lo < W - 1:
                    tl.store(dcache + b * (W - 1) * C + p[:, None] * C + cols[None, :],
                             acc.to(dcache.dtype.element_ty), mask=mask & (tx < 0)[:, None])
        dw += tl.where(js[:, None] == 0, tl.sum(a0, axis=0)[None, :], 0.0)
        if W > 1:
            dw += tl.where(js[:, None] == 1, tl.sum(a1, axis=0)[None, :], 0.0)
        if W > 2:
            dw += tl.where(js[:, None] == 2, tl.sum(a2, axis=0)[None, :], 0.0)
        if W > 3:
            dw += tl.where(js[:, None] == 3, tl.sum(a3, axis=0)[None, :], 0.0)
        tl.store(partial + tl.program_id(0).to(tl.int64) * W * C + js[:, None] * C + cols[None, :], dw,
                 mask=(js[:, None] < W) & mc[None, :])
