"""The orthogonal family: Newton-Schulz as a level (:mod:`.level`), batched over many matrices
(:mod:`.batched`), and MuonMemory's fused step (:mod:`.fused`)."""

from .batched import (NSBatches, gram_newton_schulz, newton_schulz_batched, newton_schulz_many, ns_flops,
                      orthogonality_error, orthogonalize_one)
from .fused import MuonStep, ns_method
from .level import ADJUST_LR_FNS, NS_COEFFICIENTS, NewtonSchulz, adjust_lr_ratio, check_ns_method, newton_schulz

__all__ = ["ADJUST_LR_FNS", "MuonStep", "NSBatches", "NS_COEFFICIENTS", "NewtonSchulz", "adjust_lr_ratio",
           "check_ns_method", "gram_newton_schulz", "newton_schulz", "newton_schulz_batched", "newton_schulz_many",
           "ns_flops", "ns_method", "orthogonality_error", "orthogonalize_one"]
