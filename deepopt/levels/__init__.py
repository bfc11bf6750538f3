"""Optimizer levels: each a memory with a pure reference and an in-place fast path."""

from .adaptive import AdamMoments, DiagonalPreconditioner
from .base import Direction, Level, is_boundary, level_step
from .momentum import DeltaMomentumLevel, Momentum
from .orthogonal import NewtonSchulz, newton_schulz

__all__ = [
    "AdamMoments",
    "DeltaMomentumLevel",
    "DiagonalPreconditioner",
    "Direction",
    "Level",
    "Momentum",
    "NewtonSchulz",
    "is_boundary",
    "level_step",
    "newton_schulz",
]
