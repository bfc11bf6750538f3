"""MuonMemory's fused step: momentum into stacked buffers, batched Newton-Schulz, one apply launch.

:class:`MuonStep` (``Chain(Momentum (period 1), NewtonSchulz)``):

    buf = momentum write (sgd or ema form),  o = buf or its Nesterov look-ahead   (momentum_kernel)
    O = NS(o)      batched per shape, in the NS dtype (:mod:`deepopt.levels.orthogonal.batched`;
                   the Gram form where ``ns_method`` takes it)
    p = (1 - lr wd) p - lr r(p) O                                                    (apply_kernel)

The momentum kernel writes the read-out in the NS dtype straight into the stacked per-shape
buffers (no stacking copy); its reference is :func:`deepopt.levels.momentum.fused.momentum` with
``out``, the apply's is :func:`deepopt.kernels.launch.apply_rows`.

Example:
    >>> import torch, deepopt
    >>> from deepopt.levels import fused_step_for
    >>> opt = deepopt.MuonMemory([torch.nn.Parameter(torch.ones(4, 4))], lr=0.1)
    >>> type(fused_step_for(opt.chains[0], opt.param_groups[0], impl="reference")).__name__
    'MuonStep'
"""

from __future__ import annotations

from typing import Any, Mapping

from ...kernels.launch import FusedStep, apply_rows, first_write, tl_dtype
from ...kernels.tables import RowSet, scalar_table
from ..momentum.fused import momentum, momentum_terms
from ..momentum.level import Momentum
from ..precision import ns_compute_dtype
from .batched import NSBatches
from .level import NewtonSchulz, adjust_lr_ratio, check_ns_method

__all__ = ["MuonStep", "ns_method"]


def ns_method(group: Mapping[str, Any]) -> str:
    """The Newton-Schulz form of a group (key ``"ns_method"``: auto, standard or gram; standard where
    the group has none; MuonMemory and M3 write ``"auto"``)."""
    return check_ns_method(group)


class MuonStep(FusedStep):
    """``Chain(Momentum (period 1), NewtonSchulz)``: MuonMemory's matrices."""

    @classmethod
    def covers(cls, chain) -> bool:
        lv = chain.levels
        return (len(lv) == 2 and isinstance(lv[0], Momentum) and lv[0].period == 1
                and isinstance(lv[1], NewtonSchulz))

    def run(self, idx, params, grads, states, group, ts, lr, wd, decoupled, kernel) -> None:
        mom, ns = self.chain.levels
        a, c_g, ema, nesterov = momentum_terms(mom, group)
        decay, coupled = self.decay_terms(lr, wd, decoupled)
        key = f"{mom.name}.momentum_buffer"
        p0 = params[idx[0]]
        batches = NSBatches([(params[i].shape[0], params[i][0].numel()) for i in idx],
                            ns_compute_dtype(ns.ns_dtype or p0.dtype, ns_method(group), p0.device), p0.device)
        slots = [batches.slot(j).view(params[i].shape) for j, i in enumerate(idx)]
        if kernel:
            from ..momentum import triton_kernels

            rows = RowSet([[params[i], grads[i], states[i][key], o] for i, o in zip(idx, slots)], mutable=(2, 3))
            scal = scalar_table([[float(first_write(ts[i], a, mom.form))] for i in idx], p0.device)
            self.launch(triton_kernels.momentum_kernel, rows, scal, a, c_g, lr, 1.0, wd, NSCAL=1,
                        P_DT=tl_dtype(p0.dtype), G_DT=tl_dtype(grads[idx[0]].dtype),
                        S_DT=tl_dtype(states[idx[0]][key].dtype), O_DT=tl_dtype(slots[0].dtype), EMA=ema,
                        NESTEROV=nesterov, COUPLED=coupled, TO_OUT=True)
            rows.finish()
        else:
            for i, o in zip(idx, slots):
                momentum(params[i], grads[i], states[i][key], o, first=first_write(ts[i], a, mom.form), a=a, c_g=c_g,
                         lr=lr, decay=1.0, wd=wd, ema=ema, nesterov=nesterov, coupled=coupled)
        outs = batches.run(tuple(ns.hp(group, "ns_coefficients")), int(ns.hp(group, "ns_steps")),
                           float(ns.hp(group, "eps")), ns_method(group))
        fn = ns.hp(group, "adjust_lr_fn")
        alphas = [lr * adjust_lr_ratio(params[i].shape, fn) for i in idx]
        apply_rows(self, idx, params, [o.view(params[i].shape) for i, o in zip(idx, outs)], alphas, decay, kernel)
