"""Fused steps of the chains with reductions or a Newton-Schulz read-out: Muon, M3, DeepMomentum.

* :class:`MuonStep` (``Chain(Momentum, NewtonSchulz)``): one kernel updates the momentum and
  writes the (Nesterov) read-out in the NS dtype straight into stacked per-shape buffers; one
  batched Newton-Schulz per shape (:mod:`deepopt.kernels.newton_schulz`); one kernel applies
  ``p <- (1 - lr wd) p - lr r(p) O``.
* :class:`M3Step` (``Chain(MultiScaleMomentum)``): one kernel writes every memory (and, for
  element-wise parameters, takes the whole step); matrices then get batched NS read-outs and a
  two-pass read kernel (sum of squares for the RMS match, then the step).
* :class:`DeepStep` (``Chain(DeepMemory)``): a sum-of-squares pass (for ``k = u/rms(u)``), a
  pass that writes the linear memory and sums the MLP's inner gradient, a tiny per-parameter
  update of the MLP, and the read-out pass fused with the parameter step.

Example:
    >>> import torch, deepopt
    >>> from deepopt.kernels import fused_step_for
    >>> opt = deepopt.M3([torch.nn.Parameter(torch.ones(4, 4))], lr=0.1)
    >>> type(fused_step_for(opt.chains[0], opt.param_groups[0], impl="reference")).__name__
    'M3Step'
"""

from __future__ import annotations

import torch

from ..levels.orthogonal import NS_COEFFICIENTS, adjust_lr_ratio
from . import reference as ref
from .newton_schulz import NSBatches, newton_schulz_many
from .steps import FusedStep, first_write, kernels, launch, tl_dtype
from .tables import RowSet, scalar_table

__all__ = ["MuonStep", "M3Step", "DeepStep", "ns_method"]


def ns_method(group) -> str:
    """The Newton-Schulz form of a group (key ``"ns_method"``: auto, standard or gram; default standard)."""
    return group.get("ns_method", "standard")


def _apply_orthogonal(idx, params, outs, alphas, decay, kernel) -> None:
    """p = decay p - alpha O for every row (O in any dtype, p's shape)."""
    if not kernel:
        for i, o, al in zip(idx, outs, alphas):
            ref.apply(params[i], o, alpha=al, decay=decay)
        return
    rows = RowSet([[params[i], o] for i, o in zip(idx, outs)], mutable=(0,))
    p = params[idx[0]]
    launch(kernels().apply_kernel, rows, scalar_table([[al] for al in alphas], p.device), decay, NSCAL=1,
           P_DT=tl_dtype(p.dtype), O_DT=tl_dtype(outs[0].dtype))
    rows.finish()


class MuonStep(FusedStep):
    """``Chain(Momentum (period 1), NewtonSchulz)``: MuonMemory's matrices."""

    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        mom, ns = self.chain.levels
        a = float(mom.hp(group, "momentum"))
        ema = mom.form == "ema"
        c_g = 1.0 - a if ema else 1.0 - float(mom.hp(group, "dampening"))
        nesterov = bool(mom.hp(group, "nesterov"))
        decay, coupled = self.decay_terms(lr, wd, decoupled)
        key = f"{mom.name}.momentum_buffer"
        p0 = params[idx[0]]
        batches = NSBatches([(params[i].shape[0], params[i][0].numel()) for i in idx], ns.ns_dtype or p0.dtype,
                            p0.device)
        slots = [batches.slot(j).view(params[i].shape) for j, i in enumerate(idx)]
        if kernel:
            rows = RowSet([[params[i], grads[i], states[i][key], o] for i, o in zip(idx, slots)], mutable=(2, 3))
            scal = scalar_table([[float(first_write(ts[i], a, mom.form))] for i in idx], p0.device)
            launch(kernels().momentum_kernel, rows, scal, a, c_g, lr, 1.0, wd, NSCAL=1, P_DT=tl_dtype(p0.dtype),
                   G_DT=tl_dtype(grads[idx[0]].dtype), S_DT=tl_dtype(states[idx[0]][key].dtype),
                   O_DT=tl_dtype(slots[0].dtype), EMA=ema, NESTEROV=nesterov, COUPLED=coupled, TO_OUT=True)
            rows.finish()
        else:
            for i, o in zip(idx, slots):
                ref.momentum(params[i], grads[i], states[i][key], o, first=first_write(ts[i], a, mom.form), a=a, c_g=c_g, lr=lr,
                             decay=1.0, wd=wd, ema=ema, nesterov=nesterov, coupled=coupled)
        outs = batches.run(tuple(ns.hp(group, "ns_coefficients")), int(ns.hp(group, "ns_steps")),
                           float(ns.hp(group, "eps")), ns_method(group))
        fn = ns.hp(group, "adjust_lr_fn")
        alphas = [lr * adjust_lr_ratio(params[i].shape, fn) for i in idx]
        _apply_orthogonal(idx, params, [o.view(params[i].shape) for i, o in zip(idx, outs)], alphas, decay, kernel)


