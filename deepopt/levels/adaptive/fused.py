"""Fused steps of the adaptive family, with the tensor-by-tensor reference of each kernel.

* :class:`AdamStep` (``Chain(AdamMoments)``, both forms, period 1: AdamMemory and MuonMemory's
  element-wise fallback), one launch with per-row scalars ``(s1, s2)``:

      m = c_m m + c_g g,   v = c_v v + c_g2 g^2,   p = decay p - s1 m / (sqrt(v) s2 + eps)

  (ema: ``c_m, c_g, c_v, c_g2 = b1, 1 - b1, b2, 1 - b2``, ``s1 = lr / (1 - b1^t)``,
  ``s2 = (1 - b2^t)^-1/2``; accumulate: ``1, b1, 1, b2`` and ``s1 = lr``, ``s2 = 1``).
* :class:`PrecondMomentumStep` (``Chain(DiagonalPreconditioner(period C), Momentum(sgd))``:
  PreconditionedMomentum, any C), one launch:

      v <- b2 v + (1 - b2) g^2 (period C: through acc, written at t = 1, C + 1, ... with acc / chunk)
      x = g / (sqrt(v) den_scale + eps),  buf = x (first) or a buf + c_g x,  p = decay p - lr read(buf)

* The factored second moment (``FactoredPreconditioner``, inside DeepMomentum's fused step): a
  2-D-tiled pass adds the row and column sums of ``u^2``, one program per tensor then writes
  ``r = b2 r + (1 - b2) (sum_j u^2 / cols + eps1)``, ``c`` likewise and ``mean(r)``; the kernels after
  it divide by ``sqrt(r_i) sqrt(c_j / mean r) den + eps`` (:func:`factored`).

``decay = 1 - lr wd`` (decoupled) or 1; ``coupled`` adds ``wd p`` to the gradient. :func:`adam` and
:func:`precond_momentum` do to one tensor what the kernels of
:mod:`deepopt.levels.adaptive.triton_kernels` do to each row (float32 math).

Example:
    >>> import torch
    >>> from deepopt.levels.adaptive.fused import adam
    >>> p, m, v = torch.zeros(2), torch.zeros(2), torch.zeros(2)
    >>> adam(p, torch.tensor([1.0, -2.0]), m, v, s1=1.0 / 0.1, s2=0.001 ** -0.5, c_m=0.9, c_g=0.1, c_v=0.999,
    ...      c_g2=0.001, eps=1e-8, decay=1.0, wd=0.0)
    >>> p  # the first Adam step is -lr sign(g)
    tensor([-1.,  1.])
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels.launch import FusedStep, bias_correction, f32, first_write, row_grad, row_step, tl_dtype
from ...kernels.tables import RowSet, step_scalars
from ..base import is_boundary, level_step
from ..momentum.level import Momentum
from .level import FACTORED_EPS, AdamMoments, DiagonalPreconditioner

__all__ = ["AdamStep", "PrecondMomentumStep", "adam", "factored", "precond_momentum"]


def _kernels():
    from . import triton_kernels

    return triton_kernels


def adam(p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, s1: float, s2: float, c_m: float, c_g: float,
         c_v: float, c_g2: float, eps: float, decay: float, wd: float, coupled: bool = False) -> None:
    """The reference of ``adam_kernel`` on one tensor (``m``, ``v``, ``p`` updated in place)."""
    x = row_grad(p, g, wd, coupled)
    nm = c_m * f32(m) + c_g * x
    nv = c_v * f32(v) + c_g2 * x * x
    m.copy_(nm)
    v.copy_(nv)
    p.copy_(f32(p) * decay - s1 * nm / (nv.sqrt() * s2 + eps))


def precond_momentum(p: Tensor, g: Tensor, v: Tensor, buf: Tensor, acc: Tensor | None, *, first: bool,
                     boundary: bool, inv_chunk: float, den_scale: float, b2: float, eps: float, a: float,
                     c_g: float, lr: float, decay: float, wd: float, nesterov: bool = False,
                     coupled: bool = False) -> None:
    """The reference of ``precond_momentum_kernel`` on one tensor."""
    x = row_grad(p, g, wd, coupled)
    nv = f32(v)
    if acc is not None:
        s = f32(acc) + x * x
        if boundary:
            nv = b2 * nv + (1.0 - b2) * (s * inv_chunk)
            s = torch.zeros_like(s)
        acc.copy_(s)
    else:
        nv = b2 * nv + (1.0 - b2) * x * x
    v.copy_(nv)
    y = x / (nv.sqrt() * den_scale + eps)
    new = y if first else a * f32(buf) + c_g * y
    buf.copy_(new)
    row_step(p, y + a * new if nesterov else new, lr, decay)


def factored(u: Tensor, row: Tensor, col: Tensor, *, b2: float, eps: float, den: float) -> Tensor:
    """The reference of the factored kernels on one tensor's float32 input ``u`` (the row and column
    statistics written in place, rows = the first dim): returns ``u / (sqrt(r_i) sqrt(c_j / mean r)
    den + eps)``, ``den = 1 / sqrt(1 - b2^t)``, flat."""
    m = (u * u).reshape(row.numel(), -1)
    row.copy_(b2 * f32(row) + (1 - b2) * (m.sum(1) / m.shape[1] + FACTORED_EPS))
    col.copy_(b2 * f32(col) + (1 - b2) * (m.sum(0) / m.shape[0] + FACTORED_EPS))
    r, c = f32(row), f32(col)
    return u.reshape(-1) / (torch.outer(r.sqrt(), c.sqrt() * (den / r.mean().sqrt())) + eps).reshape(-1)


class AdamStep(FusedStep):
    """``Chain(AdamMoments)``, both forms (AdamMemory; MuonMemory's element-wise fallback)."""

    @classmethod
    def covers(cls, chain) -> bool:
        lv = chain.levels
        return len(lv) == 1 and isinstance(lv[0], AdamMoments) and lv[0].period == 1

    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        lvl = self.chain.levels[0]
        b1, b2 = (float(b) for b in lvl.hp(group, "betas"))
        eps = float(lvl.hp(group, "eps"))
        ema = lvl.hp(group, "form") == "ema"
        coeffs = dict(c_m=b1, c_g=1 - b1, c_v=b2, c_g2=1 - b2) if ema else dict(c_m=1.0, c_g=b1, c_v=1.0, c_g2=b2)
        decay, coupled = self.decay_terms(lr, wd, decoupled)
        km, kv = f"{lvl.name}.exp_avg", f"{lvl.name}.exp_avg_sq"
        def scalars(t: int) -> list[float]:
            return [lr / bias_correction(b1, t), bias_correction(b2, t) ** -0.5] if ema else [lr, 1.0]

        if not kernel:
            for i in idx:
                s1, s2 = scalars(ts[i])
                adam(params[i], grads[i], states[i][km], states[i][kv], s1=s1, s2=s2, eps=eps, decay=decay,
                     wd=wd, coupled=coupled, **coeffs)
            return
        rows = RowSet([[params[i], grads[i], states[i][km], states[i][kv]] for i in idx], mutable=(0, 2, 3))
        p, g, s = params[idx[0]], grads[idx[0]], states[idx[0]][km]
        scal = step_scalars([ts[i] for i in idx], scalars, p.device)
        self.launch(_kernels().adam_kernel, rows, scal, coeffs["c_m"], coeffs["c_g"],
                    coeffs["c_v"], coeffs["c_g2"], eps, decay, wd, NSCAL=2, P_DT=tl_dtype(p.dtype),
                    G_DT=tl_dtype(g.dtype), S_DT=tl_dtype(s.dtype), COUPLED=coupled)
        rows.finish()


class PrecondMomentumStep(FusedStep):
    """``Chain(DiagonalPreconditioner(period C), Momentum(sgd))``: PreconditionedMomentum, any C
    (the preconditioner is written at t = 1, C + 1, 2C + 1, ... with the mean of its chunk)."""

    @classmethod
    def covers(cls, chain) -> bool:
        lv = chain.levels
        return (len(lv) == 2 and isinstance(lv[0], DiagonalPreconditioner) and isinstance(lv[1], Momentum)
                and lv[1].form == "sgd" and lv[1].period == 1)

    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        pre, mom = self.chain.levels
        b2, eps = float(pre.hp(group, "beta2")), float(pre.hp(group, "eps"))
        a = float(mom.hp(group, "momentum"))
        c_g = 1.0 - float(mom.hp(group, "dampening"))
        nesterov = bool(mom.hp(group, "nesterov"))
        decay, coupled = self.decay_terms(lr, wd, decoupled)
        C = pre.period
        kv, kb, ka = f"{pre.name}.exp_avg_sq", f"{mom.name}.momentum_buffer", f"{pre.name}.accumulator"
        def scalars(t: int) -> list[float]:
            return [float(first_write(t, a)), float(is_boundary(t, C, True)), 1.0 if t == 1 else 1.0 / C,
                    bias_correction(b2, level_step(t, C, True)) ** -0.5]

        hp = dict(b2=b2, eps=eps, a=a, c_g=c_g, lr=lr, decay=decay, wd=wd, nesterov=nesterov, coupled=coupled)
        if not kernel:
            for i in idx:
                first, hit, inv, den = scalars(ts[i])
                precond_momentum(params[i], grads[i], states[i][kv], states[i][kb], states[i][ka] if C > 1 else None,
                                 first=bool(first), boundary=bool(hit), inv_chunk=inv, den_scale=den, **hp)
            return
        cols = [[params[i], grads[i], states[i][kv], states[i][kb]] + ([states[i][ka]] if C > 1 else []) for i in idx]
        rows = RowSet(cols, mutable=(0, 2, 3, 4) if C > 1 else (0, 2, 3))
        p, g, s = params[idx[0]], grads[idx[0]], states[idx[0]][kv]
        scal = step_scalars([ts[i] for i in idx], scalars, p.device)
        self.launch(_kernels().precond_momentum_kernel, rows, scal, b2, eps, a, c_g, lr,
                    decay, wd, NSCAL=4, P_DT=tl_dtype(p.dtype), G_DT=tl_dtype(g.dtype), S_DT=tl_dtype(s.dtype),
                    NESTEROV=nesterov, PERIODIC=C > 1, COUPLED=coupled)
        rows.finish()
