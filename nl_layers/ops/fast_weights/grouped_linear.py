"""``grouped_linear``: G weight matrices, each applied to its own long stack of rows, with the
weight gradients split along the rows.

    y_g = x_g W_g^T,  x (G, M, d), W (G, o, d) -> y (G, M, o);
    dx_g = dy_g W_g,  dW_g = sum_m dy_gm x_gm^T = sum_s dy_gs^T x_gs  (rows m in S slices s).

A batched product over few groups with a long reduction (HOPE's four component memories reading
32 x 256 tokens: G = 4, M = 8192 x 4, o, d <= 192) leaves most of a GPU idle: cuBLAS gives a batched
GEMM one tile row per output tile and no split of the reduction, ~15 TFLOP/s on an H200. Splitting
the M rows into S slices as S x more batches and summing the S partial gradients takes the same
flops in G S batches. x may be one input shared by all groups (stride 0 along G, as from
``expand``); its gradient is then summed over the groups by ``expand``'s backward as usual.
An ``add`` term (G, M, o) joins the product (baddbmm), as :func:`apply_weight` does for one weight
matrix or one per copy: a residual sum at no extra operator.

Example:
    >>> x, w = torch.randn(3, 4096, 8, requires_grad=True), torch.randn(3, 5, 8, requires_grad=True)
    >>> grouped_linear(x, w).sum().backward()
    >>> bool(torch.allclose(w.grad, torch.ones(3, 4096, 5).transpose(1, 2) @ x.detach(), atol=1e-3))
    True
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..._function import Function

ROWS_PER_SLICE = 2048  # the reduction length of each partial weight gradient


def slices(rows: int) -> int:
    """Number of row slices S for the weight gradient (a divisor of ``rows``; 1 for short stacks)."""
    s = max(1, rows // ROWS_PER_SLICE)
    while rows % s:
        s -= 1
    return s


def weight_grad(gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_m gy[:, m]^T x[:, m] for gy (G, M, o), x (G, M, d): (G, o, d), in slices of the M rows."""
    g, m, o = gy.shape
    s = slices(m)
    if s == 1:
        return gy.transpose(1, 2) @ x
    gs = gy.reshape(g * s, m // s, o)
    xs = x.reshape(g * s, m // s, x.shape[-1])  # a copy only for a shared (stride-0) x
    return (gs.transpose(1, 2) @ xs).view(g, s, o, -1).sum(1)


def apply_weight(w: torch.Tensor, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ add, in the same operator: addmm for one weight w (o, i), baddbmm for one per copy (N, o, i))."""
    if add is None:
        return x @ w.transpose(-1, -2)
    if w.ndim == 2:
        flat = torch.addmm(add.reshape(-1, add.shape[-1]), x.reshape(-1, x.shape[-1]), w.t())
        return flat.view(*x.shape[:-1], w.shape[0])
    if w.ndim == 3 and x.ndim == 3:
        return torch.baddbmm(add, x, w.transpose(-1, -2))
    return add + x @ w.transpose(-1, -2)


class _GroupedLinear(Function):
    @staticmethod
    def forward(x, w, add):
        return x @ w.transpose(1, 2) if add is None else torch.baddbmm(add, x, w.transpose(1, 2))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:2])

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = (gy @ w.to(gy.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = weight_grad(gy, x.to(gy.dtype)).to(w.dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, gy if ctx.needs_input_grad[2] else None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """x (G, M, d) @ w (G, o, d)^T (+ add (G, M, o), in the same product) -> (G, M, o); the weight
    gradient split along M (module doc)."""
    return _GroupedLinear.apply(x, w, add)