class M3Step(FusedStep):
    """``Chain(MultiScaleMomentum)``: M3, matrices and element-wise parameters, any levels."""

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
                coef = (w / ref.bias_correction(beta, ti) if stable else w) if ti > 0 else 0.0
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
            den = ref.bias_correction(b2, ts[i]) ** -0.5 if stable else 1.0
            scal.append([den] + [x for lv in levels_of(ts[i]) for x in (lv[0], lv[1], float(lv[2]), lv[3])])
        if not kernel:
            for i, sc in zip(sub, scal):
                s = states[i]
                lv = [(sc[1 + 4 * k], sc[2 + 4 * k], bool(sc[3 + 4 * k]), sc[4 + 4 * k]) for k in range(len(order))]
                ref.m3_write(params[i], grads[i], s[f"{n}.exp_avg_sq"], [s[f"{n}.m{j}"] for j in order],
                             [s.get(f"{n}.acc{j}") for j in order], den_scale=sc[0], levels=lv, c_v=c_v, c_g2=c_g2,
                             eps=eps, lr=lr, decay=decay, wd=wd, step=step, coupled=coupled)
            return
        ks = len(order) - kf
        cols = [[params[i], grads[i], states[i][f"{n}.exp_avg_sq"]] + [states[i][f"{n}.m{j}"] for j in order]
                + [states[i][f"{n}.acc{j}"] for j in order[kf:]] for i in sub]
        rows = RowSet(cols, mutable=tuple(c for c in range(len(cols[0])) if c != 1))
        p, g, v = params[sub[0]], grads[sub[0]], states[sub[0]][f"{n}.exp_avg_sq"]
        launch(kernels().m3_write_kernel, rows, scalar_table(scal, p.device), c_v, c_g2, eps, lr, decay, wd,
               NSCAL=1 + 4 * len(order), P_DT=tl_dtype(p.dtype), G_DT=tl_dtype(g.dtype), S_DT=tl_dtype(v.dtype),
               KF=kf, KS=ks, STEP=step, COUPLED=coupled)
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
                    states[i][f"{n}.o{j}"].copy_(o)
        weights = [momenta[j][2] for j in order]
        rms = lvl.hp(group, "target_rms") if stable else None
        dens = [ref.bias_correction(b2, ts[i]) ** -0.5 if stable else 1.0 for i in mats]
        if not kernel:
            for r, i in enumerate(mats):
                os_ = [f[r] for f in fast] + [states[i][f"{n}.o{j}"] for j in order[kf:]]
                ref.m3_read(params[i], states[i][f"{n}.exp_avg_sq"], os_, den_scale=dens[r], weights=weights,
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
        if rms is not None:
            launch(kernels().m3_read_kernel, rows, scal, red, eps, lr, decay, target, PASS=0, **consts)
        launch(kernels().m3_read_kernel, rows, scal, red, eps, lr, decay, target, PASS=1, **consts)
        rows.finish()


class DeepStep(FusedStep):
    """``Chain(DeepMemory)``: DeepMomentum, sigma identity, sign or ns (Newton-Schulz on matrices)."""

    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        lvl = self.chain.levels[0]
        n = lvl.name
        a, eta = float(lvl.hp(group, "momentum")), float(lvl.hp(group, "inner_lr"))
        sigma = lvl.hp(group, "sigma")
        decay, coupled = self.decay_terms(lr, wd, decoupled)
        ns_rows = [i for i in idx if sigma == "ns" and params[i].ndim >= 2]
        p0 = params[idx[0]]
        batches = NSBatches([(params[i].shape[0], params[i][0].numel()) for i in ns_rows], torch.bfloat16, p0.device)
        slot = {i: batches.slot(j).view(params[i].shape) for j, i in enumerate(ns_rows)}
        keys = [f"{n}.bias", f"{n}.w1", f"{n}.b1", f"{n}.w2"]
        if not kernel:
            for i in idx:
                s = states[i]
                ref.deep(params[i], grads[i], *(s[k] for k in keys), slot.get(i), a=a, eta=eta, lr=lr, decay=decay,
                         wd=wd, sign=sigma == "sign", coupled=coupled)
        else:
            self._kernels(idx, params, grads, states, keys, slot, a, eta, lr, decay, wd, coupled, sigma)
        if ns_rows:
            outs = batches.run(NS_COEFFICIENTS, 5, 1e-7, ns_method(group))
            alphas = [lr * adjust_lr_ratio(params[i].shape, None) for i in ns_rows]
            _apply_orthogonal(ns_rows, params, [o.view(params[i].shape) for i, o in zip(ns_rows, outs)], alphas,
                              decay, kernel)

    def _kernels(self, idx, params, grads, states, keys, slot, a, eta, lr, decay, wd, coupled, sigma) -> None:
        lvl = self.chain.levels[0]
        h = lvl.hidden
        hp = 1 << max(0, (h - 1).bit_length())
        k = kernels()
        for out_rows in ([i for i in idx if i not in slot], [i for i in idx if i in slot]):
            if not out_rows:
                continue
            to_out = out_rows[0] in slot
            main = [[params[i], grads[i], states[i][keys[0]]] + ([slot[i]] if to_out else []) for i in out_rows]
            extra = [[states[i][kk] for kk in keys[1:]] for i in out_rows]
            rows = RowSet(main, mutable=(0, 2, 3) if to_out else (0, 2), extra=extra)
            wc = len(main[0])
            p, g, b = params[out_rows[0]], grads[out_rows[0]], states[out_rows[0]][keys[0]]
            dts = dict(P_DT=tl_dtype(p.dtype), G_DT=tl_dtype(g.dtype))
            sdt = tl_dtype(b.dtype)
            red = torch.zeros(len(out_rows), dtype=torch.float32, device=p.device)
            sums = torch.zeros(len(out_rows), 3, hp, dtype=torch.float32, device=p.device)
            launch(k.deep_sumsq_kernel, rows, None, red, wd, COUPLED=coupled, **dts)
            launch(k.deep_inner_kernel, rows, None, red, sums, a, wd, S_DT=sdt, COUPLED=coupled, LEARN=eta != 0,
                   H=h, HP=hp, WC=wc, block=1024, **dts)
            t = rows.tables(1024)
            k.deep_phi_kernel[(len(out_rows),)](t.ptrs, t.numel, sums, a, eta, NCOL=len(rows.rows[0]), S_DT=sdt, H=h,
                                                HP=hp, WC=wc, ALIGNED=t.aligned)
            launch(k.deep_read_kernel, rows, None, red, lr, decay, wd, S_DT=sdt,
                   O_DT=tl_dtype(slot[out_rows[0]].dtype) if to_out else sdt, COUPLED=coupled, SIGN=sigma == "sign",
                   TO_OUT=to_out, H=h, HP=hp, WC=wc, block=1024, **dts)
            rows.finish()
