"""The plumbing below every fused step: the ``FusedStep`` base, launches, and the foreach apply.

Each level family keeps its math and its fast paths together in ``deepopt/levels/<family>/``
(``level.py``: the pure reference and the foreach path; ``fused.py``: the fused step and the
tensor-by-tensor reference of its kernel; ``triton_kernels.py``: the kernels). What they share
lives here, below all of them, and imports nothing above :mod:`deepopt.levels.base`:

* :class:`FusedStep`: called by the shell as ``step(params, grads, states, group, lr=,
  weight_decay=, decoupled=, found=)`` in place of the chain's foreach path plus the parameter
  update; it advances ``state["step"]``, groups rows by storage dtypes and runs, per group, the
  Triton kernels (``impl="triton"``, CUDA or ``TRITON_INTERPRET=1``) or their references
  (``impl="reference"``); ``"foreach"`` runs the chain's own foreach path; ``"auto"`` the
  kernels where they can run, else the references.
* ``found``: a float32 one-element device tensor, nonzero when a gradient holds NaN/Inf
  (:func:`deepopt.optim.conventions.nonfinite_flag`); every kernel reads it and then stores
  nothing, as torch's fused Adam does with ``found_inf``, so the step needs no host sync.
* :func:`on_device`: a step runs its launches on its parameters' CUDA device (Triton launches on
  the current one).
* :func:`launch` (one launch over a :class:`~deepopt.kernels.tables.RowSet`), :func:`apply_rows`
  (``p <- decay p - alpha o``), :func:`apply_directions` (the shell's foreach
  ``W <- W - lr (mul/div) num/den``) and the row helpers of the references (float32 math).

Example:
    >>> import torch
    >>> from deepopt.kernels.launch import apply_directions
    >>> from deepopt.levels.base import Direction
    >>> p = torch.ones(2); apply_directions([p], [Direction(torch.ones(2), mul=2.0)], lr=0.1); p
    tensor([0.8000, 0.8000])
"""

from __future__ import annotations

import abc
import contextlib
import math
import operator
import os
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..levels.base import Direction, advance_steps, host_float
from .tables import RowSet, scalar_table

__all__ = ["FusedStep", "IMPLS", "BLOCK", "REDUCE_BLOCK",
           "apply_directions", "apply_rows", "bias_correction", "cast_state",
           "first_write", "interpreting", "launch", "launch_config", "on_device", "tl_dtype", "f32", "row_grad",
           "row_step", "tanh"]

IMPLS = ("auto", "triton", "reference", "foreach")
#: elements per program and warps of the element-wise kernels, by the narrowest storage element of
#: a launch: 32 bytes per thread (8 fp32 or 16 bf16 elements). Chosen on an H200 against torch's
#: fused AdamW, kernel alone, 0.71 B parameters: fp32 4096/8 1.05x, 1024/4 0.80x; bf16 4096/8 1.93x,
#: 1024/4 1.58x, 512/1 1.03x (``BLOCK`` is the fp32 choice).
CONFIGS = {4: (1024, 4), 2: (512, 1)}
BLOCK, NUM_WARPS = CONFIGS[4]
#: elements per program (8 warps) of the kernels that sum over a row with one float32 atomic per
#: program, whatever the dtype: the element-wise table's small bf16 programs multiply the atomics
#: (H200: DeltaMomentum's reduction 3.59 -> 0.75 ms in bf16, 2.01 -> 1.07 ms in fp32 on 0.51 B).
REDUCE_BLOCK = 4096


def launch_config(rows: RowSet) -> tuple[int, int]:
    """(BLOCK, num_warps) for a launch over ``rows``, by the narrowest element size of its columns."""
    size = min(t.element_size() for t in rows.rows[0])
    return CONFIGS.get(size, CONFIGS[4])


