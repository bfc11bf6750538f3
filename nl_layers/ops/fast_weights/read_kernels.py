"""The element-wise pass of the token-form read's backward, as a Triton kernel beside its torch reference.

The read y = (M * (x R^T)) Lf (+ out) of :func:`~.scan.rank1_read_tokens` weights the scores
S = x R^T by a causal mixing matrix M (N, L, L), zero above the diagonal. Its backward needs,
from G = dy Lf^T (N, L, L),

    dS = G * M,        dM = G * S        (both zero above the diagonal),

two products of L x L tensors. :func:`read_grads` forms both in one pass that reads G, M and S on
and below the diagonal only (torch's path: two multiplications, each reading two L x L tensors
in full). Entries of M above the diagonal are taken as zero: neither read nor differentiated.
Given ``acc`` (a gradient of M from another read through the same M), dM = G * S + acc in the
same pass (no separate accumulation add).

``impl``: "triton" (CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``), "torch" (the
reference) or "auto" (the kernel for float32/bfloat16/float16 CUDA tensors of one dtype when
triton imports, torch.compile is not tracing and ``nl_layers.set_triton_kernels`` has not turned
it off).

Example:
    >>> g, m, s = torch.ones(1, 2, 2), torch.tensor([[[1.0, 0.0], [2.0, 3.0]]]), torch.full((1, 2, 2), 5.0)
    >>> ds, dm = read_grads(g, m, s, impl="torch")
    >>> ds[0], dm[0]
    (tensor([[1., 0.],
            [2., 3.]]), tensor([[5., 0.],
            [5., 5.]]))
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._kernels import triton_kernels_enabled

try:  # triton is optional: without it only the torch path runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["IMPLS", "kernel_ok", "read_grads", "read_grads_torch"]

IMPLS = ("auto", "triton", "torch")
TILE, WARPS = 64, 4  # one program: a TILE x TILE tile of every (L, L) matrix
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def read_grads_torch(g: Tensor, mixing: Tensor, scores: Tensor, acc: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The torch path of :func:`read_grads`."""
    causal = torch.ones(g.shape[-2:], dtype=torch.bool, device=g.device).tril()
    dm = g * scores if acc is None else torch.addcmul(acc, g, scores)
    return g * mixing.tril(), dm.masked_fill_(~causal, 0)


def kernel_ok(*ts: Tensor) -> bool:
    """Whether "auto" takes the kernel for these tensors."""
    return (triton is not None and triton_kernels_enabled() and not torch.compiler.is_compiling() and ts[0].dtype in _KERNEL_DTYPES
            and all(t.is_cuda and t.dtype == ts[0].dtype for t in ts))


def read_grads(g: Tensor, mixing: Tensor, scores: Tensor, impl: str = "auto", acc: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(G * M, G * S (+ acc)) on and below the diagonal, zero above, for (N, L, L) G, M, S (and acc;
    see the module doc)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if kernel_ok(g, mixing, scores) else "torch"
    if impl == "torch":
        return read_grads_torch(g, mixing, scores, acc)
    if triton is None:
        raise RuntimeError("read_grads(impl='triton') needs triton")
    b, length, _ = g.shape
    g, mixing, scores = (t.contiguous() for t in (g, mixing, scores))
    d_scores, d_mixing = torch.empty_like(g), torch.empty_like(g)
    if acc is not None:
        acc = acc.contiguous()
    if g.numel():
        nt = triton.cdiv(length, TILE)
        _read_grads_kernel[(b, nt, nt)](
            g, mixing, scores, g if acc is None else acc, d_scores, d_mixing, length,
            HAS_ACC=acc is not None, BT=TILE, num_warps=WARPS,
        )
    return d_scores, d_mixing


if triton is not None:

    @triton.jit
    def _read_grads_kernel(g, m, s, acc, ds, dm, L, HAS_ACC: tl.constexpr, BT: tl.constexpr):
        """One BT x BT tile: ds = g m and dm = g s (+ acc) on and below the diagonal, zeros above (a
        tile wholly above it loads nothing)."""
        base = tl.program_id(0).to(tl.int64) * L * L
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        c = tl.program_id(2) * BT + tl.arange(0, BT)
        inside = (t < L)[:, None] & (c < L)[None, :]
        keep = inside & (c[None, :] <= t[:, None])
        at = base + t[:, None] * L + c[None, :]
        gv = tl.load(g + at, mask=keep, other=0.0).to(tl.float32)
        mv = tl.load(m + at, mask=keep, other=0.0).to(tl.float32)
        sv = tl.load(s + at, mask=keep, other=0.0).to(tl.float32)
        tl.store(ds + at, (gv * mv).to(ds.dtype.element_ty), mask=inside)
        dmv = gv * sv
        if HAS_ACC:
            dmv += tl.load(acc + at, mask=keep, other=0.0).to(tl.float32)
        tl.store(dm + at, dmv.to(dm.dtype.element_ty), mask=inside)
