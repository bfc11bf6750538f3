"""The torch.optim shells: one file per named optimizer."""

from .adam import AdamMemory
from .base import LevelOptimizer
from .deep import DeepMomentum
from .delta import DeltaMomentum
from .dgd import DGD
from .m3 import M3
from .momentum import MomentumMemory
from .muon import MuonMemory
from .nested import NestedOptimizer
from .preconditioned import PreconditionedMomentum
from .registry import OPTIMIZERS

__all__ = [
    "AdamMemory",
    "DGD",
    "DeepMomentum",
    "DeltaMomentum",
    "LevelOptimizer",
    "M3",
    "MomentumMemory",
    "MuonMemory",
    "NestedOptimizer",
    "OPTIMIZERS",
    "PreconditionedMomentum",
]
