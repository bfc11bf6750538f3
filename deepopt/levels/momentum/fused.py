"""Fused steps of the momentum family, with the tensor-by-tensor reference of each kernel.

* :class:`MomentumStep` (``Chain(Momentum)``, sgd or ema, period 1: MomentumMemory), one launch:

      sgd: buf = g (first write) or a buf + c_g g;   ema: buf = buf + c_g (g - buf)
      d = buf, or the look-ahead g + a buf (sgd) / g + a (buf - g) (ema);   p = decay p - lr d

* :class:`DeltaStep` (``Chain(DeltaMomentumLevel)``: DeltaMomentum): a reduction launch for
  ``(<buf, g>, ||g||^2)``, the matrices' forget term ``buf G^T G`` from batched matmuls on the
  cheaper side, then one update launch:

      buf = g (first) or a buf - lam F / ||g||^2 + g,   F = <buf, g> g (vectors), buf G^T G (matrices)

``decay = 1 - lr wd`` (decoupled weight decay) or 1; ``coupled`` adds ``wd p`` to the gradient.
The functions :func:`momentum` and :func:`delta` do to one tensor what the kernels of
:mod:`deepopt.levels.momentum.triton_kernels` do to each row (float32 math); tests check kernel ==
reference == the level's foreach path (:mod:`deepopt.levels.momentum.level`).

Example:
    >>> import torch
    >>> from deepopt.levels.momentum.fused import momentum
    >>> p, g, buf = torch.ones(3), torch.ones(3), torch.zeros(3)
    >>> momentum(p, g, buf, None, first=True, a=0.9, c_g=1.0, lr=0.1, decay=1.0, wd=0.0)
    >>> p
    tensor([0.9000, 0.9000, 0.9000])
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels.launch import REDUCE_BLOCK, FusedStep, f32, first_write, row_grad, row_step, tl_dtype
from ...kernels.tables import RowSet, scalar_table, step_scalars
from .level import DeltaMomentumLevel, ForgetStacks, Momentum, as_matrix, forget_terms

__all__ = ["MomentumStep", "DeltaStep", "momentum", "momentum_terms", "delta"]


def _kernels():
    from . import triton_kernels

    return triton_kernels


def momentum(p: Tensor, g: Tensor, buf: Tensor, out: Tensor | None, *, first: bool, a: float, c_g: float,
             lr: float, decay: float, wd: float, ema: bool = False, nesterov: bool = False,
             coupled: bool = False) -> None:
    """The reference of ``momentum_kernel`` on one tensor: updates ``buf`` and ``p`` (or writes
    the read-out into ``out``) in place."""
    x = row_grad(p, g, wd, coupled)
    b = f32(buf)
    if ema:
        new = b + c_g * (x - b)
        d = x + a * (new - x) if nesterov else new
    else:
        new = x.clone() if first else a * b + c_g * x
        d = x + a * new if nesterov else new
    buf.copy_(new)
    if out is not None:
        out.copy_(d)
    else:
        row_step(p, d, lr, decay)


def delta(p: Tensor, g: Tensor, buf: Tensor, f: Tensor | None, *, first: bool, a: float, lam: float, lr: float,
          decay: float, wd: float, nesterov: bool = False, coupled: bool = False) -> None:
    """The reference of ``delta_update_kernel`` on one tensor (``f`` None for vectors, else
    ``buf G^T G``)."""
    x = row_grad(p, g, wd, coupled)
    b = f32(buf)
    if first:
        new = x.clone()
    else:
        sq = float((x * x).sum())
        coef = lam * (float((b * x).sum()) if f is None else 1.0) / sq if sq > 0 else 0.0
        new = a * b - coef * (x if f is None else f32(f)) + x
    buf.copy_(new)
    row_step(p, x + a * new if nesterov else new, lr, decay)


def momentum_terms(lvl: Momentum, group) -> tuple[float, float, bool, bool]:
    """``(a, c_g, ema, nesterov)`` of a Momentum level in ``group``: c_g = 1 - a (ema form) or
    1 - dampening (sgd form)."""
    a = float(lvl.hp(group, "momentum"))
    ema = lvl.form == "ema"
    c_g = 1.0 - a if ema else 1.0 - float(lvl.hp(group, "dampening"))
    return a, c_g, ema, bool(lvl.hp(group, "nesterov"))


class MomentumStep(FusedStep):
    """``Chain(Momentum)`` (sgd or ema form, period 1): MomentumMemory."""

    @classmethod
    def covers(cls, chain) -> bool:
        lv = chain.levels
        return len(lv) == 1 and isinstance(lv[0], Momentum) and lv[0].period == 1

    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        lvl = self.chain.levels[0]
        a, c_g, ema, nesterov = momentum_terms(lvl, group)
        decay, coupled = self.decay_terms(lr, wd, decoupled)
        key = f"{lvl.name}.momentum_buffer"
        if not kernel:
            for i in idx:
                momentum(params[i], grads[i], states[i][key], None, first=first_write(ts[i], a), a=a, c_g=c_g, lr=lr,
                         decay=decay, wd=wd, ema=ema, nesterov=nesterov, coupled=coupled)
            return
        rows = RowSet([[params[i], grads[i], states[i][key]] for i in idx], mutable=(0, 2))
        scal = step_scalars([ts[i] for i in idx], lambda t: [float(first_write(t, a))], params[idx[0]].device)
        p, g, s = params[idx[0]], grads[idx[0]], states[idx[0]][key]
        self.launch(_kernels().momentum_kernel, rows, scal, a, c_g, lr, decay, wd, NSCAL=1, P_DT=tl_dtype(p.dtype),
                    G_DT=tl_dtype(g.dtype), S_DT=tl_dtype(s.dtype), O_DT=tl_dtype(p.dtype), EMA=ema,
                    NESTEROV=nesterov, COUPLED=coupled, TO_OUT=False)
        rows.finish()


class DeltaStep(FusedStep):
    """``Chain(DeltaMomentumLevel)``: DeltaMomentum. Vectors entirely in the kernels (a reduction
    launch, then the update); matrices get their forget term ``buf G^T G`` from matmuls batched
    over equal shapes (:func:`deepopt.levels.momentum.level.forget_terms`, in the level's
    ``forget_dtype``) and the rest from the same update kernel."""

    @classmethod
    def covers(cls, chain) -> bool:
        lv = chain.levels
        return len(lv) == 1 and isinstance(lv[0], DeltaMomentumLevel) and lv[0].period == 1

    def makes_flag(self, group) -> bool:
        """The reduction pass reads every gradient and stores only the matmuls' scratch stacks,
        before the update's first store (with ``delta=0`` there is no reduction pass)."""
        return float(self.chain.levels[0].hp(group, "delta")) != 0

    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        lvl = self.chain.levels[0]
        a, lam = float(lvl.hp(group, "momentum")), float(lvl.hp(group, "delta"))
        nesterov = bool(lvl.hp(group, "nesterov"))
        decay, coupled = self.decay_terms(lr, wd, decoupled)
        key = f"{lvl.name}.momentum_buffer"
        mats = [i for i in idx if params[i].ndim >= 2 and ts[i] > 1 and lam != 0]
        hp = dict(a=a, lam=lam, lr=lr, decay=decay, wd=wd, nesterov=nesterov, coupled=coupled)
        if kernel:
            return self._kernels(idx, params, grads, states, key, mats, lvl.forget_dtype, ts, hp)
        fs = forget_terms([states[i][key] for i in mats],
                          [(grads[i].add(params[i], alpha=wd) if coupled else grads[i]) for i in mats], lvl.forget_dtype)
        forget: dict[int, Tensor] = dict(zip(mats, fs))
        for i in idx:
            f = forget.get(i, torch.zeros_like(params[i]) if params[i].ndim >= 2 else None)
            delta(params[i], grads[i], states[i][key], f, first=ts[i] == 1, **hp)

    def _kernels(self, idx, params, grads, states, key, mats, forget_dtype, ts, hp) -> None:
        """The reduction launch (which also writes the matrices' buffers and gradients, in the
        matmuls' dtype, into one stack per shape), the forget terms from batched matmuls on those
        stacks (:class:`~deepopt.levels.momentum.level.ForgetStacks`), then the update launch. One
        per-row scalar table serves both: (first write, vector, has a forget term)."""
        p, g, s = params[idx[0]], grads[idx[0]], states[idx[0]][key]
        dts = dict(P_DT=tl_dtype(p.dtype), G_DT=tl_dtype(g.dtype), S_DT=tl_dtype(s.dtype))
        red = torch.zeros(len(idx), 2, dtype=torch.float32, device=p.device)
        k = _kernels()
        stacks = ForgetStacks([as_matrix(params[i]).shape for i in mats], forget_dtype, s.dtype, p.device)
        slot = {i: stacks.slots(j) for j, i in enumerate(mats)}
        scal = scalar_table([[float(ts[i] == 1), float(params[i].ndim < 2), float(i in slot)] for i in idx], p.device)
        if hp["lam"] != 0:
            lo = [[params[i], grads[i], states[i][key]] + [t.view(params[i].shape) for t in slot.get(i, ())] for i in idx]
            if mats:  # rows without a term: their buffer twice, never written (flag 0)
                lo = [row if len(row) == 5 else row + [row[2], row[2]] for row in lo]
            rows = RowSet(lo, mutable=(3, 4) if mats else ())
            self.launch_first_pass(k.delta_reduce_kernel, rows, scal, red, hp["wd"], NSCAL=3,
                                   LO_DT=tl_dtype(stacks.dtype), COUPLED=hp["coupled"], LO=bool(mats),
                                   block=REDUCE_BLOCK, **dts)
            rows.finish()
        forget = dict(zip(mats, stacks.forget_terms()))
        f_dt = tl_dtype(stacks.dtype) if mats else dts["S_DT"]  # rows without a term point at their buffer (unread)
        if mats and stacks.dtype.itemsize > s.dtype.itemsize:  # a term wider than the buffers: read in theirs
            forget, f_dt = {i: f.to(s.dtype) for i, f in forget.items()}, dts["S_DT"]
        rows = RowSet([[params[i], grads[i], states[i][key], forget[i].view(params[i].shape) if i in forget else
                        states[i][key]] for i in idx], mutable=(0, 2))
        self.launch(k.delta_update_kernel, rows, scal, red, hp["a"], hp["lam"], hp["lr"], hp["decay"], hp["wd"],
                    NSCAL=3, F_DT=f_dt, NESTEROV=hp["nesterov"], COUPLED=hp["coupled"], **dts)
        rows.finish()
