"""The adaptive family: Adam's moments, the diagonal and the factored preconditioner, their reference and
foreach paths (:mod:`.level`), fused steps with their kernels' references (:mod:`.fused`) and
Triton kernels (:mod:`.triton_kernels`, imported on first use)."""

from .fused import AdamStep, PrecondMomentumStep
from .level import ADAM_FORMS, FACTORED_EPS, AdamMoments, DiagonalPreconditioner, FactoredPreconditioner

__all__ = ["ADAM_FORMS", "FACTORED_EPS", "AdamMoments", "AdamStep", "DiagonalPreconditioner", "FactoredPreconditioner",
           "PrecondMomentumStep"]
