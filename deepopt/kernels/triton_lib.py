"""Triton helpers shared by every fused step's kernels, the kernel of ``p <- decay p - alpha o`` and
the non-finite check.

Every kernel follows :mod:`deepopt.kernels.tables`: program ``b`` handles ``BLOCK`` elements of
row ``blk_row[b]``, whose tensors it finds in ``ptrs[row, col]``; math is float32 whatever the
storage dtypes (``P_DT`` parameter, ``G_DT`` gradient, ``S_DT`` state). Per-row scalars come from
``scal[row, k]``; hyperparameters shared by the list are plain arguments. ``COUPLED`` adds
``wd * p`` to the gradient in registers (SGD-style decay); ``decay`` is ``1 - lr wd`` for
decoupled decay (AdamW-style) and 1 otherwise. ``found`` points to the step's non-finite flag:
with ``CHECK`` a set flag masks every load and store, so the step leaves parameters and state
untouched (torch's ``found_inf``). The families' kernels live beside their levels
(``deepopt/levels/<family>/triton_kernels.py``); their tensor-by-tensor references in the
``fused.py`` next to them.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------- helpers


@triton.jit
def _row(blk_row, blk_start, numel, found, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, CHECK: tl.constexpr):
    """This program's row, element offsets and mask. ALIGNED (every address 16-byte aligned and
    every numel a multiple of 16, checked on the host) lets the compiler vectorize masked loads.
    CHECK: the mask is empty when the non-finite flag ``found`` is set."""
    row, offs, n = _row_limit(blk_row, blk_start, numel, found, BLOCK, ALIGNED, CHECK)
    return row, offs, offs < n


@triton.jit
def _row_limit(blk_row, blk_start, numel, found, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, CHECK: tl.constexpr):
    """:func:`_row` with the row's element count ``n`` (0 when CHECK and the flag is set) instead of
    the mask, for kernels that walk their block in slices (``offs + c < n``)."""
    pid = tl.program_id(0)
    row = tl.load(blk_row + pid).to(tl.int64)
    start = tl.load(blk_start + pid)
    n = tl.load(numel + row)
    if ALIGNED:  # the hints on the loads themselves: Triton 3.6 drops a hint put on a jit call's result
        start = tl.multiple_of(start, 16)
        n = tl.multiple_of(n, 16)
    n = _upto(n, found, CHECK)  # n or 0: still a multiple of 16
    return row, start + tl.arange(0, BLOCK), n


@triton.jit
def _col(ptrs, row, c: tl.constexpr, NCOL: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Column c of the row: ``ptrs`` holds byte offsets from the table's own address, so the
    pointer arithmetic starts from an argument the compiler knows is 16-byte aligned."""
    off = tl.load(ptrs + row * NCOL + c)
    if ALIGNED:
        off = tl.multiple_of(off, 16)
    return (ptrs.to(tl.pointer_type(tl.int8)) + off).to(tl.pointer_type(DT))


