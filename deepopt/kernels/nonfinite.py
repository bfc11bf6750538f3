"""The non-finite check of the gradients as one Triton launch per dtype: ``found = 1`` where any
entry of any tensor is NaN or +-Inf, else 0 (a float32 one-element tensor on the tensors' device).

It reads every gradient once and stores nothing unless one is non-finite, where the torch form
(:func:`nonfinite_flag_torch`: ``torch._foreach_norm(ts, inf)``, then "are the norms finite")
launches a multi-tensor reduction and its clean-up, a stack and two more kernels. The fused steps
then read ``found`` in every kernel (torch's ``found_inf``), so a step checks its gradients with
no host synchronisation. :func:`nonfinite_flag_torch` is the reference the kernel is tested against.

Example:
    >>> import torch
    >>> nonfinite_flag_torch([torch.ones(3), torch.tensor([1.0, float("inf")])])
    tensor([1.])
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .launch import launch, on_device, tl_dtype
from .tables import RowSet

__all__ = ["kernel_nonfinite_flag", "nonfinite_flag_torch", "CHECK_CONFIGS", "KERNEL_DTYPES"]

#: (elements per program, warps) of the check by element size
CHECK_CONFIGS = {8: (2048, 8), 4: (4096, 8), 2: (8192, 8)}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def nonfinite_flag_torch(tensors: Sequence[Tensor]) -> Tensor:
    """The torch form of the check (one device): ``[1.0]`` if some max-norm is not finite, else
    ``[0.0]`` (empty tensors, which have no max-norm, are left out)."""
    ts = [t for t in tensors if t.numel()]
    if not ts:
        return torch.zeros(1, dtype=torch.float32, device=tensors[0].device)
    norms = torch._foreach_norm(ts, float("inf"))
    return (~torch.stack(norms).isfinite().all()).reshape(1).to(torch.float32)


def kernel_nonfinite_flag(tensors: Sequence[Tensor], found: Tensor | None = None) -> Tensor:
    """The check as Triton launches (one per dtype) into ``found`` (a zeroed float32 one-element
    tensor; made here when None). Tensors on one device, of :data:`KERNEL_DTYPES`; empty ones are
    skipped, non-dense ones read from contiguous copies."""
    device = tensors[0].device
    if found is None:
        found = torch.zeros(1, dtype=torch.float32, device=device)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            by_dtype.setdefault(t.dtype, []).append(t)
    from . import triton_lib

    with on_device(device):
        for dtype, ts in by_dtype.items():
            block, warps = CHECK_CONFIGS[dtype.itemsize]
            launch(triton_lib.nonfinite_kernel, RowSet([[t] for t in ts]), None, found=found, check=False,
                   G_DT=tl_dtype(dtype), block=block, num_warps=warps)
    return found
