"""Row-wise L2 normalisation, forward and backward, each one pass: Triton kernels beside torch references.

For rows u of width d (the last dimension),

    forward:   n = max(||u||, eps),   y = u / n
    backward:  du = (dy - [n > eps] y (y . dy)) / n     (a clamped norm is a constant: no y y^T term)

torch needs three operators forward (the norm, the clamp, a broadcast division that writes y) and
five backward (the product y * dy, its row sum, the mask, a broadcast multiply-add, a division),
each a pass over the rows; the kernels read each input once and write each output once. Inputs and
outputs may be any strided views with a unit last stride and at most three leading dimensions
(the layers' head-major and token-major layouts of one tensor: a permuted write costs nothing
extra), so a layer can normalise (B, T, H, d) rows straight into a (B, H, T, d) buffer.

``impl``: "triton" (CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``), "torch" (the
reference) or "auto" (the kernel for float32/bfloat16/float16 CUDA tensors of one dtype when
triton imports, torch.compile is not tracing and ``nl_layers.set_triton_kernels`` has not turned
it off).

Example:
    >>> u = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    >>> y, n = normalize_rows(u, 1e-6, impl="torch")
    >>> y, n[:, 0]
    (tensor([[0.6000, 0.8000],
            [0.0000, 0.0000]]), tensor([5.0000e+00, 1.0000e-06]))
    >>> normalize_rows_backward(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), y, n, 1e-6, impl="torch")
    tensor([[ 1.2800e-01, -9.6000e-02],
            [ 1.0000e+06,  1.0000e+06]])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._kernels import IMPLS, resolve_impl
from .row_kernels import acc_type, row_blocks, takes

try:  # triton is optional: without it only the torch path runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["IMPLS", "kernel_ok", "normalize_rows", "normalize_rows_backward", "normalize_rows_torch",
           "normalize_rows_backward_torch"]



def normalize_rows_torch(u: Tensor, eps: float, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The torch path of :func:`normalize_rows`."""
    n = torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(eps)
    return (u / n if out is None else torch.div(u, n, out=out)), n


def normalize_rows_backward_torch(g: Tensor, y: Tensor, n: Tensor, eps: float, out: Tensor | None = None) -> Tensor:
    """The torch path of :func:`normalize_rows_backward`."""
    dot = (y * g).sum(-1, keepdim=True).masked_fill_(n <= eps, 0.0)
    into = {} if out is None else {"out": out}
    return torch.addcmul(g, y, dot, value=-1.0, **into).div_(n)


def kernel_ok(*ts: Tensor) -> bool:
    """Whether "auto" takes the kernels for these tensors (see :func:`~nl_layers.ops.row_kernels.takes`)."""
    return takes(ts)


def _impl(impl: str, *ts: Tensor) -> str:
    return resolve_impl(impl, lambda: kernel_ok(*ts) and _fits(*ts), triton is not None)


def _fits(*ts: Tensor) -> bool:
    """Whether the kernels take these tensors as they are: at most three leading dimensions."""
    return all(t.dim() <= 4 for t in ts)


def _rows(t: Tensor) -> tuple[Tensor, list[int], list[int], bool]:
    """(t with a unit last stride and at most three leading dims, those sizes and their strides
    padded in front to three, whether that took a copy of t)."""
    copied = t.dim() > 4 or (t.shape[-1] > 1 and t.stride(-1) != 1)
    if copied:
        t = t.contiguous().view(-1, *t.shape[-3:]) if t.dim() > 4 else t.contiguous()
    pad = 4 - t.dim()
    return t, [1] * pad + list(t.shape[:-1]), [0] * pad + list(t.stride()[:-1]), copied