_DTYPE = operator.attrgetter("dtype")


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch floating dtype."""
    import triton.language as tl

    table = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
             torch.float64: tl.float64}
    if dtype not in table:
        raise TypeError(f"deepopt fused steps: unsupported dtype {dtype}; use float32, bfloat16 or float16")
    return table[dtype]


class FusedStep(abc.ABC):
    """Base of the fused steps: step counting, dtype grouping and the choice of path.

    Subclasses implement ``covers(chain)`` (the chains they fuse) and ``run(idx, params, grads,
    states, group, ts, lr, wd, decoupled, kernel)`` for the rows ``idx`` (one dtype combination);
    ``self.found`` is the non-finite flag of the current call (or None).
    """

    found: Tensor | None = None
    #: this call's first pass writes ``found`` (see :meth:`makes_flag`)
    make_flag: bool = False

    def __init__(self, chain: Any, impl: str = "auto") -> None:
        if impl not in IMPLS:
            raise ValueError(f"invalid impl: {impl!r}; use one of {IMPLS}")
        self.chain = chain
        self.impl = impl

    @classmethod
    @abc.abstractmethod
    def covers(cls, chain: Any) -> bool:
        """Whether this step fuses ``chain`` (by its levels' types and periods)."""

    def lr_scale(self, group: Mapping[str, Any]) -> float:
        return 1.0 if self.chain.lr_scale is None else float(group[self.chain.lr_scale])

    def use_kernel(self, params: Sequence[Tensor]) -> bool:
        """Whether this call runs the Triton kernels (else the references)."""
        if self.impl in ("reference", "foreach"):
            return False
        on_cuda = params[0].is_cuda
        if self.impl == "triton" and not (on_cuda or interpreting()):
            raise RuntimeError("deepopt fused steps: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        return on_cuda or interpreting()

    def makes_flag(self, group: Mapping[str, Any]) -> bool:
        """Whether this step's kernels can compute the non-finite flag themselves: a first pass
        that reads every gradient and stores nothing but scratch, before any kernel that stores
        (then the shell passes a zeroed ``found`` with ``make_flag=True`` instead of checking the
        gradients in a pass of its own). Default: no."""
        return False

    def flag_covered(self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict],
                     group: Mapping[str, Any]) -> bool:
        """Whether a call on these rows would make the flag in its first pass: kernels that make
        it (:meth:`makes_flag`) and one launch family (one dtype combination), so that the pass
        reads every gradient before any store."""
        return (self.impl != "foreach" and self.makes_flag(group) and self.use_kernel(params)
                and len(self.signatures(params, grads, states)) == 1)

    def __call__(self, params: list[Tensor], grads: list[Tensor], states: list[dict], group: Mapping[str, Any], *,
                 lr: float, weight_decay: float, decoupled: bool, grads_decayed: bool = True,
                 found: Tensor | None = None, make_flag: bool = False) -> None:
        """One step. ``grads_decayed``: with coupled decay (``decoupled=False``), the gradients
        already hold ``wd p``; False (what the shell passes) makes the kernels add it in registers.
        ``found``: the non-finite flag; when it is set nothing but ``state["step"]`` changes (the
        shell takes the count back when it reads the flag). ``make_flag``: ``found`` is zero and
        this call's first pass computes it (only where :meth:`flag_covered`)."""
        if not params:
            return
        if not decoupled and grads_decayed:
            weight_decay = 0.0
        cast_state(states, group)
        kernel = self.use_kernel(params)
        if found is not None and not kernel and host_float(found) != 0:  # the references read it on the host
            advance_steps(states)
            return
        if self.impl == "foreach":
            return self._foreach(params, grads, states, group, lr, weight_decay, decoupled)
        ts = advance_steps(states)
        self.found = found if kernel else None
        self.make_flag = make_flag
        try:
            with on_device(params[0].device):
                for idx in self.signatures(params, grads, states):
                    self.run(idx, params, grads, states, group, ts, lr * self.lr_scale(group), float(weight_decay),
                             decoupled, kernel)
        finally:
            self.found, self.make_flag = None, False

    @staticmethod
    def signatures(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict]) -> list[list[int]]:
        """The rows grouped by storage dtypes ``(parameter, gradient, state)`` (one launch each);
        empty parameters are left out. The usual list (one dtype of each) is checked in one pass."""
        p0, s0 = params[0], states[0]
        n0 = p0.numel()
        k0 = next((k for k, v in s0.items() if k != "step" and v.numel() == n0), None)
        if k0 is not None and n0:
            dtypes = set(map(_DTYPE, params)), set(map(_DTYPE, grads)), {s[k0].dtype for s in states}
            if all(len(d) == 1 for d in dtypes) and all(map(Tensor.numel, params)):
                return [list(range(len(params)))]
        sig: dict[tuple, list[int]] = {}
        for i, (p, g, s) in enumerate(zip(params, grads, states)):
            if p.numel() == 0:
                continue
            sdt = next((v.dtype for k, v in s.items() if k != "step" and v.numel() == p.numel()), p.dtype)
            sig.setdefault((p.dtype, g.dtype, sdt), []).append(i)
        return list(sig.values())

    def _foreach(self, params, grads, states, group, lr, wd, decoupled) -> None:
        if wd != 0 and not decoupled:
            grads = [g.add(p, alpha=wd) for p, g in zip(params, grads)]
        directions = self.chain.update_(states, grads, params, group)
        if wd != 0 and decoupled:
            torch._foreach_mul_(params, 1 - lr * wd)
        apply_directions(params, directions, lr)

    def launch(self, kernel_fn: Callable, rows: RowSet, scal: Tensor | None, *args: Any, **kw: Any) -> None:
        """:func:`launch` with this call's non-finite flag."""
        launch(kernel_fn, rows, scal, *args, found=self.found, **kw)

    def launch_first_pass(self, kernel_fn: Callable, rows: RowSet, scal: Tensor | None, *args: Any, **kw: Any) -> None:
        """:meth:`launch` for the pass that reads every gradient first (:meth:`makes_flag`): where this
        call makes the flag, the kernel writes it (``FLAG_OUT``, CHECK off)."""
        if self.make_flag:
            launch(kernel_fn, rows, scal, *args, found=self.found, check=False, FLAG_OUT=True, **kw)
        else:
            self.launch(kernel_fn, rows, scal, *args, **kw)

    @staticmethod
    def decay_terms(lr: float, wd: float, decoupled: bool) -> tuple[float, bool]:
        """``(decay, coupled)``: the factor on p and whether wd p joins the gradient."""
        if wd == 0:
            return 1.0, False
        return (1.0 - lr * wd, False) if decoupled else (1.0, True)

    @abc.abstractmethod
    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        """Update ``params`` and ``states`` in place for the parameters ``idx`` (one kernel family)."""


