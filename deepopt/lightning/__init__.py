"""Lightning callbacks that give any LightningModule multi-timescale parameter levels.

* :class:`MultiTimescale` -- parameters of period C accumulate gradients over C optimizer steps
  and are stepped only at the boundary (their optimizer state advances only then).
* :class:`LevelMonitor` -- logs per-level update norms, update fractions and optimizer memory
  statistics to the Trainer's loggers.
* :class:`NestLevels` -- applies ``nl_layers.nest`` in ``setup``, before the optimizer is built.
* :class:`PeriodicGradients` -- the rule itself, for plain training loops (no Lightning needed).
* :class:`ContinualRecipe` -- :class:`deepopt.continual.Recipe`'s slow level (consolidation at task
  boundaries, importance-weighted pull, distillation) for any LightningModule.

Lightning is imported only when a callback is first accessed, so ``import deepopt`` and
``from deepopt.lightning import PeriodicGradients`` work without it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ContinualRecipe", "LevelMonitor", "MultiTimescale", "NestLevels", "PeriodicGradients", "resolve_levels"]

_WHERE = {
    "ContinualRecipe": ".continual",
    "MultiTimescale": ".multi_timescale",
    "LevelMonitor": ".level_monitor",
    "NestLevels": ".nest_levels",
    "PeriodicGradients": "._periods",
    "resolve_levels": "._periods",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'deepopt.lightning' has no attribute {name!r}")
    try:
        module = importlib.import_module(_WHERE[name], __name__)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("lightning", "pytorch_lightning"):
            raise ModuleNotFoundError(
                f"deepopt.lightning.{name} needs Lightning: pip install 'deepopt-nl[lightning]'"
            ) from err
        raise
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
