"""DeepMomentum's fused step, with the tensor-by-tensor reference of its kernels.

:class:`DeepStep` (``Chain(DeepMemory)``, sigma identity, sign, rms or ns), per list of rows:

    sum u^2                                  (deep_sumsq_kernel: k = u / rms(u))
    bias = a bias + u;  S = (sum u h_j, sum u (1 - h_j^2), sum u (1 - h_j^2) k),  h_j = tanh(w1_j k + b1_j)
                                             (deep_inner_kernel)
    w2 = a w2 + eta S_0 / n,  w1 += eta w2_old S_2 / n,  b1 += eta w2_old S_1 / n   (deep_phi_kernel)
    m = bias + sum_j w2_j tanh(w1_j k + b1_j) (new memory);  p = decay p - lr sigma(m)  (deep_read_kernel)

with ``precondition=True`` the memory's input ``u`` is ``g / (sqrt(v) / sqrt(1 - b2^t) + eps)``: the
sum-of-squares pass computes the new second moment ``v = b2 v + (1 - b2) g^2`` without storing it
(it is also the non-finite check), the inner kernel stores it, the read kernel reads it back. With
``sigma="ns"`` the read-out goes to stacked buffers, a batched Newton-Schulz and the apply
kernel; with ``sigma="rms"`` every row's read-out goes to a buffer while the read kernel sums its
squares, then the apply kernel steps ``p = decay p - lr m / (sqrt(sum m^2 / n) + eps)`` (scales
computed on the device: no host read). :func:`deep` does to one tensor what these kernels
(:mod:`deepopt.levels.deep.triton_kernels`) do to each row (float32 math).

Example:
    >>> import torch, deepopt
    >>> from deepopt.levels import fused_step_for
    >>> opt = deepopt.DeepMomentum([torch.nn.Parameter(torch.ones(4))], lr=0.1)
    >>> type(fused_step_for(opt.chains[0], opt.param_groups[0], impl="reference")).__name__
    'DeepStep'
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ...kernels.launch import (REDUCE_BLOCK, FusedStep, apply_rows, bias_correction, f32, row_grad, row_step, tanh,
                               tl_dtype)
from ...kernels.tables import RowSet, step_scalars
from ..adaptive.level import DiagonalPreconditioner
from ..orthogonal.batched import NSBatches
from ..orthogonal.fused import ns_method
from ..orthogonal.level import NS_COEFFICIENTS, adjust_lr_ratio
from ..precision import ns_compute_dtype
from .level import RMS_EPS, DeepMemory

__all__ = ["DeepStep", "deep", "READ_TILES", "TILE", "INNER_SLICE", "INNER_WARPS"]

#: (elements per program, warps) of the read kernel, whose programs hold a (hidden, BLOCK) tile of
#: the memory MLP, by the state's bytes per element (one H100, 0.51 B parameters,
#: ``python -m benchmarks.optimizer_kernels --deep-tiles``: float32 3.62 ms at (256, 4) against
#: 4.05 at (512, 4); bfloat16 1.41 ms at (1024, 4) against 1.55). ``TILE`` overrides it (the sweep).
READ_TILES = {2: (1024, 4), 4: (256, 4), 8: (256, 4)}
TILE: tuple[int, int] | None = None
#: (elements per program, elements per slice) and warps of the inner kernel, which walks its block
#: in (hidden, slice) tiles and reduces over the block once (same sweep: (8192, 256) 4.38 ms float32,
#: 3.88 bfloat16, against 5.35 / 4.85 at (2048, 256): fewer partial sums to reduce)
INNER_SLICE = (8192, 256)
INNER_WARPS = 4


def _kernels():
    from . import triton_kernels

    return triton_kernels


def deep(p: Tensor, g: Tensor, bias: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, out: Tensor | None, *,
         a: float, eta: float, lr: float, decay: float, wd: float, sign: bool = False,
         coupled: bool = False, v: Tensor | None = None, b2: float = 0.0, eps: float = 0.0,
         den: float = 1.0) -> None:
    """The reference of the deep momentum kernels on one tensor (memory and ``p``, or ``out``, in place).

    ``v`` (``precondition=True``): the second moment, written first, ``v = b2 v + (1 - b2) u^2`` (stored
    in its dtype), and the memory's input is ``u / (sqrt(v) den + eps)``, ``den = 1/sqrt(1 - b2^t)``."""
    u = row_grad(p, g, wd, coupled).reshape(-1)
    if v is not None:
        v.copy_((b2 * f32(v).reshape(-1) + (1 - b2) * u * u).reshape(v.shape))
        u = u / (f32(v).reshape(-1).sqrt() * den + eps)
    n = u.numel()
    k = u / (float((u * u).sum() / n) ** 0.5 + 1e-30)
    fw1, fb1, fw2 = f32(w1), f32(b1), f32(w2)
    nb = a * f32(bias).reshape(-1) + u
    if eta != 0:
        h = tanh(k[:, None] * fw1 + fb1)
        dh = u[:, None] * (1 - h * h)
        nw2 = a * fw2 + eta * (u[:, None] * h).sum(0) / n
        nw1 = fw1 + eta * fw2 * (dh * k[:, None]).sum(0) / n
        nb1 = fb1 + eta * fw2 * dh.sum(0) / n
    else:
        nw1, nb1, nw2 = fw1, fb1, a * fw2
    bias.copy_(nb.reshape(bias.shape))
    w1.copy_(nw1)
    b1.copy_(nb1)
    w2.copy_(nw2)
    d = nb + tanh(k[:, None] * nw1 + nb1) @ nw2
    if sign:
        d = d.sign()
    if out is not None:
        out.copy_(d.reshape(out.shape))
    else:
        row_step(p, d.reshape(p.shape), lr, decay)