def cast_state(states: list[dict], group: Mapping[str, Any]) -> None:
    """Honour the group key ``state_dtype`` (e.g. float32 memories for bfloat16 parameters): state
    tensors of another floating dtype are replaced, once, by converted copies."""
    dtype = group.get("state_dtype")
    if dtype is None:
        return
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"invalid state_dtype: {dtype!r}; use a floating torch dtype such as torch.float32")
    for s in states:
        for k, v in s.items():
            if k != "step" and v.is_floating_point() and v.dtype != dtype:
                s[k] = v.to(dtype)


def first_write(t: int, a: float, form: str = "sgd") -> bool:
    """Whether the sgd-form momentum copies its input (first step, or no momentum at all)."""
    return form == "sgd" and (t == 1 or a == 0)


def bias_correction(beta: float, t: int) -> float:
    """``1 - beta^t`` (1 for t = 0 is never used: callers skip levels without writes)."""
    return 1.0 - math.pow(beta, t)


_NO_FLAG: dict[torch.device, Tensor] = {}


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which Triton launches on ``device``. Triton launches on the current CUDA device
    and its current stream, so stepping tensors on ``cuda:1`` while ``cuda:0`` is current would hand
    device 1's addresses to device 0: ``torch.cuda.device(device)`` where it is not the current one
    (torch's fused optimizers guard their device alike), else nothing; nothing either inside
    ``torch.compile`` graphs, which place kernels by their inputs' device.

    Example:
        >>> import torch
        >>> from deepopt.kernels.launch import on_device
        >>> with on_device(torch.device("cpu")):
        ...     torch.ones(2).sum().item()
        2.0
    """
    if (device.type == "cuda" and device.index is not None and not torch.compiler.is_compiling()
            and device.index != torch.cuda.current_device()):
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel_fn: Callable, rows: RowSet, scal: Tensor | None, *args: Any, block: int | None = None,
           num_warps: int | None = None, found: Tensor | None = None, check: bool | None = None,
           **consts: Any) -> None:
    """Launch ``kernel_fn`` over ``rows`` (grid = their blocks); ``scal`` may be None. Every kernel
    takes the flag pointer ``found`` after the tables and skips its stores when ``CHECK`` and the
    flag is set (``CHECK`` is ``found is not None`` unless ``check`` says otherwise: a kernel that
    writes the flag takes it with CHECK off). ``block`` / ``num_warps`` default to
    :func:`launch_config`'s."""
    if block is None:
        block, auto_warps = launch_config(rows)
        num_warps = auto_warps if num_warps is None else num_warps
    elif num_warps is None:  # a kernel's own block (the deep family's): 8 warps
        num_warps = 8
    t = rows.tables(block)
    if t.grid[0] == 0:
        return
    device = rows.rows[0][0].device
    flag = found
    if flag is None:  # any valid pointer (CHECK is off): one per device, made once
        flag = _NO_FLAG.get(device)
        if flag is None:
            flag = _NO_FLAG[device] = torch.zeros(1, device=device)
    extra = () if scal is None else (scal,)
    kernel_fn[t.grid](t.ptrs, t.numel, t.blk_row, t.blk_start, flag, *extra, *args, NCOL=len(rows.rows[0]),
                      BLOCK=block, ALIGNED=t.aligned, CHECK=found is not None if check is None else check,
                      num_warps=num_warps, **consts)


def apply_directions(params: list[Tensor], directions: list[Direction], lr: float) -> None:
    """``W <- W - (lr mul/div) num/den`` in place (``add_``/``addcdiv_`` as torch's optimizers),
    batched by equal scalar, dtype and device: one foreach call per bucket."""
    if directions and len({(d.mul, d.div, d.den is None) for d in directions}) == 1:
        dtypes = set(map(_DTYPE, params))
        if len(dtypes) == 1 and {d.num.dtype for d in directions} == dtypes and len({p.device for p in params}) == 1:
            d0 = directions[0]  # one bucket (the usual list): no per-parameter keys
            alpha = -(lr * d0.mul) / d0.div
            if d0.den is None:
                torch._foreach_add_(params, [d.num for d in directions], alpha=alpha)
            else:
                torch._foreach_addcdiv_(params, [d.num for d in directions], [d.den for d in directions], value=alpha)
            return
    buckets: dict[tuple, tuple[list, list, list]] = {}
    for p, d in zip(params, directions):
        alpha = -(lr * d.mul) / d.div
        key = (alpha, d.den is None, d.num.dtype == p.dtype, p.device)
        b = buckets.setdefault(key, ([], [], []))
        b[0].append(p)
        b[1].append(d.num)
        b[2].append(d.den)
    for (alpha, no_den, _, _), (ps, nums, dens) in buckets.items():
        if no_den:
            torch._foreach_add_(ps, nums, alpha=alpha)
        else:
            torch._foreach_addcdiv_(ps, nums, dens, value=alpha)


# ----------------------------------------------------------------------------- row references (float32)


def f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32)


