"""The registry of named optimizers: the one table that tests, :func:`deepopt.functional.make`,
:mod:`deepopt.meta` and the benchmarks read (as ``deepopt.OPTIMIZERS``).

A new optimizer is added here once (see ``deepopt/ARCHITECTURE.md``); ``NestedOptimizer`` is
generic (it takes ``levels=``) and is not listed.

Example:
    >>> from deepopt.optim.registry import OPTIMIZERS
    >>> sorted(OPTIMIZERS)[:3]
    ['AdamMemory', 'DGD', 'DeepMomentum']
"""

from __future__ import annotations

from .adam import AdamMemory
from .base import LevelOptimizer
from .deep import DeepMomentum
from .delta import DeltaMomentum
from .dgd import DGD
from .m3 import M3
from .momentum import MomentumMemory
from .muon import MuonMemory
from .preconditioned import PreconditionedMomentum

__all__ = ["OPTIMIZERS"]

#: The named optimizers, name -> class.
OPTIMIZERS: dict[str, type[LevelOptimizer]] = {
    "MomentumMemory": MomentumMemory,
    "AdamMemory": AdamMemory,
    "MuonMemory": MuonMemory,
    "PreconditionedMomentum": PreconditionedMomentum,
    "DeltaMomentum": DeltaMomentum,
    "DeepMomentum": DeepMomentum,
    "M3": M3,
    "DGD": DGD,
}
