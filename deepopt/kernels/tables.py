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
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["RowSet", "Tables", "same_dense_layout", "scalar_table", "step_scalars"]

_CACHE: "OrderedDict[tuple, Tables]" = OrderedDict()
_CACHE_SIZE = 256  # launches: a few per (param group, chain, dtype combination)


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
        contiguous: rows not in row-major order are computed on contiguous copies even where
            their columns share another dense layout (for kernels that index a row as a matrix).
    """

    def __init__(self, rows: Sequence[Sequence[Tensor]], mutable: Sequence[int] = (),
                 extra: Sequence[Sequence[Tensor]] = (), contiguous: bool = False) -> None:
        self.rows: list[list[Tensor]] = []
        self._writeback: list[tuple[Tensor, Tensor]] = []
        self._numel: tuple[int, ...] = ()
        self._flat: list[Tensor] | None = None  # every column of every row, when there are no extras
        self._key: tuple | None = None  # the addresses of every column (the tables' cache key), made once
        rows = [list(row) for row in rows] if extra or not isinstance(rows, list) else rows
        ncol = len(rows[0]) if rows else 0
        if rows and all(len(row) == ncol for row in rows):  # the usual list: every row dense, checked at once
            flat = [t for row in rows for t in row]
            numel = list(map(Tensor.numel, flat))
            per_row = numel[::ncol]
            if all(map(Tensor.is_contiguous, flat)) and all(numel[c::ncol] == per_row for c in range(1, ncol)):
                rows, self.rows, self._numel = [], rows, tuple(per_row)
                self._flat = None if extra else flat
        for row in rows:
            row = list(row)
            n = row[0].numel()
            if not all(t.numel() == n and t.is_contiguous() for t in row):  # the usual row: dense, as is
                if any(t.numel() != n for t in row):
                    raise ValueError("every tensor of a row must have the parameter's number of elements")
                if contiguous or not same_dense_layout(row):
                    copies = [t.contiguous() for t in row]
                    for c in mutable:
                        if copies[c] is not row[c]:
                            self._writeback.append((row[c], copies[c]))
                    row = copies
            self.rows.append(row)
        if rows:
            self._numel = tuple(row[0].numel() for row in self.rows)
        for row, more in zip(self.rows, extra):
            if not all(t.is_contiguous() for t in more):
                raise ValueError("extra columns must be contiguous tensors")
            row.extend(more)

    def __len__(self) -> int:
        return len(self.rows)

    def _addresses(self) -> tuple:
        """Every column's address, row by row (computed once: a step launches several kernels over
        the same rows)."""
        if self._key is None:
            flat = self._flat if self._flat is not None else [t for row in self.rows for t in row]
            self._key = tuple(map(Tensor.data_ptr, flat))
        return self._key

    def _cached(self, key: tuple, build: Callable[[], Tables]) -> Tables:
        """The tables cached under ``key`` plus these rows' device and addresses, or ``build()``'s."""
        key = (self.rows[0][0].device, self._numel, self._addresses()) + key
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
        tables = _CACHE[key] = build()
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return tables

    def tables(self, block: int) -> Tables:
        """The launch's device tables for blocks of ``block`` elements (cached by address)."""
        return self._cached((block,), lambda: self._build(block))

    def _build(self, block: int) -> Tables:
        device = self.rows[0][0].device
        ptrs = torch.tensor([[t.data_ptr() for t in row] for row in self.rows], dtype=torch.int64)
        numel = torch.tensor([row[0].numel() for row in self.rows], dtype=torch.int64)
        nblk = (numel + block - 1) // block
        blk_row = torch.repeat_interleave(torch.arange(len(self.rows), dtype=torch.int32), nblk)
        first = torch.cumsum(nblk, 0) - nblk
        blk_start = (torch.arange(int(nblk.sum()), dtype=torch.int64) - first.repeat_interleave(nblk)) * block
        aligned = bool((ptrs % 16 == 0).all()) and bool((numel % 16 == 0).all()) and block % 16 == 0
        table = torch.empty(ptrs.shape, dtype=torch.int64, device=device)
        # byte offsets from the table itself (see triton_lib._col); the copies do not wait for the
        # device (from pageable memory CUDA stages the source before returning)
        table.copy_(ptrs - table.data_ptr(), non_blocking=True)
        return Tables(table, *(t.to(device, non_blocking=True) for t in (numel, blk_row, blk_start)), aligned=aligned)

    def tile_tables(self, cols: Sequence[int], tile_rows: int, tile_cols: int) -> Tables:
        """Device tables for 2-D tiles: row ``i`` viewed as a ``(numel / cols[i], cols[i])`` matrix
        in row-major order, cut into tiles of ``tile_rows x tile_cols``; ``blk_start[b]`` is then the
        tile's index within its row, row-major over the tiles (cached by address like
        :meth:`tables`).

        Example:
            >>> rows = RowSet([[torch.zeros(4, 6)], [torch.zeros(5)]])
            >>> t = rows.tile_tables([6, 5], tile_rows=2, tile_cols=4)
            >>> t.blk_row.tolist(), t.blk_start.tolist()
            ([0, 0, 0, 0, 1, 1], [0, 1, 2, 3, 0, 1])
        """
        def build() -> Tables:
            base = self.tables(tile_rows * tile_cols)
            ntiles = [-(-(n // c) // tile_rows) * -(-c // tile_cols) if n else 0 for n, c in zip(self._numel, cols)]
            blk_row = torch.repeat_interleave(torch.arange(len(self.rows), dtype=torch.int32), torch.tensor(ntiles))
            blk_start = torch.cat([torch.arange(k, dtype=torch.int64) for k in ntiles])
            device = base.ptrs.device
            return Tables(base.ptrs, base.numel, blk_row.to(device, non_blocking=True),
                          blk_start.to(device, non_blocking=True),
                          aligned=base.aligned and all(c % 16 == 0 for c in cols))

        return self._cached(("tiles", tile_rows, tile_cols, tuple(cols)), build)

    def finish(self) -> None:
        """Copy rows computed on contiguous copies back into the caller's tensors."""
        for dst, src in self._writeback:
            dst.copy_(src)


def scalar_table(values: Sequence[Sequence[float]], device: torch.device) -> Tensor:
    """Per-row float32 scalars ``values[i][k]`` as a device tensor (at least one column)."""
    rows = [list(v) or [0.0] for v in values]
    return torch.tensor(rows, dtype=torch.float32).to(device, non_blocking=True)


def step_scalars(ts: Sequence[int], fn: Callable[[int], Sequence[float]], device: torch.device) -> Tensor:
    """:func:`scalar_table` of per-row scalars that depend only on the row's step ``t``:
    ``fn(t)`` is called once per distinct step (once per list in the usual case, where every
    parameter is at the same step), not once per row.

    Example:
        >>> step_scalars([3, 3, 4], lambda t: [t, 1.0 / t], torch.device("cpu")).tolist()
        [[3.0, 0.3333333432674408], [3.0, 0.3333333432674408], [4.0, 0.25]]
    """
    if ts.count(ts[0]) == len(ts):
        one = torch.tensor([list(fn(ts[0])) or [0.0]], dtype=torch.float32)
        return one.expand(len(ts), one.shape[1]).contiguous().to(device, non_blocking=True)
    known: dict[int, list[float]] = {}
    for t in ts:
        if t not in known:
            known[t] = list(fn(t)) or [0.0]
    return torch.tensor([known[t] for t in ts], dtype=torch.float32).to(device, non_blocking=True)
