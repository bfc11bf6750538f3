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
``precondition="factored"`` a 2-D-tiled first pass sums ``g^2`` over each row and column of every
tensor (and makes the non-finite flag), one program per tensor writes Adafactor's statistics ``r``,
``c`` and the factors ``a_i = sqrt(r_i)``, ``b_j = sqrt(c_j / mean r) / sqrt(1 - b2^t)`` (into the
sums' scratch), and the inner and read kernels divide ``g`` by ``a_i b_j + eps``
(:func:`deepopt.levels.adaptive.fused.factored`). A memory with
``normalize=False`` reads ``k = u`` (no sum-of-squares pass). With
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
from ..adaptive.fused import factored as factored_ref
from ..adaptive.level import FACTORED_EPS, DiagonalPreconditioner, FactoredPreconditioner
from ..orthogonal.batched import NSBatches
from ..orthogonal.fused import ns_method
from ..orthogonal.level import NS_COEFFICIENTS, adjust_lr_ratio
from ..precision import ns_compute_dtype
from .level import RMS_EPS, DeepMemory

__all__ = ["DeepStep", "deep", "FACTORED_TILE", "READ_TILES", "TILE", "INNER_SLICE", "INNER_WARPS"]

#: (elements per program, warps) of the read kernel, whose programs hold a (hidden, BLOCK) tile of
#: the memory MLP, by the state's bytes per element (one H100, 0.51 B parameters,
#: ``python -m benchmarks.optimizer_kernels --deep-tiles``: float32 3.62 ms at (256, 4) against
#: 4.05 at (512, 4); bfloat16 1.41 ms at (1024, 4) against 1.55). ``TILE`` overrides it (the sweep).
READ_TILES = {2: (1024, 4), 4: (256, 4), 8: (256, 4)}
TILE: tuple[int, int] | None = None
#: (rows per program, rows per chunk, columns, warps) of the factored statistics' tiled pass: one
#: atomic per row of a chunk and one per column of a program's tile (one H100, 0.51 B parameters,
#: ``python -m benchmarks.optimizer_kernels --factored-tiles``, aligned rows: 0.69 ms float32 / 0.48
#: bfloat16, against 0.89 / 0.89 at (128, 8, 256, 8) and 0.70-1.09 / 0.50-0.87 at the sweep's others)
FACTORED_TILE = (1024, 64, 64, 4)
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
         den: float = 1.0, factored: tuple[Tensor, Tensor] | None = None, normalize: bool = True) -> None:
    """The reference of the deep momentum kernels on one tensor (memory and ``p``, or ``out``, in place).

    ``v`` (``precondition=True``): the second moment, written first, ``v = b2 v + (1 - b2) u^2`` (stored
    in its dtype), and the memory's input is ``u / (sqrt(v) den + eps)``, ``den = 1/sqrt(1 - b2^t)``;
    ``factored`` (``precondition="factored"``): the row and column statistics, written first
    (:func:`deepopt.levels.adaptive.fused.factored`). ``normalize=False``: ``k = u``."""
    u = row_grad(p, g, wd, coupled).reshape(-1)
    if v is not None:
        v.copy_((b2 * f32(v).reshape(-1) + (1 - b2) * u * u).reshape(v.shape))
        u = u / (f32(v).reshape(-1).sqrt() * den + eps)
    if factored is not None:
        u = factored_ref(u, *factored, b2=b2, eps=eps, den=den)
    n = u.numel()
    k = u / (float((u * u).sum() / n) ** 0.5 + 1e-30) if normalize else u
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
    """The preconditioner's ``beta2``, ``eps`` and state keys (``precondition=True``: the second
    moment; ``"factored"``: its row and column statistics)."""

    b2: float
    eps: float
    keys: tuple[str, ...]

    @property
    def factored(self) -> bool:
        return len(self.keys) == 2

    def reference_args(self, state: dict, t: int) -> dict:
        """The keywords of :func:`deep` for one tensor's ``state`` at step ``t``."""
        held = tuple(state[k] for k in self.keys)
        moment = {"factored": held} if self.factored else {"v": held[0]}
        return dict(b2=self.b2, eps=self.eps, den=self.den(t), **moment)

    def den(self, t: int) -> float:
        """``1 / sqrt(1 - b2^t)``, the bias correction of the second moment at step ``t``."""
        return bias_correction(self.b2, t) ** -0.5