def normalize_rows(u: Tensor, eps: float, out: Tensor | None = None, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """(y, n): y = u / n with n = max(||u||, eps) over the last dimension, n of shape (*u.shape[:-1], 1).

    ``out``: where y goes (u's shape and dtype, any strides; e.g. a transposed view of a head-major
    buffer); a new contiguous tensor when None.
    """
    if _impl(impl, u, *(() if out is None else (out,))) == "torch":
        return normalize_rows_torch(u, eps, out)
    y = torch.empty_like(u, memory_format=torch.contiguous_format) if out is None else out
    n = torch.empty(*u.shape[:-1], 1, dtype=u.dtype, device=u.device)
    u4, size, su, _ = _rows(u)
    y4, _, sy, y_copied = _rows(y)
    rows, width = n.numel(), u.shape[-1]
    if rows and width:
        br, bd = row_blocks(width)
        _normalize_kernel[(triton.cdiv(rows, br),)](
            u4, y4, n, rows, width, size[1], size[2], *su, *sy, eps, BR=br, BD=bd, ACC=acc_type(u))
    elif rows:
        n.fill_(eps)
    if y_copied:  # out had no unit last stride (or over three leading dims): written to a copy
        y.copy_(y4.view(y.shape))
    return y, n


def normalize_rows_backward(g: Tensor, y: Tensor, n: Tensor, eps: float, out: Tensor | None = None,
                            impl: str = "auto") -> Tensor:
    """du = (g - [n > eps] y (y . g)) / n for the y, n of :func:`normalize_rows` and the gradient g of y.

    ``out``: where du goes (any strides); a new contiguous tensor when None.
    """
    if _impl(impl, g, y, n, *(() if out is None else (out,))) == "torch":
        return normalize_rows_backward_torch(g, y, n, eps, out)
    du = torch.empty(g.shape, dtype=g.dtype, device=g.device) if out is None else out
    g4, size, sg, _ = _rows(g)
    y4, _, sy, _ = _rows(y)
    d4, _, sd, du_copied = _rows(du)
    rows, width = n.numel(), g.shape[-1]
    if rows and width:
        br, bd = row_blocks(width)
        _normalize_backward_kernel[(triton.cdiv(rows, br),)](
            g4, y4, n.contiguous(), d4, rows, width, size[1], size[2], *sg, *sy, *sd, eps, BR=br, BD=bd, ACC=acc_type(g))
    if du_copied:
        du.copy_(d4.view(du.shape))
    return du


if triton is not None:
    from .row_kernels import row_tile

    @triton.jit
    def _offsets(r, s1, s2, st0, st1, st2):
        """Element offset of row r (a flat index over three leading dims of sizes (*, s1, s2))."""
        i2 = r % s2
        i1 = (r // s2) % s1
        i0 = r // (s2 * s1)
        return i0 * st0 + i1 * st1 + i2 * st2

    @triton.jit
    def _normalize_kernel(u, y, n, R, D, s1, s2, su0, su1, su2, sy0, sy1, sy2, eps,
                          BR: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
        """BR rows: n = max(||u||, eps), y = u / n."""
        r, c, mr, mask = row_tile(R, D, BR, BD)
        uv = tl.load(u + _offsets(r, s1, s2, su0, su1, su2)[:, None] + c[None, :], mask=mask, other=0.0).to(ACC)
        nv = tl.maximum(tl.sqrt(tl.sum(uv * uv, axis=1)), eps)
        tl.store(n + r, nv.to(n.dtype.element_ty), mask=mr)
        tl.store(y + _offsets(r, s1, s2, sy0, sy1, sy2)[:, None] + c[None, :], (uv / nv[:, None]).to(y.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _normalize_backward_kernel(g, y, n, du, R, D, s1, s2, sg0, sg1, sg2, sy0, sy1, sy2, sd0, sd1, sd2, eps,
                                   BR: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
        """BR rows: du = (g - [n > eps] y (y . g)) / n."""
        r, c, mr, mask = row_tile(R, D, BR, BD)
        gv = tl.load(g + _offsets(r, s1, s2, sg0, sg1, sg2)[:, None] + c[None, :], mask=mask, other=0.0).to(ACC)
        yv = tl.load(y + _offsets(r, s1, s2, sy0, sy1, sy2)[:, None] + c[None, :], mask=mask, other=0.0).to(ACC)
        nv = tl.load(n + r, mask=mr, other=1.0).to(ACC)
        dot = tl.where(nv > eps, tl.sum(yv * gv, axis=1), 0.0)
        out = (gv - yv * dot[:, None]) / nv[:, None]
        tl.store(du + _offsets(r, s1, s2, sd0, sd1, sd2)[:, None] + c[None, :], out.to(du.dtype.element_ty), mask=mask)
