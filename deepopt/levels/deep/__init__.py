"""The deep-momentum family (DMGD): the memory level with its reference and foreach paths
(:mod:`.level`), the fused step with its kernels' reference (:mod:`.fused`) and Triton kernels
(:mod:`.triton_kernels`)."""

from .fused import DeepStep
from .level import SIGMAS, DeepMemory, default_memory_init, straight_through_sign

__all__ = ["DeepMemory", "DeepStep", "SIGMAS", "default_memory_init", "straight_through_sign"]
