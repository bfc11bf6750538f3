"""The activation pass of the shared residual-MLP read (silu), token-major in, memory-major out, as
Triton kernels beside their torch references.

The read of G memories from one input x (``shared_silu_read`` of ``nl_layers.memory.mlp``) forms
z = x [W_in,1; ...; W_in,G]^T in one product, token-major (M, G h) (rows possibly padded, with R
more columns after them), and needs h = silu(z) memory-major (G, M, h) for its per-memory
products; backward, dz = silu'(z) dh from dh memory-major into a token-major buffer:

    forward:   h[g, m] = silu(z[m, g])
    backward:  dz[m, g] = dh[g, m] sigmoid(z) (1 + z (1 - sigmoid(z)))      (z[m, g]: the row slice g h : (g + 1) h)

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
    return takes(ts) and all(t.stride(-1) == 1 for t in ts)


def _impl(impl: str, *ts: Tensor) -> str:
    return resolve_impl(impl, lambda: kernel_ok(*ts), triton is not None)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def silu_memory_major(z: Tensor, out: Tensor | None = None, impl: str = "auto") -> Tensor:
    """silu(z) for z (M, G, h) (any strides), as (G, M, h): into ``out`` (that shape, any strides
    with a unit last one) or a new contiguous tensor."""
    m, g, hid = z.shape
    h = z.new_empty(g, m, hid) if out is None else out
    if _impl(impl, z, h) == "torch":
        return torch.ops.aten.silu.out(z, out=h.transpose(0, 1)).transpose(0, 1)
    z = _unit_last(z)
    if h.numel():
        br, bd = row_blocks(hid)
        _silu_kernel[(triton.cdiv(m, br), g)](z, h, m, hid, z.stride(0), z.stride(1), h.stride(0), h.stride(1),
                                              BR=br, BD=bd, ACC=acc_type(z))
    return h


def silu_backward_token_major(dh: Tensor, z: Tensor, out: Tensor | None = None, impl: str = "auto") -> Tensor:
    """dz = silu'(z) dh for dh (G, M, h) and z (M, G, h) (any strides), as (M, G, h): into ``out``
    (that shape, any strides with a unit last one) or a new contiguous tensor."""
    m, g, hid = z.shape
    dz = z.new_empty(m, g, hid) if out is None else out
    if _impl(impl, dh, z, dz) == "torch":
        return torch.ops.aten.silu_backward.grad_input(dh.transpose(0, 1), z, grad_input=dz)
    dh, z = _unit_last(dh), _unit_last(z)
    if dz.numel():
        br, bd = row_blocks(hid)
        _silu_backward_kernel[(triton.cdiv(m, br), g)](
            dh, z, dz, m, hid, dh.stride(0), dh.stride(1), z.stride(0), z.stride(1), dz.stride(0), dz.stride(1),
            BR=br, BD=bd, ACC=acc_type(z))
    return dz


if triton is not None:

    @triton.jit
    def _silu_kernel(z, h, M, H, szm, szg, shg, shm, BR: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
        """Rows m of one BR block, memory program_id(1): h[g, m] = silu(z[m, g])."""
        m = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        g = tl.program_id(1).to(tl.int64)
        c = tl.arange(0, BD)
        mask = (m < M)[:, None] & (c < H)[None, :]
        zv = tl.load(z + m[:, None] * szm + g * szg + c[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(h + g * shg + m[:, None] * shm + c[None, :], (zv * tl.sigmoid(zv)).to(h.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_backward_kernel(dh, z, dz, M, H, sdg, sdm, szm, szg, som, sog, BR: tl.constexpr, BD: tl.constexpr,
                              ACC: tl.constexpr):
        """Rows m of one BR block, memory program_id(1): dz[m, g] = dh[g, m] silu'(z[m, g])."""
        m = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        g = tl.program_id(1).to(tl.int64)
        c = tl.arange(0, BD)
        mask = (m < M)[:, None] & (c < H)[None, :]
        zv = tl.load(z + m[:, None] * szm + g * szg + c[None, :], mask=mask, other=0.0).to(ACC)
        gv = tl.load(dh + g * sdg + m[:, None] * sdm + c[None, :], mask=mask, other=0.0).to(ACC)
        s = tl.sigmoid(zv)
        tl.store(dz + m[:, None] * som + g * sog + c[None, :], (gv * s * (1.0 + zv * (1.0 - s))).to(dz.dtype.element_ty),
                 mask=mask)
