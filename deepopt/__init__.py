"""deepopt: optimizers as associative memories (Nested Learning), as drop-in torch.optim optimizers.

Example:
    >>> import torch, deepopt
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = deepopt.OPTIMIZERS["M3"](model.parameters(), lr=1e-3)
"""

from . import continual, distributed, functional, levels, meta, pretrained
from .chain import Chain
from .optim import (
    DGD,
    M3,
    AdamMemory,
    DeepMomentum,
    DeltaMomentum,
    LevelOptimizer,
    MomentumMemory,
    MuonMemory,
    NestedOptimizer,
    PreconditionedMomentum,
)
from .optim.registry import OPTIMIZERS
from .periods import group_by_period, match_periods

__version__ = "0.1.0"

__all__ = [
    "DGD",
    "M3",
    "OPTIMIZERS",
    "AdamMemory",
    "Chain",
    "DeepMomentum",
    "DeltaMomentum",
    "LevelOptimizer",
    "MomentumMemory",
    "MuonMemory",
    "NestedOptimizer",
    "PreconditionedMomentum",
    "group_by_period",
    "continual",
    "distributed",
    "functional",
    "levels",
    "meta",
    "match_periods",
    "pretrained",
]
