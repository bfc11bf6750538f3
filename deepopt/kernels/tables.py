"""Multi-tensor launch tables: one Triton launch over a whole list of tensors.

A fused optimizer step touches, per parameter ``i``, a few tensors of the same number of elements
(the parameter, its gradient, its state buffers): the *columns* of row ``i``. A launch covers every
row at once: the rows are cut into blocks of ``BLOCK`` elements and program ``b`` handles block
``b``; three small device tables tell it where to go:

    ptrs[i, c]       where column c of row i starts: its byte offset from the table's own address
                     (so the kernel's pointers derive from an argument known to be 16-byte aligned)
    numel[i]         the row's number of elements
    blk_row[b], blk_start[b]   the row of block b and its first element

Per-row scalars that change every step (bias corrections, "first step" flags) go in a float32
table ``scal[i, k]`` built on the host (one small copy per step); hyperparameters shared by the
whole list are plain kernel arguments. The address tables are cached by the tensors' addresses,
so a training loop with stable buffers builds them once.

Kernels read memory in storage order, so all columns of a row must share one dense layout; a row
whose tensors do not (a sliced parameter, a gradient with other strides) is computed on contiguous
copies and copied back (:meth:`RowSet.prepare`).

Example:
    >>> import torch
    >>> from deepopt.kernels.tables import RowSet
    >>> rows = RowSet([[torch.zeros(5), torch.ones(5)], [torch.zeros(3, 4), torch.ones(3, 4)]], mutable=(0,))
    >>> t = rows.tables(block=4)
    >>> t.blk_row.tolist(), t.blk_start.tolist()
    ([0, 0, 1, 1, 1], [0, 4, 0, 4, 8])
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["RowSet", "Tables", "same_dense_layout", "scalar_table"]

_CACHE: "OrderedDict[tuple, Tables]" = OrderedDict()
_CACHE_SIZE = 64


@dataclass
class Tables:
    """Device tables of one launch (see the module docstring)."""

    ptrs: Tensor
    numel: Tensor
    blk_row: Tensor
    blk_start: Tensor
    #: every address 16-byte aligned and every numel a multiple of 16 (kernels then vectorize)
    aligned: bool = False

    @property
    def grid(self) -> tuple[int]:
        return (int(self.blk_row.numel()),)


def same_dense_layout(tensors: Sequence[Tensor]) -> bool:
    """Whether the tensors share shape and strides and cover their memory densely, without overlap."""
    first = tensors[0]
    if any(t.shape != first.shape or t.stride() != first.stride() for t in tensors[1:]):
        return False
    if first.is_contiguous():
        return True
    dims = sorted(range(first.ndim), key=lambda d: -first.stride(d))
    return first.permute(dims).is_contiguous()


class RowSet:
    """The rows of one launch; each row a list of same-sized tensors (the columns).

    Args:
        rows: ``rows[i][c]`` is column ``c`` of row ``i``; all tensors of a row have one numel.
        mutable: the columns the kernel writes; for rows computed on contiguous copies these
            copies are written back by :meth:`finish`.
        extra: per-row tensors of any size appended as further columns (addresses only: small
            per-parameter memories such as a memory MLP's weights; they must be contiguous).
    """

    def __init__(self, rows: Sequence[Sequence[Tensor]], mutable: Sequence[int] = (),
                 extra: Sequence[Sequence[Tensor]] = ()) -> None:
        self.rows: list[list[Tensor]] = []
        self._writeback: list[tuple[Tensor, Tensor]] = []
        for row in rows:
            row = list(row)
            n = row[0].numel()
            if any(t.numel() != n for t in row):
                raise ValueError("every tensor of a row must have the parameter's number of elements")
            if not same_dense_layout(row):
                copies = [t.contiguous() for t in row]
                for c in mutable:
                    if copies[c] is not row[c]:
                        self._writeback.append((row[c], copies[c]))
                row = copies
            self.rows.append(row)
        for row, more in zip(self.rows, extra):
            if not all(t.is_contiguous() for t in more):
                raise ValueError("extra columns must be contiguous tensors")
            row.extend(more)

    def __len__(self) -> int:
        return len(self.rows)

    def tables(self, block: int) -> Tables:
        """The launch's device tables for blocks of ``block`` elements (cached by address)."""
        device = self.rows[0][0].device
        key = (device, block, tuple((t.data_ptr(), t.numel()) for row in self.rows for t in row))
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
        ptrs = torch.tensor([[t.data_ptr() for t in row] for row in self.rows], dtype=torch.int64)
        numel = torch.tensor([row[0].numel() for row in self.rows], dtype=torch.int64)
        nblk = (numel + block - 1) // block
        blk_row = torch.repeat_interleave(torch.arange(len(self.rows), dtype=torch.int32), nblk)
        first = torch.cumsum(nblk, 0) - nblk
        blk_start = (torch.arange(int(nblk.sum()), dtype=torch.int64) - first.repeat_interleave(nblk)) * block
        aligned = bool((ptrs % 16 == 0).all()) and bool((numel % 16 == 0).all()) and block % 16 == 0
        table = torch.empty(ptrs.shape, dtype=torch.int64, device=device)
        table.copy_(ptrs - table.data_ptr())  # byte offsets from the table itself (see triton_kernels._col)
        tables = Tables(table, *(t.to(device) for t in (numel, blk_row, blk_start)), aligned=aligned)
        _CACHE[key] = tables
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return tables

    def finish(self) -> None:
        """Copy rows computed on contiguous copies back into the caller's tensors."""
        for dst, src in self._writeback:
            dst.copy_(src)


def scalar_table(values: Sequence[Sequence[float]], device: torch.device) -> Tensor:
    """Per-row float32 scalars ``values[i][k]`` as a device tensor (at least one column)."""
    rows = [list(v) or [0.0] for v in values]
    return torch.tensor(rows, dtype=torch.float32).to(device, non_blocking=True)
