"""Optimizer levels, one folder per family: each a memory with a pure reference and an in-place
foreach path (``level.py``) beside its fused step and the kernels' reference (``fused.py``) and
its Triton kernels (``triton_kernels.py``). :mod:`deepopt.levels.fused` maps chains to fused steps."""

from .adaptive import AdamMoments, DiagonalPreconditioner, FactoredPreconditioner
from .base import Direction, Level, is_boundary, level_step
from .fused import FUSED_STEPS, fused_step_class, fused_step_for
from .momentum import DeltaMomentumLevel, Momentum
from .orthogonal import NewtonSchulz, newton_schulz

__all__ = [
    "AdamMoments",
    "DeltaMomentumLevel",
    "DiagonalPreconditioner",
    "Direction",
    "FactoredPreconditioner",
    "FUSED_STEPS",
    "Level",
    "Momentum",
    "NewtonSchulz",
    "fused_step_class",
    "fused_step_for",
    "is_boundary",
    "level_step",
    "newton_schulz",
]