class _Precondition(NamedTuple):
    """``precondition=True``: the preconditioner's ``beta2``, ``eps`` and second-moment state key."""

    b2: float
    eps: float
    key: str

    def den(self, t: int) -> float:
        """``1 / sqrt(1 - b2^t)``, the bias correction of the second moment at step ``t``."""
        return bias_correction(self.b2, t) ** -0.5


class DeepStep(FusedStep):
    """``Chain(DeepMemory)``: DeepMomentum, sigma identity, sign, rms or ns (Newton-Schulz on matrices);
    ``Chain(DiagonalPreconditioner(period 1), DeepMemory)``: the same with ``precondition=True``.
    A memory with ``normalize=False`` or a factored preconditioner runs its foreach path."""

    @classmethod
    def covers(cls, chain) -> bool:
        lv = chain.levels
        return isinstance(lv[-1], DeepMemory) and lv[-1].normalize and (len(lv) == 1 or (
            len(lv) == 2 and type(lv[0]) is DiagonalPreconditioner and lv[0].period == 1))

    def makes_flag(self, group) -> bool:
        """The sum-of-squares pass reads every gradient before the inner kernel's first store; with
        ``sigma="ns"`` the matrices are a second launch family, so not there."""
        return self.chain.levels[-1].hp(group, "sigma") != "ns"

    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        lvl = self.chain.levels[-1]
        n = lvl.name
        a, eta = float(lvl.hp(group, "momentum")), float(lvl.hp(group, "inner_lr"))
        sigma = lvl.hp(group, "sigma")
        decay, coupled = self.decay_terms(lr, wd, decoupled)
        pre = None  # precondition=True: the preconditioner's constants
        if len(self.chain.levels) == 2:
            lp = self.chain.levels[0]
            pre = _Precondition(float(lp.hp(group, "beta2")), float(lp.hp(group, "eps")), f"{lp.name}.exp_avg_sq")
        ns_rows = [i for i in idx if sigma == "ns" and params[i].ndim >= 2]
        p0 = params[idx[0]]
        batches = NSBatches([(params[i].shape[0], params[i][0].numel()) for i in ns_rows],
                            ns_compute_dtype(torch.bfloat16, "auto", p0.device), p0.device)
        slot = {i: batches.slot(j).view(params[i].shape) for j, i in enumerate(ns_rows)}
        keys = [f"{n}.bias", f"{n}.w1", f"{n}.b1", f"{n}.w2"]
        sq = None
        if sigma == "rms":  # every row's read-out to one flat buffer in the memory's dtype
            bias = states[idx[0]][keys[0]]
            flat = torch.empty(sum(params[i].numel() for i in idx), dtype=bias.dtype, device=bias.device)
            slot = {i: v.view(params[i].shape) for i, v in zip(idx, flat.split([params[i].numel() for i in idx]))}
            sq = torch.zeros(len(idx), dtype=torch.float32, device=bias.device)
        if not kernel:
            for i in idx:
                s = states[i]
                more = {} if pre is None else dict(v=s[pre.key], b2=pre.b2, eps=pre.eps, den=pre.den(ts[i]))
                deep(params[i], grads[i], *(s[k] for k in keys), slot.get(i), a=a, eta=eta, lr=lr, decay=decay,
                     wd=wd, sign=sigma == "sign", coupled=coupled, **more)
            if sq is not None:
                sq = torch.stack([f32(slot[i]).square().sum() for i in idx])
        else:
            self._kernels(idx, params, grads, states, ts, keys, slot, a, eta, lr, decay, wd, coupled, sigma, sq, pre)
        if sq is not None:
            n_el = torch.tensor([float(params[i].numel()) for i in idx]).to(sq.device, non_blocking=True)
            alphas = lr / ((sq / n_el).sqrt() + RMS_EPS)
            apply_rows(self, idx, params, [slot[i] for i in idx], alphas, decay, kernel)
        if ns_rows:
            outs = batches.run(NS_COEFFICIENTS, 5, 1e-7, ns_method(group))
            alphas = [lr * adjust_lr_ratio(params[i].shape, None) for i in ns_rows]
            apply_rows(self, ns_rows, params, [o.view(params[i].shape) for i, o in zip(ns_rows, outs)], alphas,
                       decay, kernel)

    def _kernels(self, idx, params, grads, states, ts, keys, slot, a, eta, lr, decay, wd, coupled, sigma, sq,
                 pre) -> None:
        lvl = self.chain.levels[-1]
        h = lvl.hidden
        hp = 1 << max(0, (h - 1).bit_length())
        k = _kernels()
        for out_rows in ([i for i in idx if i not in slot], [i for i in idx if i in slot]):
            if not out_rows:
                continue
            to_out = out_rows[0] in slot
            main = [[params[i], grads[i], states[i][keys[0]]] + ([slot[i]] if to_out else [])
                    + ([states[i][pre.key]] if pre else []) for i in out_rows]
            extra = [[states[i][kk] for kk in keys[1:]] for i in out_rows]
            wc = len(main[0])
            rows = RowSet(main, mutable=(0, 2) + ((3,) if to_out else ()) + ((wc - 1,) if pre else ()), extra=extra)
            p, g, b = params[out_rows[0]], grads[out_rows[0]], states[out_rows[0]][keys[0]]
            dts = dict(P_DT=tl_dtype(p.dtype), G_DT=tl_dtype(g.dtype), PRE=pre is not None, VC=wc - 1)
            sdt = tl_dtype(b.dtype)
            red = torch.zeros(len(out_rows), dtype=torch.float32, device=p.device)
            sums = torch.zeros(len(out_rows), 3, hp, dtype=torch.float32, device=p.device)
            b2, eps = (pre.b2, pre.eps) if pre else (0.0, 0.0)
            den = red if pre is None else step_scalars([ts[i] for i in out_rows], lambda t: [pre.den(t)], p.device)
            self.launch_first_pass(k.deep_sumsq_kernel, rows, None, red, wd, den, b2, eps, S_DT=sdt, COUPLED=coupled,
                                   block=REDUCE_BLOCK, **dts)
            block, warps = TILE or READ_TILES[b.element_size()]
            self.launch(k.deep_inner_kernel, rows, None, red, sums, a, wd, den, b2, eps, S_DT=sdt, COUPLED=coupled,
                        LEARN=eta != 0, H=h, HP=hp, WC=wc, SUB=INNER_SLICE[1], block=INNER_SLICE[0],
                        num_warps=INNER_WARPS, **dts)
            t = rows.tables(1024)
            flag = self.found if self.found is not None else red  # any pointer when CHECK is off
            k.deep_phi_kernel[(len(out_rows),)](t.ptrs, t.numel, flag, sums, a, eta, NCOL=len(rows.rows[0]), S_DT=sdt,
                                                H=h, HP=hp, WC=wc, ALIGNED=t.aligned, CHECK=self.found is not None)
            self.launch(k.deep_read_kernel, rows, None, red, red if sq is None else sq, lr, decay, wd, den, b2, eps,
                        S_DT=sdt,
                        O_DT=tl_dtype(slot[out_rows[0]].dtype) if to_out else sdt, COUPLED=coupled,
                        SIGN=sigma == "sign", TO_OUT=to_out, SUMSQ=sq is not None, H=h, HP=hp, WC=wc, block=block,
                        num_warps=warps, **dts)
            rows.finish()