@triton.jit
def _ld(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _grad(ptrs, row, offs, mask, wd, pp, NCOL: tl.constexpr, G_DT: tl.constexpr, COUPLED: tl.constexpr,
          ALIGNED: tl.constexpr):
    """Column 1 is the gradient; with COUPLED the decayed gradient ``g + wd p`` (``pp`` = p's pointer)."""
    g = _ld(_col(ptrs, row, 1, NCOL, G_DT, ALIGNED), offs, mask)
    if COUPLED:
        g += wd * _ld(pp, offs, mask)
    return g


def _interpreted() -> bool:
    """Whether this process's kernels run in Triton's CPU interpreter: asked for
    (``TRITON_INTERPRET=1``) and in effect (the mode is fixed at the first ``import triton``)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .launch import interpreting

    return interpreting() and isinstance(tl.sum, InterpretedFunction)


#: round float32 -> bfloat16 with integer bit operations: only the interpreter needs it (its
#: conversion truncates); compiled kernels convert with round-to-nearest-even in one instruction.
RNE_BY_BITS = tl.constexpr(_interpreted())


@triton.jit
def _grad_checked(ptrs, row, offs, mask, wd, pp, found, NCOL: tl.constexpr, G_DT: tl.constexpr,
                  COUPLED: tl.constexpr, ALIGNED: tl.constexpr, FLAG_OUT: tl.constexpr):
    """:func:`_grad`; with FLAG_OUT also the non-finite flag ``found`` set to 1 where the gradient
    itself (before any decay) holds NaN or +-Inf: a first pass that reads every gradient and stores
    only scratch is then the step's check (its launch has CHECK off)."""
    g = _ld(_col(ptrs, row, 1, NCOL, G_DT, ALIGNED), offs, mask)
    if FLAG_OUT:
        bad = tl.sum(((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32), 0)
        if bad > 0:
            tl.store(found, 1.0)
    if COUPLED:
        g += wd * _ld(pp, offs, mask)
    return g


@triton.jit
def _grad_p(ptrs, row, offs, mask, wd, pp, NCOL: tl.constexpr, G_DT: tl.constexpr, COUPLED: tl.constexpr,
            ALIGNED: tl.constexpr, LOAD_P: tl.constexpr):
    """``(g, p)``: the gradient (``g + wd p`` with COUPLED) and the parameter, read once for both
    (with COUPLED or LOAD_P; otherwise ``p`` is not read and ``g`` stands in for it)."""
    g = _ld(_col(ptrs, row, 1, NCOL, G_DT, ALIGNED), offs, mask)
    if COUPLED or LOAD_P:
        p = _ld(pp, offs, mask)
    else:
        p = g
    if COUPLED:
        g += wd * p
    return g, p


@triton.jit
def _cast(x, DT: tl.constexpr):
    """float32 -> DT rounding to nearest even (compiled: the conversion itself, which rounds to
    nearest even; in the interpreter, which truncates, by integer bit operations for bf16)."""
    if RNE_BY_BITS and DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(DT)
    return x.to(DT)


@triton.jit
def _tanh(x):
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


#: the hardware tanh needs compiled PTX: never in the interpreter
FAST_TANH = tl.constexpr(not _interpreted())


@triton.jit
def _tanh_for(x, S_DT: tl.constexpr):
    """tanh for a value kept in ``S_DT``: where that is a 16-bit type (bf16 rounds to 2^-9, fp16 to
    2^-12 relative), the GPU's own approximate tanh (one instruction, relative error below 2^-10.9),
    compute-bound kernels' largest cost otherwise being two special-function instructions and a
    dozen arithmetic ones per tanh; float32 and float64 state keep :func:`_tanh`."""
    if FAST_TANH and (S_DT == tl.bfloat16 or S_DT == tl.float16):
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    return _tanh(x)


@triton.jit
def _upto(n, found, CHECK: tl.constexpr):
    """``n``, or 0 when CHECK and the non-finite flag is set: masks ``offs < _upto(n)`` are then empty."""
    if CHECK:
        n = tl.where(tl.load(found) == 0, n, 0)
    return n


# ----------------------------------------------------------------------------- apply


@triton.jit
def apply_kernel(ptrs, numel, blk_row, blk_start, found, scal, decay,
                 NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, O_DT: tl.constexpr,
                 BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False,
                 CHECK: tl.constexpr = False):
    """Columns p, o: p = decay p - alpha[row] o (the step after an orthogonalized read-out)."""
    row, offs, mask = _row(blk_row, blk_start, numel, found, BLOCK, ALIGNED, CHECK)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    o = _ld(_col(ptrs, row, 1, NCOL, O_DT, ALIGNED), offs, mask)
    alpha = tl.load(scal + row * NSCAL)
    tl.store(pp + offs, _cast(_ld(pp, offs, mask) * decay - alpha * o, P_DT), mask=mask)


# ----------------------------------------------------------------------------- the non-finite check


@triton.jit
def nonfinite_kernel(ptrs, numel, blk_row, blk_start, found, NCOL: tl.constexpr, G_DT: tl.constexpr,
                     BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False, CHECK: tl.constexpr = False):
    """Column g: ``found = 1`` where a block holds NaN or +-Inf (``g - g`` is then NaN, else 0;
    in float32, exact for 16-bit values, or in float64); a read of the gradients and nothing else,
    no store where they are finite (``found`` is zeroed by the caller; every writer stores the same
    1, so no atomics)."""
    row, offs, mask = _row(blk_row, blk_start, numel, found, BLOCK, ALIGNED, False)
    g = tl.load(_col(ptrs, row, 0, NCOL, G_DT, ALIGNED) + offs, mask=mask, other=0.0)
    if G_DT != tl.float64:
        g = g.to(tl.float32)
    d = g - g
    bad = tl.max((d != d).to(tl.int32), 0)
    if bad > 0:
        tl.store(found, 1.0)
