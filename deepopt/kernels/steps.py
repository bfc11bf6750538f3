"""Fused optimizer steps for the element-wise chains: the launcher that picks kernel or reference.

A fused step is called by the shell (:meth:`deepopt.optim.base.LevelOptimizer._step_group`) as
``step(params, grads, states, group, lr=, weight_decay=, decoupled=)`` in place of the chain's
foreach path plus the parameter update; it advances ``state["step"]``, updates the chain's state
tensors (same keys as ``chain.init``) and applies weight decay and the step, in one launch per
list (and per combination of storage dtypes). ``impl``:

* ``"triton"``: the kernels of :mod:`deepopt.kernels.triton_kernels` (CUDA, or any device
  under ``TRITON_INTERPRET=1``);
* ``"reference"``: :mod:`deepopt.kernels.reference`, tensor by tensor, same math;
* ``"foreach"``: the chain's own foreach path (``chain.update_``) and the shell's apply;
* ``"auto"``: ``"triton"`` on CUDA tensors (or under the interpreter), else ``"reference"``.

Example:
    >>> import torch, deepopt
    >>> from deepopt.kernels import fused_step_for
    >>> opt = deepopt.AdamMemory([torch.nn.Parameter(torch.ones(3))], lr=0.1, impl="foreach")
    >>> step = fused_step_for(opt.chains[0], opt.param_groups[0], impl="reference")
    >>> type(step).__name__
    'AdamStep'
"""

from __future__ import annotations

import abc
import os
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..chain import Chain
from ..levels.base import host_ints, is_boundary, level_step
from ..levels.orthogonal import adjust_lr_ratio
from . import reference as ref
from .tables import RowSet, scalar_table

__all__ = ["FusedStep", "MomentumStep", "AdamStep", "PrecondMomentumStep", "DeltaStep", "IMPLS", "BLOCK",
           "tl_dtype", "interpreting"]

