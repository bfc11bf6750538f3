"""Continual learning with multi-timescale levels: a fast level that learns each task, a slow level
written from it (consolidation) that keeps it from forgetting, and the literature's metrics.

Example:
    >>> import torch, deepopt
    >>> model = torch.nn.Linear(4, 3)
    >>> recipe = deepopt.continual.Recipe(model, lr=1e-2)
    >>> deepopt.continual.metrics.backward_transfer([[0.9, 0.2], [0.6, 0.8]])
    -0.30000000000000004
"""

from . import clock, consolidation, distill, importance, levels, metrics
from .clock import SurpriseClock, TaskClock
from .consolidation import SlowLevel
from .distill import SlowDistillation
from .importance import Importance
from .levels import build_optimizer, cms_levels, level_groups
from .recipe import DEFAULTS, ContinualEngine, Recipe

__all__ = ["DEFAULTS", "ContinualEngine", "Importance", "Recipe", "SlowDistillation", "SlowLevel", "SurpriseClock",
           "TaskClock", "build_optimizer", "clock", "cms_levels", "consolidation", "distill", "importance",
           "level_groups", "levels", "metrics"]
