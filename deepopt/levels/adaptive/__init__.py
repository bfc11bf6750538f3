"""The adaptive family: Adam's moments and the diagonal preconditioner, their reference and
foreach paths (:mod:`.level`), fused steps with their kernels' references (:mod:`.fused`) and
Triton kernels (:mod:`.triton_kernels`, imported on first use)."""

from .fused import AdamStep, PrecondMomentumStep
from .level import ADAM_FORMS, AdamMoments, DiagonalPreconditioner

__all__ = ["ADAM_FORMS", "AdamMoments", "AdamStep", "DiagonalPreconditioner", "PrecondMomentumStep"]
