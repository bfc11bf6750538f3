"""Small building blocks shared by the layers: causal depthwise convolution, SwiGLU, rotary embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._function import Function
from .ops.causal_conv import IMPLS as CONV_IMPLS, causal_conv1d
from .ops.normalize_kernels import normalize_rows, normalize_rows_backward


class _L2Normalize(Function):
    """y = x / d, d = max(||x||, eps) over the last dimension; hand-written backward (fewer passes
    over x than autograd's): dx = (dy - [||x|| > eps] y (y . dy)) / d. Each direction is one pass
    on CUDA (:mod:`~nl_layers.ops.normalize_kernels`)."""

    @staticmethod
    def forward(x, eps):
        return normalize_rows(x, eps)  # (y, d) in one pass on CUDA

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, d = output
        ctx.eps = inputs[1]
        ctx.save_for_backward(y, d)
        ctx.mark_non_differentiable(d)
        ctx.set_materialize_grads(False)  # no zero gradient for d

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, _):
        if gy is None:
            return None, None
        y, d = ctx.saved_tensors
        return normalize_rows_backward(gy, y, d, ctx.eps), None  # a clamped norm d is a constant


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / max(||x||, eps) over the last dimension (as ``F.normalize``, with a leaner backward).

    Example:
        >>> x = torch.randn(3, 5, dtype=torch.float64)
        >>> bool(torch.allclose(l2_normalize(x), torch.nn.functional.normalize(x, dim=-1, eps=1e-6)))
        True
    """
    return _L2Normalize.apply(x, eps)[0]


class _NormalizedHeads(Function):
    """x^ = normalize(x) and q = normalize(x W_q^T) per head (heads of width d), head-major, one node.

    Forward: q' = x W_q^T; per head y = u / n, n = max(||u||, eps), written straight into (B, H, T, d)
    (no cat, no permuted copy). Backward: du = (dy - [||u|| > eps] y (y . dy)) / n in (B, T, D),
    dW_q = dq'^T x, dx = dx^ + dq' W_q (the sum in the product: no accumulation add). Both
    normalisations are one pass each way on CUDA (:mod:`~nl_layers.ops.normalize_kernels`).
    """

    @staticmethod
    def forward(x, w_q, heads, eps):
        b, t, dim = x.shape
        flat = x.reshape(b * t, dim)
        ys, norms = [], []
        for u in (flat.view(b, t, dim), (flat @ w_q.t()).view(b, t, dim)):  # x as the (B T, D) copy, if one was made
            u = u.view(b, t, heads, dim // heads)
            if torch.compiler.is_compiling():  # no out= (torch.compile traces this path)
                y, n = normalize_rows(u, eps)
                y = y.transpose(1, 2).contiguous()
            else:
                y = u.new_empty(b, heads, t, dim // heads)
                n = normalize_rows(u, eps, out=y.transpose(1, 2))[1]  # normalised and head-major in one pass
            ys.append(y.view(b * heads, t, dim // heads))
            norms.append(n)
        return ys[0], ys[1], norms[0], norms[1], flat

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.eps, ctx.shape = inputs[3], inputs[0].shape
        ctx.mark_non_differentiable(*output[2:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[4], inputs[1], *output[:4])  # x as (B T, D) (the copy forward made, if any)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_x, g_q, *_):
        flat, w_q, y_x, y_q, n_x, n_q = ctx.saved_tensors
        b, t, dim = ctx.shape
        heads = n_x.shape[2]
        grads = []
        for g, y, n in ((g_x, y_x, n_x), (g_q, y_q, n_q)):
            if g is None:
                grads.append(None)
                continue
            g, y = (z.view(b, heads, t, -1).transpose(1, 2) for z in (g, y))  # (B, T, H, d) views
            if torch.compiler.is_compiling():
                du = normalize_rows_backward(g, y, n, ctx.eps).contiguous()
            else:
                du = normalize_rows_backward(g, y, n, ctx.eps, out=flat.new_empty(b, t, heads, dim // heads))
            grads.append(du.view(b * t, dim))
        du_x, du_q = grads
        gx = gw = None
        if du_q is not None:
            if ctx.needs_input_grad[1]:
                gw = du_q.t() @ flat.to(du_q.dtype)
            if ctx.needs_input_grad[0]:
                w = w_q.to(du_q.dtype)
                if du_x is None or du_x.dtype != du_q.dtype:  # (autocast may leave x and q' at two precisions)
                    gx = du_q @ w if du_x is None else du_x + du_q @ w
                else:
                    gx = torch.addmm(du_x, du_q, w) if torch.compiler.is_compiling() else du_x.addmm_(du_q, w)  # du_x is ours
        elif du_x is not None:
            gx = du_x
        return None if gx is None else gx.view(b, t, dim).to(flat.dtype), None if gw is None else gw.to(w_q.dtype), None, None


def normalized_heads(x: torch.Tensor, w_q: torch.Tensor, heads: int, eps: float = 1e-6):
    """(normalize(x), normalize(x W_q^T)) per head, each head-major (B*H, T, d), for x (B, T, H*d):
    as ``l2_normalize(torch.cat([x, x @ w_q.T], -1).view(B, T, 2, H, d))`` permuted to (2, B*H, T, d),
    without the cat or the permuted copy (:class:`_NormalizedHeads`).

    Example:
        >>> x, w = torch.randn(2, 5, 8), torch.randn(8, 8)
        >>> xh, q = normalized_heads(x, w, heads=2)
        >>> ref = F.normalize((x @ w.T).view(2, 5, 2, 4), dim=-1).transpose(1, 2).reshape(4, 5, 4)
        >>> xh.shape, bool(torch.allclose(q, ref, atol=1e-6))
        (torch.Size([4, 5, 4]), True)
    """
    return _NormalizedHeads.apply(x, w_q, heads, eps)[:2]


class _SquaredNorm(Function):
    """||x||^2 over the last dimension: one reduction forward, one pass backward (dx = 2 g x)."""

    @staticmethod
    def forward(x):
        return torch.linalg.vector_norm(x, dim=-1).square()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return x * (2 * g)[..., None]


def squared_norm(x: torch.Tensor) -> torch.Tensor:
    """sum_i x_i^2 over the last dimension (``x.square().sum(-1)`` in one pass forward and one backward).

    Example:
        >>> squared_norm(torch.tensor([[3.0, 4.0]]))
        tensor([25.])
    """
    return _SquaredNorm.apply(x)


class _FactoredGradSqNorm(Function):
    """g = sum_i ||l_i||^2 ||r_i||^2 over the last dimension, for rank-one gradients l_i r_i^T
    (||l r^T||_F^2 = ||l||^2 ||r||^2), taking the factors (l_1, r_1, l_2, r_2, ...) at once, and
    optionally rho = sum_{j in R} ||x_j||^2 over the tensors x_j picked by ``res`` (indices into the
    factors followed by ``extra`` further tensors: a residual that is also a factor costs no norm).

    Forward: the norms stacked as n = (||r_1||, ||l_1||, ||r_2||, ||l_2||, ..., extras), s = n^2, the
    pairs' rows viewed (F, 2, ...), g = sum_i s_i0 s_i1 and rho a sum of rows of s (2F + E + 4
    operators, +1 for rho unless it is a single row). Backward, from dg/dl_i = 2 ||r_i||^2 l_i,
    dg/dr_i = 2 ||l_i||^2 r_i and drho/dx_j = 2 x_j: c = 2 dg s (one tensor for all factors, the
    swapped order putting ||r_i||^2 next to l_i), c_j += 2 drho for a factor in R, dl_i = c_i0 l_i,
    dr_i = c_i1 r_i, dx = 2 drho x for an extra. Once differentiable: s is saved, not recomputed.
    """

    @staticmethod
    def forward(res, extra, *tensors):
        pairs = len(tensors) - extra
        swapped = [x for pair in zip(tensors[1:pairs:2], tensors[0:pairs:2]) for x in pair] + list(tensors[pairs:])
        s = torch.stack([torch.linalg.vector_norm(x, dim=-1) for x in swapped]).square()
        g = s[:pairs].view(-1, 2, *s.shape[1:]).prod(1).sum(0)
        rows = [j ^ 1 if j < pairs else j for j in res]  # the row of s holding ||x_j||^2
        if not rows:
            rho = None
        elif len(rows) == 1:
            rho = s[rows[0]]
        elif rows == list(range(rows[0], rows[0] + len(rows))):
            rho = s[rows[0] : rows[-1] + 1].sum(0)  # adjacent rows: a view, one sum
        else:
            rho = s[rows].sum(0)
        return g, rho, s

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.res, ctx.extra = inputs[0], inputs[1]
        ctx.save_for_backward(*inputs[2:], output[2])
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable
    def backward(ctx, g, grho, _):
        *tensors, s = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        pairs = len(tensors) - ctx.extra
        out = [None] * len(tensors)
        if g is not None:
            c = s[:pairs] * (2 * g)  # c[2i] = 2 g ||r_i||^2 (for l_i), c[2i + 1] = 2 g ||l_i||^2 (for r_i)
        if grho is not None:
            for j in ctx.res:
                if j >= pairs:
                    out[j] = tensors[j] * (2 * grho)[..., None] if needs[j] else None
                elif g is not None:
                    c[j].add_(grho, alpha=2.0)
                else:
                    out[j] = tensors[j] * (2 * grho)[..., None] if needs[j] else None
        if g is not None:
            for j in range(pairs):
                if needs[j]:
                    out[j] = tensors[j] * c[j, ..., None]
        return None, None, *out


def factored_grad_sq_norm(pairs, residuals=None):
    """sum over (l, r) in ``pairs`` of ||l||^2 ||r||^2 (last dimension): the squared Frobenius norm of
    the per-token gradient sum_i l_i r_i^T summed over matrices, i.e. ``sum(squared_norm(l) *
    squared_norm(r) for l, r in pairs)`` in one autograd node (fewer operators forward and
    backward). Factors whose leading shapes differ (broadcast) take that expression.

    ``residuals`` (a list of tensors): also return ``sum(squared_norm(e) for e in residuals)``, from
    the same node ((g, rho)); a residual that is one of the factors (the same tensor object) reuses
    its norm.

    Example:
        >>> l, r = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 1.0, 1.0]])
        >>> factored_grad_sq_norm([(l, r), (r, r)])
        tensor([84.])
        >>> factored_grad_sq_norm([(l, r)], residuals=[l, r])
        (tensor([75.]), tensor([28.]))
    """
    pairs = list(pairs)
    factors = [x for pair in pairs for x in pair]
    extras, res = [], []
    for e in residuals or ():
        j = next((i for i, x in enumerate(factors) if x is e), None)
        if j is None:
            j = len(factors) + len(extras)
            extras.append(e)
        res.append(j)
    if len({x.shape[:-1] for x in factors + extras}) != 1:
        g = sum(squared_norm(left) * squared_norm(right) for left, right in pairs)
        return g if residuals is None else (g, sum(squared_norm(e) for e in residuals))
    g, rho, _ = _FactoredGradSqNorm.apply(tuple(res), len(extras), *factors, *extras)
    return g if residuals is None else (g, rho)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H*d) -> (B, H, T, d)."""
    b, t, hd = x.shape
    return x.view(b, t, heads, hd // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) -> (B, T, H*d)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class CausalDepthwiseConv1d(nn.Module):
    """Depthwise convolution over time that only looks back: y_t = sum_j w_j * x_{t-j}, j < width.

    ``forward(x, cache)`` takes (B, T, C) and the last ``width - 1`` inputs of the previous call
    (zeros at the start of a sequence) and returns ``(y, new_cache)``, so a sequence can be streamed.
    The filter starts as the identity (y = x), so the convolution only mixes once trained.
    ``impl``: "auto" (Triton kernels on CUDA, else torch), "triton" or "torch"; see
    :func:`nl_layers.ops.causal_conv.causal_conv1d`.
    """

    def __init__(self, channels: int, width: int = 4, impl: str = "auto"):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if impl not in CONV_IMPLS:
            raise ValueError(f"impl must be one of {CONV_IMPLS}, got {impl!r}")
        self.width = width
        self.impl = impl
        self.weight = nn.Parameter(torch.zeros(channels, 1, width))
        with torch.no_grad():
            self.weight[:, 0, -1] = 1.0

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return causal_conv1d(x, self.weight, cache, impl=self.impl)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def rotary_cos_sin(positions: torch.Tensor, dim: int, base: float = 10000.0, dtype=torch.float32):
    """cos and sin, each (T, dim/2), of the rotary angles p * base^(-2i/dim), formed in float64."""
    inv = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    angles = positions.to(torch.float64)[:, None] * inv[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary(x: torch.Tensor, positions: torch.Tensor | None = None, base: float = 10000.0, cos_sin=None) -> torch.Tensor:
    """Rotary position embedding of (B, H, T, d), d even: dimensions (2i, 2i+1) turn by the angle
    p * base^(-2i/d) at integer ``positions`` (T,), or by the given ``cos_sin`` tables (T, d/2)."""
    cos, sin = cos_sin if cos_sin is not None else rotary_cos_sin(positions, x.shape[-1], base)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)


class Rotary(nn.Module):
    """Rotary position embedding with a precomputed table for positions below ``cached`` (default 4096).

    ``forward(x, start)`` rotates (B, H, T, d) at positions start..start+T-1. The cos/sin table is
    a non-persistent buffer (not in the state dict; it moves with the module), computed once in
    float64 and stored in float32, so a forward only slices it: under torch.compile no trigonometry
    is fused into (and repeated in) the attention kernels. Positions past the table, and float64
    inputs, compute their angles directly (same values, up to float32 rounding of the table).

    Example:
        >>> rope = Rotary(dim=8)
        >>> x = torch.randn(1, 2, 5, 8)
        >>> bool(torch.allclose(rope(x, 3), rotary(x, torch.arange(3, 8)), atol=1e-6))
        True
    """

    def __init__(self, dim: int, base: float = 10000.0, cached: int = 4096):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary embedding needs an even dimension, got {dim}")
        self.dim, self.base = dim, base
        cos, sin = rotary_cos_sin(torch.arange(cached), dim, base)
        self.register_buffer("table", torch.stack([cos, sin], dim=-1), persistent=False)  # (cached, dim/2, 2)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        t = x.shape[-2]
        if x.dtype != torch.float64 and start + t <= self.table.shape[0]:
            cos_sin = self.table[start : start + t].unbind(-1)
        else:
            cos_sin = rotary_cos_sin(torch.arange(start, start + t, device=x.device), self.dim, self.base)
        return rotary(x, cos_sin=cos_sin)