def row_grad(p: Tensor, g: Tensor, wd: float, coupled: bool) -> Tensor:
    """The gradient a kernel uses: ``g``, or ``g + wd p`` with coupled decay."""
    return f32(g) + wd * f32(p) if coupled else f32(g)


def row_step(p: Tensor, d: Tensor, lr: float, decay: float) -> None:
    """``p <- decay p - lr d`` rounded once into ``p``."""
    p.copy_(f32(p) * decay - lr * d)


def tanh(x: Tensor) -> Tensor:
    """tanh as the kernels compute it (through exp, stable for large |x|)."""
    t = torch.exp(-2.0 * x.abs())
    y = (1.0 - t) / (1.0 + t)
    return torch.where(x < 0, -y, y)


def apply_rows(step: FusedStep, idx: Sequence[int], params: Sequence[Tensor], outs: Sequence[Tensor],
               alphas: Sequence[float] | Tensor, decay: float, kernel: bool) -> None:
    """``p <- decay p - alpha o`` for every row (``o`` in any dtype, ``p``'s shape): the step after
    an orthogonalized or rescaled read-out (Muon, DeepMomentum with ``sigma="ns"`` or ``"rms"``).
    ``alphas``: floats, or a float32 device tensor of one per row (no host read)."""
    if not kernel:
        for i, o, al in zip(idx, outs, alphas):
            params[i].copy_(f32(params[i]) * decay - al * f32(o))
        return
    from . import triton_lib

    rows = RowSet([[params[i], o] for i, o in zip(idx, outs)], mutable=(0,))
    p = params[idx[0]]
    scal = (alphas.reshape(-1, 1).to(torch.float32).contiguous() if isinstance(alphas, Tensor)
            else scalar_table([[al] for al in alphas], p.device))
    step.launch(triton_lib.apply_kernel, rows, scal, decay, NSCAL=1,
                P_DT=tl_dtype(p.dtype), O_DT=tl_dtype(outs[0].dtype))
    rows.finish()
