"""The momentum family: momentum and delta momentum, their reference and foreach paths
(:mod:`.level`), fused steps with their kernels' references (:mod:`.fused`) and Triton kernels
(:mod:`.triton_kernels`, imported on first use)."""

from .fused import DeltaStep, MomentumStep
from .level import DeltaMomentumLevel, Momentum, as_matrix, forget_terms

__all__ = ["DeltaMomentumLevel", "DeltaStep", "Momentum", "MomentumStep", "as_matrix", "forget_terms"]
