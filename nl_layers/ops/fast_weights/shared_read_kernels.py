"""The activation pass of the shared residual-MLP read (silu), token-major in, memory-major out, as
Triton kernels beside their torch references.

The read of G memories from one input x (``shared_silu_read`` of ``nl_layers.memory.mlp``) forms
z = x [W_in,1; ...; W_in,G]^T in one product, token-major (M, G h) (rows possibly padded, with R
more columns after them), and needs h = silu(z) memory-major (G, M, h) for its per-memory
products; backward, dz = silu'(z) dh from dh memory-major into a token-major buffer:

    forward:   h[g, m] = silu(z[m, g])
    backward:  dz[m, g] = dh[g, m] sigmoid(z) (1 + z (1 - sigmoid(z)))      (z[m, g]: the row slice g h : (g + 1) h)

The read's last R memories may be read only through head vectors (dot products c_r = y_r . w_r,
whose h_r . u_r part the forward kernel sums from the h it stores, ``dots``): their dh is then the
outer product a_r b_r^T (a = dc (R, M), b = W_out,r^T w_r (R, h)), which the
backward kernel forms in registers (``outer``) instead of reading an (R, M, h) tensor, and the
columns after dz in the caller's buffer (dc^T, then zero padding) come from the same launch
(``tail``).

torch does each as one element-wise operator over permuted views, which runs its generic strided
loop (an index computation per element, ~2 TB/s on an H100); the kernels move (BM, h) tiles of
rows, every row a contiguous run of h elements on both sides.

``impl``: "triton" (CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``), "torch" (the
reference) or "auto" (the kernels for float32/bfloat16/float16 CUDA tensors of one dtype with
unit last strides when triton imports, torch.compile is not tracing and
``nl_layers.set_triton_kernels`` has not turned it off).

Example:
    >>> z = torch.tensor([[0.0, 1.0, -1.0, 2.0]]).view(1, 2, 2)  # M = 1, G = 2, h = 2
    >>> silu_memory_major(z, impl="torch")[:, 0]
    tensor([[ 0.0000,  0.7311],
            [-0.2689,  1.7616]])
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._kernels import IMPLS, resolve_impl
from ..row_kernels import acc_type, row_blocks, takes

try:  # triton is optional: without it only the torch path runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["IMPLS", "kernel_ok", "silu_memory_major", "silu_backward_token_major"]



def kernel_ok(*ts: Tensor) -> bool:
    """Whether "auto" takes the kernels for these tensors (see :func:`~nl_layers.ops.row_kernels.takes`;
    every last stride 1)."""
    return takes(ts) and all(t.stride(-1) == 1 for t in ts if t is not None)


def _impl(impl: str, *ts: Tensor) -> str:
    return resolve_impl(impl, lambda: kernel_ok(*ts), triton is not None)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def silu_memory_major(z: Tensor, out: Tensor | None = None, impl: str = "auto",
                      dots: tuple[Tensor, Tensor] | None = None):
    """silu(z) for z (M, G, h) (any strides), as (G, M, h): into ``out`` (that shape, any strides
    with a unit last one) or a new contiguous tensor.

    ``dots = (u, base)``, u (R, h), base (R, M) (any strides): also the last R memories' dot products
    c_r = base_r + h_r u_r (R, M), from the same pass; then returns (h, c).

    Example:
        >>> z, u, base = torch.randn(3, 2, 4), torch.randn(1, 4), torch.randn(1, 3)
        >>> h, c = silu_memory_major(z, dots=(u, base), impl="torch")
        >>> bool(torch.allclose(c, base + (h[1:] @ u[:, :, None])[..., 0]))
        True
    """
    m, g, hid = z.shape
    h = z.new_empty(g, m, hid) if out is None else out
    u, base = dots if dots is not None else (None, None)
    if _impl(impl, z, h, u) == "torch" or (base is not None and (base.dtype, base.device) != (z.dtype, z.device)):
        h = torch.ops.aten.silu.out(z, out=h.transpose(0, 1)).transpose(0, 1)
        if dots is None:
            return h
        return h, torch.baddbmm(base[:, :, None], h[g - u.shape[0]:], u[:, :, None])[..., 0]
    z = _unit_last(z)
    r = 0 if dots is None else u.shape[0]
    c = z.new_empty(r, m) if dots is not None else h  # (without dots: a pointer the kernel never writes)
    u = _unit_last(u) if dots is not None else h
    base = base if dots is not None else h
    if h.numel():
        br, bd = row_blocks(hid)
        _silu_kernel[(triton.cdiv(m, br), g)](z, h, u, base, c, m, hid, g - r, z.stride(0), z.stride(1), h.stride(0),
                                              h.stride(1), u.stride(0), base.stride(0), base.stride(-1),
                                              BR=br, BD=bd, ACC=acc_type(z))
    return h if dots is None else (h, c)


def silu_backward_token_major(dh: Tensor, z: Tensor, out: Tensor | None = None, impl: str = "auto",
                              outer: tuple[Tensor, Tensor] | None = None,
                              tail: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
    """dz = silu'(z) dh for dh (G, M, h) and z (M, G, h) (any strides), as (M, G, h): into ``out``
    (that shape, any strides with a unit last one) or a new contiguous tensor.

    ``outer = (a, b)``, a (R, M), b (R, h): the last R memories' dh is a_r b_r^T (dh then holds only
    the first G - R). ``tail = (t, c)``: also write t (M, T) (the columns after dz in the caller's
    buffer) with c^T (c (R', M), R' <= T; None: none) and zeros after it.

    Example (the outer form equals the full dh):
        >>> z, dh = torch.randn(3, 2, 4), torch.randn(1, 3, 4)
        >>> a, b = torch.randn(1, 3), torch.randn(1, 4)
        >>> full = torch.cat([dh, a[:, :, None] * b[:, None, :]])
        >>> bool(torch.allclose(silu_backward_token_major(dh, z, outer=(a, b), impl="torch"),
        ...                     silu_backward_token_major(full, z, impl="torch")))
        True
    """
    m, g, hid = z.shape
    dz = z.new_empty(m, g, hid) if out is None else out
    a, b = outer if outer is not None else (None, None)
    t, c = tail if tail is not None else (None, None)
    if _impl(impl, dh, z, dz, a, b, t, c) == "torch":
        if a is not None:
            dh = torch.cat([dh, (a[:, :, None] * b[:, None, :]).to(dh.dtype)])
        torch.ops.aten.silu_backward.grad_input(dh.transpose(0, 1), z, grad_input=dz)
        if t is not None:
            r = 0 if c is None else c.shape[0]
            if r:
                t[:, :r] = c.t()
            t[:, r:].zero_()
        return dz
    dh, z = _unit_last(dh), _unit_last(z)
    b = None if b is None else _unit_last(b)
    p = dh.shape[0]
    width = 0 if t is None else t.shape[1]
    rc = 0 if c is None else c.shape[0]
    a = a if a is not None else dh  # (pointers the kernel never reads without OUTER / TAIL)
    b = b if b is not None else dh
    t = t if t is not None else dz
    c = c if c is not None else dz
    if m:
        br, bd = row_blocks(hid)
        bt = 1 << max(0, max(width, 1) - 1).bit_length()
        _silu_backward_kernel[(triton.cdiv(m, br), g + (width > 0))](
            dh, z, dz, a, b, t, c, m, hid, p, g, width, rc,
            dh.stride(0), dh.stride(1), z.stride(0), z.stride(1), dz.stride(0), dz.stride(1),
            a.stride(0), a.stride(-1), b.stride(0), t.stride(0), t.stride(-1), c.stride(0), c.stride(-1),
            BR=br, BD=bd, BT=bt, ACC=acc_type(z))
    return dz


if triton is not None:

    @triton.jit
    def _silu_kernel(z, h, u, base, cout, M, H, P, szm, szg, shg, shm, sur, sbr, sbm, BR: tl.constexpr,
                     BD: tl.constexpr, ACC: tl.constexpr):
        """Rows m of one BR block, memory g = program_id(1): h[g, m] = silu(z[m, g]); for g >= P (the
        heads' memories; P = G without them) also c[g - P, m] = base[g - P, m] + h[g, m] . u[g - P]."""
        m = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        g = tl.program_id(1).to(tl.int64)
        c = tl.arange(0, BD)
        mask = (m < M)[:, None] & (c < H)[None, :]
        zv = tl.load(z + m[:, None] * szm + g * szg + c[None, :], mask=mask, other=0.0).to(ACC)
        hv = (zv * tl.sigmoid(zv)).to(h.dtype.element_ty)
        tl.store(h + g * shg + m[:, None] * shm + c[None, :], hv, mask=mask)
        if g >= P:
            uv = tl.load(u + (g - P) * sur + c, mask=c < H, other=0.0).to(ACC)
            bv = tl.load(base + (g - P) * sbr + m * sbm, mask=m < M, other=0.0).to(ACC)
            dot = bv + tl.sum(hv.to(ACC) * uv[None, :], 1)  # h as stored (its dtype's rounding), as the torch path
            tl.store(cout + (g - P) * M + m, dot.to(cout.dtype.element_ty), mask=m < M)

    @triton.jit
    def _silu_backward_kernel(dh, z, dz, a, b, t, cc, M, H, P, G, T, RC, sdg, sdm, szm, szg, som, sog, sar, sam, sbr,
                              stm, stc, scr, scm, BR: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
                              ACC: tl.constexpr):
        """Rows m of one BR block, memory g = program_id(1): dz[m, g] = dh[g, m] silu'(z[m, g]), with
        dh[g, m] = a[g - P, m] b[g - P] for g >= P (the outer form); program g = G (a tail):
        t[m] = (c[0, m], ..., c[RC - 1, m], 0, ...)."""
        m = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        g = tl.program_id(1).to(tl.int64)
        if g == G:  # (a program G exists only with a tail; names of its own: a compiled if joins those of both sides)
            ct = tl.arange(0, BT)
            tmask = (m < M)[:, None] & (ct < T)[None, :]
            tv = tl.load(cc + ct[None, :] * scr + m[:, None] * scm, mask=tmask & (ct < RC)[None, :], other=0.0)
            tl.store(t + m[:, None] * stm + ct[None, :] * stc, tv.to(t.dtype.element_ty), mask=tmask)
        else:
            c = tl.arange(0, BD)
            mask = (m < M)[:, None] & (c < H)[None, :]
            zv = tl.load(z + m[:, None] * szm + g * szg + c[None, :], mask=mask, other=0.0).to(ACC)
            if g >= P:  # (P = G without the outer form)
                av = tl.load(a + (g - P) * sar + m * sam, mask=m < M, other=0.0).to(ACC)
                bv = tl.load(b + (g - P) * sbr + c, mask=c < H, other=0.0).to(ACC)
                gv = av[:, None] * bv[None, :]
            else:
                gv = tl.load(dh + g * sdg + m[:, None] * sdm + c[None, :], mask=mask, other=0.0).to(ACC)
            s = tl.sigmoid(zv)
            tl.store(dz + m[:, None] * som + g * sog + c[None, :],
                     (gv * s * (1.0 + zv * (1.0 - s))).to(dz.dtype.element_ty), mask=mask)