IMPLS = ("auto", "triton", "reference", "foreach")
#: elements per program of the element-wise kernels, and their warps (16 fp32 per thread).
BLOCK, NUM_WARPS = 4096, 8


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch floating dtype."""
    import triton.language as tl

    table = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
             torch.float64: tl.float64}
    if dtype not in table:
        raise TypeError(f"deepopt.kernels: unsupported dtype {dtype}; use float32, bfloat16 or float16")
    return table[dtype]


def kernels():
    """The Triton kernel module (imported on first use)."""
    from . import triton_kernels

    return triton_kernels


class FusedStep(abc.ABC):
    """Base of the fused steps: step counting, dtype grouping and the choice of path.

    Subclasses implement ``run(idx, params, grads, states, group, ts, lr, wd, decoupled, kernel)``
    for the rows ``idx`` (one combination of dtypes).
    """

    def __init__(self, chain: Chain, impl: str = "auto") -> None:
        if impl not in IMPLS:
            raise ValueError(f"invalid impl: {impl!r}; use one of {IMPLS}")
        self.chain = chain
        self.impl = impl

    def lr_scale(self, group: Mapping[str, Any]) -> float:
        return 1.0 if self.chain.lr_scale is None else float(group[self.chain.lr_scale])

    def use_kernel(self, params: Sequence[Tensor]) -> bool:
        if self.impl == "reference":
            return False
        on_cuda = params[0].is_cuda
        if self.impl == "triton" and not (on_cuda or interpreting()):
            raise RuntimeError("deepopt.kernels: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        return on_cuda or interpreting()

    def __call__(self, params: list[Tensor], grads: list[Tensor], states: list[dict], group: Mapping[str, Any], *,
                 lr: float, weight_decay: float, decoupled: bool, grads_decayed: bool = True) -> None:
        """One step. ``grads_decayed``: with coupled decay (``decoupled=False``), the gradients
        already hold ``wd p`` (the shell adds it); False makes the kernels add it in registers."""
        if not params:
            return
        if not decoupled and grads_decayed:
            weight_decay = 0.0
        cast_state(states, group)
        if self.impl == "foreach":
            return self._foreach(params, grads, states, group, lr, weight_decay, decoupled)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        ts = host_ints(steps)
        kernel = self.use_kernel(params)
        sig: dict[tuple, list[int]] = {}
        for i, (p, g, s) in enumerate(zip(params, grads, states)):
            if p.numel() == 0:
                continue
            sdt = next((v.dtype for k, v in s.items() if k != "step" and v.numel() == p.numel()), p.dtype)
            sig.setdefault((p.dtype, g.dtype, sdt), []).append(i)
        for idx in sig.values():
            self.run(idx, params, grads, states, group, ts, lr * self.lr_scale(group), float(weight_decay),
                     decoupled, kernel)

    def _foreach(self, params, grads, states, group, lr, wd, decoupled) -> None:
        from ..optim.base import _apply

        if wd != 0 and not decoupled:
            grads = [g.add(p, alpha=wd) for p, g in zip(params, grads)]
        directions = self.chain.update_(states, grads, params, group)
        if wd != 0 and decoupled:
            torch._foreach_mul_(params, 1 - lr * wd)
        _apply(params, directions, lr)

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


def launch(kernel_fn: Callable, rows: RowSet, scal: Tensor | None, *args: Any, block: int = BLOCK,
           num_warps: int = NUM_WARPS, **consts: Any) -> None:
    """Launch ``kernel_fn`` over ``rows`` (grid = their blocks); ``scal`` may be None."""
    t = rows.tables(block)
    if t.grid[0] == 0:
        return
    extra = () if scal is None else (scal,)
    kernel_fn[t.grid](t.ptrs, t.numel, t.blk_row, t.blk_start, *extra, *args, NCOL=len(rows.rows[0]),
                      BLOCK=block, ALIGNED=t.aligned, num_warps=num_warps, **consts)


class MomentumStep(FusedStep):
    """``Chain(Momentum)`` (sgd or ema form, period 1): MomentumMemory."""

    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        lvl = self.chain.levels[0]
        a = float(lvl.hp(group, "momentum"))
        ema = lvl.form == "ema"
        c_g = 1.0 - a if ema else 1.0 - float(lvl.hp(group, "dampening"))
        nesterov = bool(lvl.hp(group, "nesterov"))
        decay, coupled = self.decay_terms(lr, wd, decoupled)
        key = f"{lvl.name}.momentum_buffer"
        if not kernel:
            for i in idx:
                ref.momentum(params[i], grads[i], states[i][key], None, first=first_write(ts[i], a), a=a, c_g=c_g, lr=lr,
                             decay=decay, wd=wd, ema=ema, nesterov=nesterov, coupled=coupled)
            return
        rows = RowSet([[params[i], grads[i], states[i][key]] for i in idx], mutable=(0, 2))
        scal = scalar_table([[float(first_write(ts[i], a))] for i in idx], params[idx[0]].device)
        p, g, s = params[idx[0]], grads[idx[0]], states[idx[0]][key]
        launch(kernels().momentum_kernel, rows, scal, a, c_g, lr, decay, wd, NSCAL=1, P_DT=tl_dtype(p.dtype),
               G_DT=tl_dtype(g.dtype), S_DT=tl_dtype(s.dtype), O_DT=tl_dtype(p.dtype), EMA=ema,
               NESTEROV=nesterov, COUPLED=coupled, TO_OUT=False)
        rows.finish()


class AdamStep(FusedStep):
    """``Chain(AdamMoments)``, both forms (AdamMemory; MuonMemory's element-wise fallback)."""

    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        lvl = self.chain.levels[0]
        b1, b2 = (float(b) for b in lvl.hp(group, "betas"))
        eps = float(lvl.hp(group, "eps"))
        ema = lvl.hp(group, "form") == "ema"
        coeffs = dict(c_m=b1, c_g=1 - b1, c_v=b2, c_g2=1 - b2) if ema else dict(c_m=1.0, c_g=b1, c_v=1.0, c_g2=b2)
        decay, coupled = self.decay_terms(lr, wd, decoupled)
        km, kv = f"{lvl.name}.exp_avg", f"{lvl.name}.exp_avg_sq"
        scal = [[lr / ref.bias_correction(b1, t), ref.bias_correction(b2, t) ** -0.5] if ema else [lr, 1.0]
                for t in (ts[i] for i in idx)]
        if not kernel:
            for i, (s1, s2) in zip(idx, scal):
                ref.adam(params[i], grads[i], states[i][km], states[i][kv], s1=s1, s2=s2, eps=eps, decay=decay,
                         wd=wd, coupled=coupled, **coeffs)
            return
        rows = RowSet([[params[i], grads[i], states[i][km], states[i][kv]] for i in idx], mutable=(0, 2, 3))
        p, g, s = params[idx[0]], grads[idx[0]], states[idx[0]][km]
        launch(kernels().adam_kernel, rows, scalar_table(scal, p.device), coeffs["c_m"], coeffs["c_g"],
               coeffs["c_v"], coeffs["c_g2"], eps, decay, wd, NSCAL=2, P_DT=tl_dtype(p.dtype),
               G_DT=tl_dtype(g.dtype), S_DT=tl_dtype(s.dtype), COUPLED=coupled)
        rows.finish()


class PrecondMomentumStep(FusedStep):
    """``Chain(DiagonalPreconditioner(period C), Momentum(sgd))``: PreconditionedMomentum, any C
    (the preconditioner is written at t = 1, C + 1, 2C + 1, ... with the mean of its chunk)."""

    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        pre, mom = self.chain.levels
        b2, eps = float(pre.hp(group, "beta2")), float(pre.hp(group, "eps"))
        a = float(mom.hp(group, "momentum"))
        c_g = 1.0 - float(mom.hp(group, "dampening"))
        nesterov = bool(mom.hp(group, "nesterov"))
        decay, coupled = self.decay_terms(lr, wd, decoupled)
        C = pre.period
        kv, kb, ka = f"{pre.name}.exp_avg_sq", f"{mom.name}.momentum_buffer", f"{pre.name}.accumulator"
        scal = []
        for t in (ts[i] for i in idx):
            tl_ = level_step(t, C, True)
            scal.append([float(first_write(t, a)), float(is_boundary(t, C, True)), 1.0 if t == 1 else 1.0 / C,
                         ref.bias_correction(b2, tl_) ** -0.5])
        hp = dict(b2=b2, eps=eps, a=a, c_g=c_g, lr=lr, decay=decay, wd=wd, nesterov=nesterov, coupled=coupled)
        if not kernel:
            for i, (first, hit, inv, den) in zip(idx, scal):
                ref.precond_momentum(params[i], grads[i], states[i][kv], states[i][kb],
                                     states[i][ka] if C > 1 else None, first=bool(first), boundary=bool(hit),
                                     inv_chunk=inv, den_scale=den, **hp)
            return
        cols = [[params[i], grads[i], states[i][kv], states[i][kb]] + ([states[i][ka]] if C > 1 else []) for i in idx]
        rows = RowSet(cols, mutable=(0, 2, 3, 4) if C > 1 else (0, 2, 3))
        p, g, s = params[idx[0]], grads[idx[0]], states[idx[0]][kv]
        launch(kernels().precond_momentum_kernel, rows, scalar_table(scal, p.device), b2, eps, a, c_g, lr, decay,
               wd, NSCAL=4, P_DT=tl_dtype(p.dtype), G_DT=tl_dtype(g.dtype), S_DT=tl_dtype(s.dtype),
               NESTEROV=nesterov, PERIODIC=C > 1, COUPLED=coupled)
        rows.finish()


class DeltaStep(FusedStep):
    """``Chain(DeltaMomentumLevel)``: DeltaMomentum. Vectors entirely in the kernels (a reduction
    launch, then the update); matrices get their forget term ``buf G^T G`` from a matmul and the
    rest from the same update kernel."""

    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        from ..levels.momentum import as_matrix

        lvl = self.chain.levels[0]
        a, lam = float(lvl.hp(group, "momentum")), float(lvl.hp(group, "delta"))
        nesterov = bool(lvl.hp(group, "nesterov"))
        decay, coupled = self.decay_terms(lr, wd, decoupled)
        key = f"{lvl.name}.momentum_buffer"
        forget: dict[int, Tensor] = {}
        for i in idx:
            p = params[i]
            if p.ndim >= 2 and ts[i] > 1 and lam != 0:
                m = as_matrix(states[i][key])
                gm = as_matrix(grads[i].add(p, alpha=wd) if coupled else grads[i]).to(m.dtype)
                gt = gm.transpose(0, 1)
                f = (m @ gt) @ gm if m.shape[0] <= m.shape[1] else m @ (gt @ gm)
                forget[i] = f.reshape(p.shape)
        hp = dict(a=a, lam=lam, lr=lr, decay=decay, wd=wd, nesterov=nesterov, coupled=coupled)
        if not kernel:
            for i in idx:
                f = forget.get(i, torch.zeros_like(params[i]) if params[i].ndim >= 2 else None)
                ref.delta(params[i], grads[i], states[i][key], f, first=ts[i] == 1, **hp)
            return
        cols = [[params[i], grads[i], states[i][key], forget.get(i, states[i][key])] for i in idx]
        rows = RowSet(cols, mutable=(0, 2))
        p, g, s = params[idx[0]], grads[idx[0]], states[idx[0]][key]
        dts = dict(P_DT=tl_dtype(p.dtype), G_DT=tl_dtype(g.dtype), S_DT=tl_dtype(s.dtype))
        red = torch.zeros(len(idx), 2, dtype=torch.float32, device=p.device)
        if lam != 0:
            launch(kernels().delta_reduce_kernel, rows, None, red, wd, COUPLED=coupled, **dts)
        scal = scalar_table([[float(ts[i] == 1), float(params[i].ndim < 2)] for i in idx], p.device)
        launch(kernels().delta_update_kernel, rows, scal, red, a, lam, lr, decay, wd, NSCAL=2, F_DT=dts["S_DT"],
               NESTEROV=nesterov, COUPLED=coupled, **dts)
        rows.finish()
