"""The element-wise stages of the residual MLP memory's gradient factors (silu), as Triton kernels
beside their torch references.

For a key k, value v and weights W_in, W_out, the factors node (``_SiluFactors`` of
``nl_layers.memory.mlp``) computes, between its three products z = W_in k, o = W_out h and
q = W_out^T e,

    forward:   s = sigmoid(z),  h = z s,  p = silu'(z) = s + h (1 - s)              (silu_parts)
               e = k + o - v,   l = e + o (dgd) or e                                (residual_parts)
               b = q p                                                              (slope_product)
               with the row norms ||h||, ||k||, ||l||, ||b|| (and ||e||, ||o|| with dgd)
    backward:  B' = B + c_b b,  dq = B' p,  dz0 = silu''(z) B' q = (s + (1 - 2 s) p) B' q   (hidden_grads)
               L' = L + c_l l,  L' + r e,  L' + r o (dgd)                           (output_grads)

for the incoming gradients B, L of b, l and the per-row scalars c_b, c_l, r (of the squared norms'
gradients). torch runs each stage as 4 to 9 passes over the rows (one per operator, the norms
apart); each kernel reads every input once and writes every output once. The norms are written
into planes of one buffer (the node's stacked norms: no stack; the node squares them at once).

``impl``: "triton" (CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``), "torch" (the
reference) or "auto" (the kernel for contiguous float32/bfloat16/float16 CUDA tensors of one dtype
when triton imports, torch.compile is not tracing and ``nl_layers.set_triton_kernels`` has not
turned it off).

Example:
    >>> z = torch.tensor([[0.0, 1.0]])
    >>> hh = torch.empty(1)
    >>> s, h, p = silu_parts(z, hh, impl="torch")
    >>> h, p, hh
    (tensor([[0.0000, 0.7311]]), tensor([[0.5000, 0.9277]]), tensor([0.7311]))
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

__all__ = ["IMPLS", "kernel_ok", "hidden_grads", "output_grads", "residual_parts", "silu_parts", "slope_product"]



def kernel_ok(*ts: Tensor | None) -> bool:
    """Whether "auto" takes the kernels for these tensors (None entries ignored; see
    :func:`~nl_layers.ops.row_kernels.takes`; every one contiguous)."""
    return takes(ts) and all(t is None or t.is_contiguous() for t in ts)


def _impl(impl: str, *ts: Tensor | None) -> str:
    return resolve_impl(impl, lambda: kernel_ok(*ts), triton is not None)


def _norm(x: Tensor, out: Tensor) -> None:
    """||x|| over the last dimension into out (one operator; a copy while compiling: no out= there)."""
    if torch.compiler.is_compiling() or out.dtype != x.dtype:
        out.copy_(torch.linalg.vector_norm(x, dim=-1))
    else:
        torch.linalg.vector_norm(x, dim=-1, out=out)


def _grid(x: Tensor) -> tuple[int, int, int, int, tuple[int]]:
    """(rows, width, rows per program, padded width, grid) of a kernel over x's rows."""
    width = x.shape[-1]
    br, bd = row_blocks(width)
    rows = x.numel() // max(width, 1)
    return rows, width, br, bd, (triton.cdiv(rows, br),)


