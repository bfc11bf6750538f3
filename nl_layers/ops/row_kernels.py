"""Shared plumbing of the layers' row-wise Triton kernels (normalisation, the residual MLP memory's
factor stages and shared read): when "auto" may take them, how rows are tiled, what they accumulate in.

A row kernel's program covers ``BR`` rows of a padded width ``BD`` (the row width rounded up to a
power of two), about ``ROW_ELEMENTS`` elements, and accumulates in float32 (float64 for float64
inputs, which run forced, e.g. in the CPU interpreter's gradient checks).

Example:
    >>> row_blocks(96)  # 32 rows of 128 lanes a program
    (32, 128)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._kernels import triton_kernels_enabled

try:  # triton is optional: without it only the torch paths run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["KERNEL_DTYPES", "MAX_WIDTH", "ROW_ELEMENTS", "acc_type", "row_blocks", "takes"]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROW_ELEMENTS, MAX_WIDTH = 4096, 4096  # elements one program covers (rows x padded width); widest row the kernels take


def takes(ts) -> bool:
    """Whether "auto" may take a row kernel for the tensors ``ts`` (None entries ignored): triton
    imports, ``nl_layers.set_triton_kernels`` has not turned the kernels off, torch.compile is not
    tracing, and all are CUDA tensors of one float32/bfloat16/float16 dtype with rows no wider than
    ``MAX_WIDTH`` (the first tensor's last dimension)."""
    ts = [t for t in ts if t is not None]
    return (triton is not None and triton_kernels_enabled() and not torch.compiler.is_compiling()
            and ts[0].dtype in KERNEL_DTYPES and all(t.is_cuda and t.dtype == ts[0].dtype for t in ts)
            and ts[0].shape[-1] <= MAX_WIDTH)


def row_blocks(width: int) -> tuple[int, int]:
    """(rows a program covers, the padded width) for rows of ``width`` elements."""
    bd = 1 << max(0, max(width, 1) - 1).bit_length()
    return max(1, ROW_ELEMENTS // bd), bd


def acc_type(t: Tensor):
    """The kernels' accumulation type for ``t``: float64 for float64, else float32."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


if triton is not None:

    @triton.jit
    def row_tile(R, D, BR: tl.constexpr, BD: tl.constexpr):
        """(rows, lanes, row mask, element mask) of this program's BR rows of width D, R rows in all."""
        r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        c = tl.arange(0, BD)
        mr = r < R
        return r, c, mr, mr[:, None] & (c < D)[None, :]
