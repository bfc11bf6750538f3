"""M3's fused step, with the tensor-by-tensor reference of its kernels.

:class:`M3Step` (``Chain(MultiScaleMomentum)``, matrices and element-wise parameters, any levels):

    write (one launch):  v = c_v v + c_g2 g^2;  fast level: m = c_m m + c_g g;
                         slow level: acc += g, at its boundary m = c_m m + c_g acc, acc = 0
                         element-wise parameters also step: p = decay p - lr (sum_i w_i m_i) / (sqrt(v) s + eps)
    matrices:            O_i = NS(m_i), batched (fast levels every step, slow ones at their boundaries)
    read (two launches): d = (sum_i w_i O_i) / (sqrt(v) s + eps), scaled to RMS ``target_rms``
                         (a sum-of-squares pass first), p = decay p - lr d

(stable form: ``c_m, c_g = b, (1 - b) / C`` and bias-corrected weights; literal: ``1, b``.)
:func:`m3_write` and :func:`m3_read` do to one tensor what the kernels of
:mod:`deepopt.levels.multiscale.triton_kernels` do to each row (float32 math).

Example:
    >>> import torch, deepopt
    >>> from deepopt.levels import fused_step_for
    >>> opt = deepopt.M3([torch.nn.Parameter(torch.ones(4, 4))], lr=0.1)
    >>> type(fused_step_for(opt.chains[0], opt.param_groups[0], impl="reference")).__name__
    'M3Step'
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ...kernels.launch import REDUCE_BLOCK, FusedStep, bias_correction, f32, row_grad, row_step, tl_dtype
from ...kernels.tables import RowSet, scalar_table
from ..orthogonal.batched import newton_schulz_many
from ..orthogonal.fused import ns_method
from .level import MultiScaleMomentum

__all__ = ["M3Step", "m3_write", "m3_read"]


def _kernels():
    from . import triton_kernels

    return triton_kernels


def m3_write(p: Tensor, g: Tensor, v: Tensor, ms: Sequence[Tensor], accs: Sequence[Tensor | None], *,
             den_scale: float, levels: Sequence[tuple[float, float, bool, float]], c_v: float, c_g2: float,
             eps: float, lr: float, decay: float, wd: float, step: bool, coupled: bool = False) -> None:
    """The reference of ``m3_write_kernel`` on one tensor; level i is ``(c_m, c_g, boundary, w)``."""
    x = row_grad(p, g, wd, coupled)
    nv = c_v * f32(v) + c_g2 * x * x
    v.copy_(nv)
    num = torch.zeros_like(x)
    for m, acc, (c_m, c_g, hit, w) in zip(ms, accs, levels):
        nm = f32(m)
        if acc is None:
            nm = c_m * nm + c_g * x
        else:
            s = f32(acc) + x
            if hit:
                nm = c_m * nm + c_g * s
                s = torch.zeros_like(s)
            acc.copy_(s)
        m.copy_(nm)
        num = num + w * nm
    if step:
        row_step(p, num / (nv.sqrt() * den_scale + eps), lr, decay)


def m3_read(p: Tensor, v: Tensor, os: Sequence[Tensor], *, den_scale: float, weights: Sequence[float],
            eps: float, lr: float, decay: float, target: float | None) -> None:
    """The reference of ``m3_read_kernel``: d = sum w_i O_i / (sqrt(v) s + eps), scaled to RMS
    ``target``; p = decay p - lr d."""
    num = sum(w * f32(o) for w, o in zip(weights, os))
    d = num / (f32(v).sqrt() * den_scale + eps)
    if target is not None:
        d = d * (target / (float(d.square().mean().sqrt()) + 1e-30))
    row_step(p, d, lr, decay)


class M3Step(FusedStep):
    """``Chain(MultiScaleMomentum)``: M3, matrices and element-wise parameters, any levels."""

    @classmethod
    def covers(cls, chain) -> bool:
        return len(chain.levels) == 1 and isinstance(chain.levels[0], MultiScaleMomentum)

    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        lvl = self.chain.levels[0]
        n = lvl.name
        stable = lvl.hp(group, "form") == "stable"
        b2, eps = float(lvl.hp(group, "beta2")), float(lvl.hp(group, "eps"))
        momenta = list(lvl.hp(group, "momenta"))
        order = [i for i, m in enumerate(momenta) if m[1] == 1] + [i for i, m in enumerate(momenta) if m[1] > 1]
        kf = sum(1 for m in momenta if m[1] == 1)
        decay, coupled = self.decay_terms(lr, wd, decoupled)
        c_v, c_g2 = (b2, 1.0 - b2) if stable else (1.0, b2)

        def levels_of(t):
            out = []
            for i in order:
                beta, period, w = momenta[i]
                ti = t // period
                cm, cg = (beta, (1.0 - beta) / period) if stable else (1.0, beta)
                coef = (w / bias_correction(beta, ti) if stable else w) if ti > 0 else 0.0
                out.append((cm, cg, period == 1 or t % period == 0, coef))
            return out

        mats = [i for i in idx if lvl._matrix(params[i], group)]
        flat = [i for i in idx if i not in set(mats)]
        for sub, step in ((flat, True), (mats, False)):
            if sub:
                self._write(sub, params, grads, states, ts, levels_of, order, kf, n, stable, b2, c_v, c_g2, eps,
                            lr, decay, wd, coupled, step, kernel)
        if mats:
            self._read(mats, params, states, group, ts, order, kf, n, stable, b2, eps, lr, decay, kernel)

    def _write(self, sub, params, grads, states, ts, levels_of, order, kf, n, stable, b2, c_v, c_g2, eps, lr,
               decay, wd, coupled, step, kernel) -> None:
        scal = []
        for i in sub:
            den = bias_correction(b2, ts[i]) ** -0.5 if stable else 1.0
            scal.append([den] + [x for lv in levels_of(ts[i]) for x in (lv[0], lv[1], float(lv[2]), lv[3])])
        if not kernel:
            for i, sc in zip(sub, scal):
                s = states[i]
                lv = [(sc[1 + 4 * k], sc[2 + 4 * k], bool(sc[3 + 4 * k]), sc[4 + 4 * k]) for k in range(len(order))]
                m3_write(params[i], grads[i], s[f"{n}.exp_avg_sq"], [s[f"{n}.m{j}"] for j in order],
                         [s.get(f"{n}.acc{j}") for j in order], den_scale=sc[0], levels=lv, c_v=c_v, c_g2=c_g2,
                         eps=eps, lr=lr, decay=decay, wd=wd, step=step, coupled=coupled)
            return
        ks = len(order) - kf
        cols = [[params[i], grads[i], states[i][f"{n}.exp_avg_sq"]] + [states[i][f"{n}.m{j}"] for j in order]
                + [states[i][f"{n}.acc{j}"] for j in order[kf:]] for i in sub]
        rows = RowSet(cols, mutable=tuple(c for c in range(len(cols[0])) if c != 1))
        p, g, v = params[sub[0]], grads[sub[0]], states[sub[0]][f"{n}.exp_avg_sq"]
        self.launch(_kernels().m3_write_kernel, rows, scalar_table(scal, p.device), c_v, c_g2, eps, lr, decay, wd,
                    NSCAL=1 + 4 * len(order), P_DT=tl_dtype(p.dtype), G_DT=tl_dtype(g.dtype),
                    S_DT=tl_dtype(v.dtype), KF=kf, KS=ks, STEP=step, COUPLED=coupled)
        rows.finish()

    def _read(self, mats, params, states, group, ts, order, kf, n, stable, b2, eps, lr, decay, kernel) -> None:
        lvl = self.chain.levels[0]
        momenta = list(lvl.hp(group, "momenta"))
        coeffs, steps = tuple(lvl.hp(group, "ns_coefficients")), int(lvl.hp(group, "ns_steps"))
        method = ns_method(group)
        fast = []
        for j in order[:kf]:
            fast.append(newton_schulz_many([states[i][f"{n}.m{j}"] for i in mats], coeffs, steps, 1e-7,
                                           lvl.ns_dtype, method))
        for j in order[kf:]:
            period = momenta[j][1]
            hit = [i for i in mats if ts[i] % period == 0]
            if hit:
                outs = newton_schulz_many([states[i][f"{n}.m{j}"] for i in hit], coeffs, steps, 1e-7, lvl.ns_dtype,
                                          method)
                for i, o in zip(hit, outs):
                    held = states[i][f"{n}.o{j}"]
                    held.copy_(o if self.found is None else torch.where(self.found != 0, held, o.to(held.dtype)))
        weights = [momenta[j][2] for j in order]
        rms = lvl.hp(group, "target_rms") if stable else None
        dens = [bias_correction(b2, ts[i]) ** -0.5 if stable else 1.0 for i in mats]
        if not kernel:
            for r, i in enumerate(mats):
                os_ = [f[r] for f in fast] + [states[i][f"{n}.o{j}"] for j in order[kf:]]
                m3_read(params[i], states[i][f"{n}.exp_avg_sq"], os_, den_scale=dens[r], weights=weights,
                        eps=eps, lr=lr, decay=decay, target=rms)
            return
        cols = [[params[i], states[i][f"{n}.exp_avg_sq"]] + [f[r] for f in fast]
                + [states[i][f"{n}.o{j}"] for j in order[kf:]] for r, i in enumerate(mats)]
        rows = RowSet(cols, mutable=(0,))
        p, v = params[mats[0]], states[mats[0]][f"{n}.exp_avg_sq"]
        scal = scalar_table([[d] + weights for d in dens], p.device)
        red = torch.zeros(len(mats), dtype=torch.float32, device=p.device)
        of = fast[0][0].dtype if fast else v.dtype
        osd = states[mats[0]][f"{n}.o{order[kf]}"].dtype if len(order) > kf else v.dtype
        consts = dict(NSCAL=1 + len(order), P_DT=tl_dtype(p.dtype), S_DT=tl_dtype(v.dtype), OF_DT=tl_dtype(of),
                      OS_DT=tl_dtype(osd), KF=kf, KS=len(order) - kf, RMS=rms is not None)
        target = float(rms) if rms is not None else 0.0
        k = _kernels()
        if rms is not None:
            self.launch(k.m3_read_kernel, rows, scal, red, eps, lr, decay, target, PASS=0, block=REDUCE_BLOCK, **consts)
        self.launch(k.m3_read_kernel, rows, scal, red, eps, lr, decay, target, PASS=1, **consts)
        rows.finish()
