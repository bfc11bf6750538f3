"""The multi-scale family (M3): the level with its reference path (:mod:`.level`), the fused step
with its kernels' references (:mod:`.fused`) and Triton kernels (:mod:`.triton_kernels`)."""

from .fused import M3Step
from .level import M3_FORMS, MultiScaleMomentum

__all__ = ["M3Step", "M3_FORMS", "MultiScaleMomentum"]