def silu_parts(z: Tensor, hh: Tensor, impl: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """(s, h, p) = (sigmoid(z), z s, silu'(z)); ||h|| over the last dimension written into hh (z.shape[:-1])."""
    if _impl(impl, z, hh) == "torch":
        s = torch.sigmoid(z)
        h = z * s
        p = torch.addcmul(s, h, 1 - s)  # silu'(z) = s + z s (1 - s)
        _norm(h, hh)
        return s, h, p
    z = z.contiguous()
    s, h, p = (torch.empty_like(z) for _ in range(3))
    rows, width, br, bd, grid = _grid(z)
    if rows and width:
        _silu_parts_kernel[grid](z, s, h, p, hh, rows, width, BR=br, BD=bd, ACC=acc_type(z))
    elif rows:
        hh.zero_()
    return s, h, p


def residual_parts(k: Tensor, o: Tensor, v: Tensor, dgd: bool, n2: Tensor, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """(e, l) = (k + o - v, e + o with ``dgd`` else e); row norms into the planes of n2:
    n2[0] = ||k||, n2[2] = ||l|| and with ``dgd`` n2[4] = ||e||, n2[5] = ||o||."""
    if _impl(impl, k, o, v, n2) == "torch":
        e = k + o - v
        l = e + o if dgd else e
        for i, x in ((0, k), (2, l)) + (((4, e), (5, o)) if dgd else ()):
            _norm(x, n2[i])
        return e, l
    k, o, v = k.contiguous(), o.contiguous(), v.contiguous()
    e = torch.empty_like(k)
    l = torch.empty_like(k) if dgd else e
    rows, width, br, bd, grid = _grid(k)
    if rows and width:
        _residual_parts_kernel[grid](k, o, v, e, l, n2, rows, width, n2.stride(0), DGD=dgd, BR=br, BD=bd,
                                     ACC=acc_type(k))
    elif rows:
        n2.zero_()
    return e, l


def slope_product(q: Tensor, p: Tensor, bb: Tensor, impl: str = "auto") -> Tensor:
    """b = q p; ||b|| over the last dimension written into bb."""
    if _impl(impl, q, p, bb) == "torch":
        b = q * p
        _norm(b, bb)
        return b
    q, p = q.contiguous(), p.contiguous()
    b = torch.empty_like(q)
    rows, width, br, bd, grid = _grid(q)
    if rows and width:
        _slope_product_kernel[grid](q, p, b, bb, rows, width, BR=br, BD=bd, ACC=acc_type(q))
    elif rows:
        bb.zero_()
    return b


def hidden_grads(gb: Tensor | None, b: Tensor, p: Tensor, q: Tensor, s: Tensor, cb: Tensor | None,
                 impl: str = "auto") -> tuple[Tensor, Tensor]:
    """(B' p, (s + (1 - 2 s) p) B' q) with B' = gb + cb b (either term may be None, not both;
    cb: one scalar a row, shape (..., 1))."""
    if _impl(impl, gb, b, p, q, s, cb) == "torch":
        if cb is not None:
            gb = b * cb if gb is None else torch.addcmul(gb, b, cb)
        return gb * p, torch.addcmul(s, torch.rsub(s, 1, alpha=2), p).mul_(gb * q)  # silu''(z) = s + (1 - 2 s) p
    b, p, q, s = (t.contiguous() for t in (b, p, q, s))
    gq, gz = torch.empty_like(b), torch.empty_like(b)
    rows, width, br, bd, grid = _grid(b)
    if rows and width:
        _hidden_grads_kernel[grid](b if gb is None else gb.contiguous(), b, p, q, s, b if cb is None else cb.contiguous(),
                                   gq, gz, rows, width, HAS_G=gb is not None, HAS_C=cb is not None, BR=br, BD=bd,
                                   ACC=acc_type(b))
    return gq, gz


def output_grads(gl: Tensor | None, l: Tensor, e: Tensor, o: Tensor | None, cl: Tensor | None, r: Tensor | None,
                 impl: str = "auto") -> tuple[Tensor | None, Tensor | None]:
    """(L' + r e, L' + r o) with L' = gl + cl l; any term may be None (then it is left out), the
    second is None when o is None, each is None when all its terms are (cl, r: one scalar a row)."""
    if gl is None and cl is None and r is None:
        return None, None
    if _impl(impl, gl, l, e, o, cl, r) == "torch":
        if cl is not None:
            gl = l * cl if gl is None else torch.addcmul(gl, l, cl)
        base, t = gl, None
        if r is not None:
            base = e * r if base is None else torch.addcmul(base, e, r)
        if o is not None:
            t = gl
            if r is not None:
                t = o * r if t is None else torch.addcmul(t, o, r)
        return base, t
    l, e = l.contiguous(), e.contiguous()
    base = torch.empty_like(l)
    t = None if o is None else torch.empty_like(l)
    rows, width, br, bd, grid = _grid(l)
    if rows and width:
        _output_grads_kernel[grid](l if gl is None else gl.contiguous(), l, e, l if o is None else o.contiguous(),
                                   l if cl is None else cl.contiguous(), l if r is None else r.contiguous(),
                                   base, base if t is None else t, rows, width, HAS_G=gl is not None,
                                   HAS_C=cl is not None, HAS_R=r is not None, HAS_O=o is not None, BR=br, BD=bd,
                                   ACC=acc_type(l))
    return base, t


if triton is not None:
    from ..row_kernels import row_tile

    @triton.jit
    def _tile(R, D, BR: tl.constexpr, BD: tl.constexpr):
        """(row indices, element offsets, element mask, row mask) of this program's rows (contiguous rows)."""
        r, c, mr, mask = row_tile(R, D, BR, BD)
        return r, r[:, None] * D + c[None, :], mask, mr

    @triton.jit
    def _plus_scaled(g, x, c, r, at, mask, mr, HAS_G: tl.constexpr, HAS_C: tl.constexpr, BR: tl.constexpr,
                     BD: tl.constexpr, ACC: tl.constexpr):
        """The tile of g + c x (c one scalar a row), either term absent (zero) without its flag."""
        out = tl.zeros((BR, BD), dtype=ACC)
        if HAS_G:
            out += tl.load(g + at, mask=mask, other=0.0).to(ACC)
        if HAS_C:
            out += tl.load(x + at, mask=mask, other=0.0).to(ACC) * tl.load(c + r, mask=mr, other=0.0).to(ACC)[:, None]
        return out

    @triton.jit
    def _silu_parts_kernel(z, s, h, p, hh, R, D, BR: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
        r, at, mask, mr = _tile(R, D, BR, BD)
        zv = tl.load(z + at, mask=mask, other=0.0).to(ACC)
        sv = tl.sigmoid(zv)
        hv = zv * sv
        tl.store(s + at, sv.to(s.dtype.element_ty), mask=mask)
        tl.store(h + at, hv.to(h.dtype.element_ty), mask=mask)
        tl.store(p + at, (sv + hv * (1.0 - sv)).to(p.dtype.element_ty), mask=mask)
        tl.store(hh + r, tl.sqrt(tl.sum(hv * hv, axis=1)).to(hh.dtype.element_ty), mask=mr)

    @triton.jit
    def _residual_parts_kernel(k, o, v, e, l, n2, R, D, plane, DGD: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                               ACC: tl.constexpr):
        r, at, mask, mr = _tile(R, D, BR, BD)
        kv = tl.load(k + at, mask=mask, other=0.0).to(ACC)
        ov = tl.load(o + at, mask=mask, other=0.0).to(ACC)
        ev = kv + ov - tl.load(v + at, mask=mask, other=0.0).to(ACC)
        tl.store(e + at, ev.to(e.dtype.element_ty), mask=mask)
        ty = n2.dtype.element_ty
        tl.store(n2 + r, tl.sqrt(tl.sum(kv * kv, axis=1)).to(ty), mask=mr)
        if DGD:
            lv = ev + ov
            tl.store(l + at, lv.to(l.dtype.element_ty), mask=mask)
            tl.store(n2 + 2 * plane + r, tl.sqrt(tl.sum(lv * lv, axis=1)).to(ty), mask=mr)
            tl.store(n2 + 4 * plane + r, tl.sqrt(tl.sum(ev * ev, axis=1)).to(ty), mask=mr)
            tl.store(n2 + 5 * plane + r, tl.sqrt(tl.sum(ov * ov, axis=1)).to(ty), mask=mr)
        else:
            tl.store(n2 + 2 * plane + r, tl.sqrt(tl.sum(ev * ev, axis=1)).to(ty), mask=mr)

    @triton.jit
    def _slope_product_kernel(q, p, b, bb, R, D, BR: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
        r, at, mask, mr = _tile(R, D, BR, BD)
        bv = tl.load(q + at, mask=mask, other=0.0).to(ACC) * tl.load(p + at, mask=mask, other=0.0).to(ACC)
        tl.store(b + at, bv.to(b.dtype.element_ty), mask=mask)
        tl.store(bb + r, tl.sqrt(tl.sum(bv * bv, axis=1)).to(bb.dtype.element_ty), mask=mr)

    @triton.jit
    def _hidden_grads_kernel(gb, b, p, q, s, cb, gq, gz, R, D, HAS_G: tl.constexpr, HAS_C: tl.constexpr,
                             BR: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
        r, at, mask, mr = _tile(R, D, BR, BD)
        g = _plus_scaled(gb, b, cb, r, at, mask, mr, HAS_G, HAS_C, BR, BD, ACC)  # B' = B + c_b b
        pv = tl.load(p + at, mask=mask, other=0.0).to(ACC)
        sv = tl.load(s + at, mask=mask, other=0.0).to(ACC)
        qv = tl.load(q + at, mask=mask, other=0.0).to(ACC)
        tl.store(gq + at, (g * pv).to(gq.dtype.element_ty), mask=mask)
        tl.store(gz + at, ((sv + (1.0 - 2.0 * sv) * pv) * (g * qv)).to(gz.dtype.element_ty), mask=mask)

    @triton.jit
    def _output_grads_kernel(gl, l, e, o, cl, rr, base, t, R, D, HAS_G: tl.constexpr, HAS_C: tl.constexpr,
                             HAS_R: tl.constexpr, HAS_O: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
        r, at, mask, mr = _tile(R, D, BR, BD)
        g = _plus_scaled(gl, l, cl, r, at, mask, mr, HAS_G, HAS_C, BR, BD, ACC)  # L' = L + c_l l
        bv = g
        tv = g
        if HAS_R:
            rv = tl.load(rr + r, mask=mr, other=0.0).to(ACC)[:, None]
            bv = g + tl.load(e + at, mask=mask, other=0.0).to(ACC) * rv
            if HAS_O:
                tv = g + tl.load(o + at, mask=mask, other=0.0).to(ACC) * rv
        tl.store(base + at, bv.to(base.dtype.element_ty), mask=mask)
        if HAS_O:
            tl.store(t + at, tv.to(t.dtype.element_ty), mask=mask)