class DeepStep(FusedStep):
    """``Chain(DeepMemory)``: DeepMomentum, sigma identity, sign, rms or ns (Newton-Schulz on matrices);
    ``Chain(DiagonalPreconditioner(period 1), DeepMemory)`` or ``Chain(FactoredPreconditioner(period
    1), DeepMemory)``: the same with ``precondition=True`` or ``"factored"``; either memory input
    normalized or not."""

    def __init__(self, chain, impl: str = "auto") -> None:
        super().__init__(chain, impl)
        self._scratch: dict[tuple, _FactoredScratch] = {}

    @classmethod
    def covers(cls, chain) -> bool:
        lv = chain.levels
        return isinstance(lv[-1], DeepMemory) and (len(lv) == 1 or (
            len(lv) == 2 and type(lv[0]) in (DiagonalPreconditioner, FactoredPreconditioner) and lv[0].period == 1))

    def makes_flag(self, group) -> bool:
        """The first pass (sum of squares, or the factored statistics' sums) reads every gradient
        before the inner kernel's first store; with ``sigma="ns"`` the matrices are a second launch
        family, so not there; an unnormalized memory without factored statistics has no first pass."""
        lv = self.chain.levels
        return lv[-1].hp(group, "sigma") != "ns" and (lv[-1].normalize or type(lv[0]) is FactoredPreconditioner)

    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        lvl = self.chain.levels[-1]
        n = lvl.name
        a, eta = float(lvl.hp(group, "momentum")), float(lvl.hp(group, "inner_lr"))
        sigma = lvl.hp(group, "sigma")
        decay, coupled = self.decay_terms(lr, wd, decoupled)
        pre = None  # precondition=True or "factored": the preconditioner's constants
        if len(self.chain.levels) == 2:
            lp = self.chain.levels[0]
            keys = ((f"{lp.name}.exp_avg_sq_row", f"{lp.name}.exp_avg_sq_col")
                    if isinstance(lp, FactoredPreconditioner) else (f"{lp.name}.exp_avg_sq",))
            pre = _Precondition(float(lp.hp(group, "beta2")), float(lp.hp(group, "eps")), keys)
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
        if kernel and pre is not None and pre.factored and any(params[i].numel() >= 2 ** 31 for i in idx):
            kernel = False  # the factored kernels index a row's matrix in 32 bits: the references then
        if not kernel:
            for i in idx:
                s = states[i]
                more = {} if pre is None else pre.reference_args(s, ts[i])
                deep(params[i], grads[i], *(s[k] for k in keys), slot.get(i), a=a, eta=eta, lr=lr, decay=decay,
                     wd=wd, sign=sigma == "sign", coupled=coupled, normalize=lvl.normalize, **more)
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
        fact = pre is not None and pre.factored
        for out_rows in ([i for i in idx if i not in slot], [i for i in idx if i in slot]):
            if not out_rows:
                continue
            to_out = out_rows[0] in slot
            main = [[params[i], grads[i], states[i][keys[0]]] + ([slot[i]] if to_out else [])
                    + ([states[i][pre.keys[0]]] if pre and not fact else []) for i in out_rows]
            extra = [[states[i][kk] for kk in keys[1:]] for i in out_rows]
            wc = len(main[0])
            p, g, b = params[out_rows[0]], grads[out_rows[0]], states[out_rows[0]][keys[0]]
            scratch = None
            if fact:  # the sums' scratch (then the read's factors) at WC+3, WC+4; r, c at WC+5, WC+6
                scratch = self._factored_scratch([tuple(states[i][k].numel() for k in pre.keys) for i in out_rows],
                                                 p.device)
                for e, i, sums in zip(extra, out_rows, scratch.sums):
                    e.extend([*sums, states[i][pre.keys[0]], states[i][pre.keys[1]]])
            mutable = (0, 2) + ((3,) if to_out else ()) + ((wc - 1,) if pre and not fact else ())
            rows = RowSet(main, mutable=mutable, extra=extra, contiguous=fact)
            dts = dict(P_DT=tl_dtype(p.dtype), G_DT=tl_dtype(g.dtype), PRE=pre is not None and not fact,
                       VC=wc - 1, FACT=fact)
            sdt = tl_dtype(b.dtype)
            red = torch.zeros(len(out_rows), dtype=torch.float32, device=p.device)
            sums = torch.zeros(len(out_rows), 3, hp, dtype=torch.float32, device=p.device)
            b2, eps = (pre.b2, pre.eps) if pre else (0.0, 0.0)
            den = red if pre is None else step_scalars([ts[i] for i in out_rows], lambda t: [pre.den(t)], p.device)
            ncols = scratch.ncols if fact else red  # any pointer without FACT
            if fact:
                self._factored_statistics(rows, scratch, wc, wd, b2, den, coupled, tl_dtype(
                    states[out_rows[0]][pre.keys[0]].dtype), dts)
            if lvl.normalize:
                first = self.launch if fact else self.launch_first_pass  # the factored sums made the flag
                first(k.deep_sumsq_kernel, rows, None, red, wd, den, b2, eps, ncols, S_DT=sdt, COUPLED=coupled,
                      block=REDUCE_BLOCK, SC=wc + 3, **dts)
            block, warps = TILE or READ_TILES[b.element_size()]
            self.launch(k.deep_inner_kernel, rows, None, red, sums, a, wd, den, b2, eps, ncols, S_DT=sdt,
                        COUPLED=coupled, LEARN=eta != 0, H=h, HP=hp, WC=wc, SUB=INNER_SLICE[1], block=INNER_SLICE[0],
                        num_warps=INNER_WARPS, NORM=lvl.normalize, **dts)
            t = rows.tables(1024)
            flag = self.found if self.found is not None else red  # any pointer when CHECK is off
            k.deep_phi_kernel[(len(out_rows),)](t.ptrs, t.numel, flag, sums, a, eta, NCOL=len(rows.rows[0]), S_DT=sdt,
                                                H=h, HP=hp, WC=wc, ALIGNED=t.aligned, CHECK=self.found is not None)
            self.launch(k.deep_read_kernel, rows, None, red, red if sq is None else sq, lr, decay, wd, den, b2, eps,
                        ncols, S_DT=sdt,
                        O_DT=tl_dtype(slot[out_rows[0]].dtype) if to_out else sdt, COUPLED=coupled,
                        SIGN=sigma == "sign", TO_OUT=to_out, SUMSQ=sq is not None, H=h, HP=hp, WC=wc, block=block,
                        num_warps=warps, NORM=lvl.normalize, **dts)
            rows.finish()

    def _factored_scratch(self, shape: list[tuple[int, int]], device: torch.device) -> "_FactoredScratch":
        """The persistent scratch of the factored statistics for tensors of these (rows, columns)
        (stable addresses keep the launch tables cached)."""
        key = (device, tuple(shape))
        hit = self._scratch.get(key)
        if hit is None:
            hit = self._scratch[key] = _FactoredScratch(shape, device)
            if len(self._scratch) > 16:
                self._scratch.pop(next(iter(self._scratch)))
        return hit

    def _factored_statistics(self, rows: RowSet, scratch: "_FactoredScratch", wc: int, wd: float, b2: float,
                             den: Tensor, coupled: bool, f_dt, dts: dict) -> None:
        """The tiled pass of row and column sums of ``u^2`` (the step's first pass: it makes the
        flag where this call does), then the statistics ``r``, ``c`` and the read's factors."""
        from ..adaptive import triton_kernels as ak

        scratch.flat.zero_()
        tr, br, bc, warps = FACTORED_TILE
        t = rows.tile_tables(scratch.cols, tr, bc)
        make = self.make_flag
        flag = self.found if self.found is not None else scratch.flat  # any pointer when CHECK is off
        ak.factored_sums_kernel[t.grid](t.ptrs, t.numel, t.blk_row, t.blk_start, flag, scratch.ncols, wd,
                                        NCOL=len(rows.rows[0]), P_DT=dts["P_DT"], G_DT=dts["G_DT"], COUPLED=coupled,
                                        RC=wc + 3, TR=tr, BR=br, BC=bc, ALIGNED=t.aligned,
                                        CHECK=self.found is not None and not make,
                                        FLAG_OUT=make, num_warps=warps)
        t = rows.tables(1024)
        ak.factored_moment_kernel[(len(rows),)](t.ptrs, t.numel, flag, scratch.ncols, den, b2, FACTORED_EPS,
                                                NCOL=len(rows.rows[0]), F_DT=f_dt, FC=wc + 5, RC=wc + 3,
                                                CHUNK=1024, ALIGNED=t.aligned, CHECK=self.found is not None)


class _FactoredScratch:
    """Per list of shapes: the float32 sums of ``u^2`` over each row and each column of every tensor,
    then the read's factors (views of one buffer, each 16-byte aligned), and the column counts."""

    def __init__(self, shape: list[tuple[int, int]], device: torch.device) -> None:
        sizes = [-(-n // 4) * 4 for rc in shape for n in rc]  # 16-byte multiples
        self.flat = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
        views = [v[:n] for v, n in zip(self.flat.split(sizes), (n for rc in shape for n in rc))]
        self.sums = list(zip(views[::2], views[1::2]))
        self.cols = [c for _, c in shape]
        self.ncols = torch.tensor(self.cols, dtype=torch.int64, device=device)
