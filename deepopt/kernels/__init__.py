"""Fused optimizer steps (Triton, one launch per parameter list) and a batched Newton-Schulz.

The shell (:class:`deepopt.optim.base.LevelOptimizer`) asks :func:`fused_step_for` for a fused
step of each chain when ``impl="auto"`` on CUDA (or ``impl="triton"``); a chain without one
(``None``) keeps the foreach path. Covered chains:

| chain | optimizer |
|---|---|
| ``Momentum`` (sgd or ema, period 1) | MomentumMemory |
| ``AdamMoments`` (ema or accumulate) | AdamMemory, MuonMemory's fallback |
| ``DiagonalPreconditioner`` (any period) + ``Momentum`` (sgd) | PreconditionedMomentum |
| ``DeltaMomentumLevel`` | DeltaMomentum (vectors in-kernel; matrices' forget term by matmul) |
| ``Momentum`` + ``NewtonSchulz`` | MuonMemory |
| ``MultiScaleMomentum`` | M3 (matrices and element-wise parameters) |
| ``DeepMemory`` | DeepMomentum (sigma identity, sign, ns) |

Not covered (``None``): a Momentum, AdamMoments or DeltaMomentumLevel level with a period > 1,
float64 parameters (the kernels compute in float32), ``amsgrad=True``, and any other chain.

fp32 state for bf16 parameters: set ``state_dtype=torch.float32`` in a param group; the shell
creates the state in that dtype and the kernels read and write it as such.

Example:
    >>> import torch, deepopt
    >>> from deepopt.kernels import fused_step_for
    >>> opt = deepopt.MomentumMemory([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    >>> type(fused_step_for(opt.chains[0], opt.param_groups[0])).__name__
    'MomentumStep'
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..chain import Chain
from ..levels import AdamMoments, DeltaMomentumLevel, DiagonalPreconditioner, Momentum, NewtonSchulz
from ..levels.deep import DeepMemory
from ..levels.multiscale import MultiScaleMomentum
from .newton_schulz import NSBatches, newton_schulz_batched, newton_schulz_many, ns_flops, orthogonality_error
from .steps import IMPLS, AdamStep, DeltaStep, FusedStep, MomentumStep, PrecondMomentumStep
from .steps_matrix import DeepStep, M3Step, MuonStep

__all__ = [
    "IMPLS",
    "AdamStep",
    "DeepStep",
    "DeltaStep",
    "FusedStep",
    "M3Step",
    "MomentumStep",
    "MuonStep",
    "NSBatches",
    "PrecondMomentumStep",
    "fused_step_for",
    "fused_step_class",
    "newton_schulz_batched",
    "newton_schulz_many",
    "ns_flops",
    "orthogonality_error",
]

_STEPS: dict[tuple[int, str], FusedStep] = {}


def fused_step_class(chain: Chain) -> type[FusedStep] | None:
    """The fused step class that covers ``chain`` (by its levels' types and periods), or None."""
    lv = chain.levels
    if len(lv) == 1:
        (l0,) = lv
        if isinstance(l0, Momentum) and l0.period == 1:
            return MomentumStep
        if isinstance(l0, AdamMoments) and l0.period == 1:
            return AdamStep
        if isinstance(l0, DeltaMomentumLevel) and l0.period == 1:
            return DeltaStep
        if isinstance(l0, MultiScaleMomentum):
            return M3Step
        if isinstance(l0, DeepMemory):
            return DeepStep
    if len(lv) == 2:
        l0, l1 = lv
        if isinstance(l0, DiagonalPreconditioner) and isinstance(l1, Momentum) and l1.form == "sgd" and l1.period == 1:
            return PrecondMomentumStep
        if isinstance(l0, Momentum) and l0.period == 1 and isinstance(l1, NewtonSchulz):
            return MuonStep
    return None


def fused_step_for(chain: Chain, group: Mapping[str, Any], impl: str = "auto") -> FusedStep | None:
    """The fused step for ``chain`` and this param group, or None where the chain is not covered.

    Args:
        chain: the chain the shell would run.
        group: the param group (its parameters' dtypes are checked; float64 is not covered).
        impl: ``"auto"``, ``"triton"``, ``"reference"`` or ``"foreach"`` (see :mod:`deepopt.kernels.steps`).
    """
    cls = fused_step_class(chain)
    if cls is None or any(p.dtype == torch.float64 for p in group.get("params", ())):
        return None
    if group.get("amsgrad", False):  # AMSGrad's running maximum has no kernel: the foreach path runs it
        return None
    key = (id(chain), impl)
    step = _STEPS.get(key)
    if step is None or step.chain is not chain:
        step = _STEPS[key] = cls(chain, impl)
    return step
