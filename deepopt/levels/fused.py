"""Which fused step runs a chain: the one table of the families' fused steps.

The shell (:class:`deepopt.optim.base.LevelOptimizer`) asks :func:`fused_step_for` for each chain
when ``impl="auto"`` on CUDA (or ``impl="triton"``); ``None`` keeps the chain's foreach path.
Each step class says which chains it fuses (``covers``); they live beside their levels:

| chain | step | optimizer |
|---|---|---|
| ``Momentum`` (sgd or ema, period 1) | ``momentum.MomentumStep`` | MomentumMemory |
| ``AdamMoments`` (ema or accumulate) | ``adaptive.AdamStep`` | AdamMemory, MuonMemory's fallback |
| ``DiagonalPreconditioner`` (any period) + ``Momentum`` (sgd) | ``adaptive.PrecondMomentumStep`` | PreconditionedMomentum |
| ``DeltaMomentumLevel`` | ``momentum.DeltaStep`` | DeltaMomentum |
| ``Momentum`` + ``NewtonSchulz`` | ``orthogonal.MuonStep`` | MuonMemory |
| ``MultiScaleMomentum`` | ``multiscale.M3Step`` | M3 |
| ``DeepMemory``, or ``DiagonalPreconditioner`` / ``FactoredPreconditioner`` (period 1) + ``DeepMemory`` | ``deep.DeepStep`` | DeepMomentum (sigma identity, sign, rms, ns; ``precondition`` True or "factored"; ``normalize``) |

Not covered (``None``): a Momentum, AdamMoments or DeltaMomentumLevel level with a period > 1,
float64 parameters (the kernels compute in float32), ``amsgrad=True``, and any other chain.

Example:
    >>> import torch, deepopt
    >>> from deepopt.levels.fused import fused_step_for
    >>> opt = deepopt.MomentumMemory([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    >>> type(fused_step_for(opt.chains[0], opt.param_groups[0])).__name__
    'MomentumStep'
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..kernels.launch import FusedStep
from .adaptive.fused import AdamStep, PrecondMomentumStep
from .deep.fused import DeepStep
from .momentum.fused import DeltaStep, MomentumStep
from .multiscale.fused import M3Step
from .orthogonal.fused import MuonStep

__all__ = ["FUSED_STEPS", "fused_step_class", "fused_step_for"]

#: every fused step, asked in order which chain it covers
FUSED_STEPS: tuple[type[FusedStep], ...] = (MomentumStep, AdamStep, DeltaStep, M3Step, DeepStep,
                                            PrecondMomentumStep, MuonStep)
_STEPS: dict[tuple[int, str], FusedStep] = {}


def fused_step_class(chain: Any) -> type[FusedStep] | None:
    """The fused step class that covers ``chain`` (by its levels' types and periods), or None."""
    return next((cls for cls in FUSED_STEPS if cls.covers(chain)), None)


def fused_step_for(chain: Any, group: Mapping[str, Any], impl: str = "auto") -> FusedStep | None:
    """The fused step for ``chain`` and this param group, or None where the chain is not covered.

    Args:
        chain: the chain the shell would run.
        group: the param group (its parameters' dtypes are checked; float64 is not covered).
        impl: ``"auto"``, ``"triton"``, ``"reference"`` or ``"foreach"`` (see :class:`~deepopt.kernels.launch.FusedStep`).
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
