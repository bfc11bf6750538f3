r"""Level clocks: when a slow level is written, from the task or data stream instead of a fixed count.

A clock answers, once per training step, whether the slow level is due (``tick``). Three kinds:

* ``TaskClock``: due every ``C`` steps (``period=C``), or never by itself (``period=None``): then
  only the task boundaries the caller announces (``Recipe.end_task``) write the slow level.
* ``SurpriseClock``: the boundary is found in the loss stream. With a running mean :math:`\mu_t` and
  variance :math:`\sigma_t^2` of the loss (exponential, factor ``beta``), step :math:`t` is a boundary when

  .. math:: \ell_t > \mu_{t-1} + k\,\sigma_{t-1} \quad\text{and}\quad \ell_t > (1 + r)\,\mu_{t-1}

  (a jump of ``k`` standard deviations and a relative rise ``r``; ``tick(loss)`` takes the loss), after ``warmup`` steps and at
  least ``min_gap`` steps after the last one. After a boundary the statistics restart from the new
  loss, so one shift gives one tick.

Example:
    >>> clock = SurpriseClock(warmup=5, min_gap=5)
    >>> ticks = [clock.tick(1.0 + 0.01 * (i % 2)) for i in range(20)] + [clock.tick(3.0)]
    >>> sum(ticks[:20]), ticks[20]
    (0, True)
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["TaskClock", "SurpriseClock"]


class TaskClock:
    """Due every ``period`` steps (never by itself when ``period`` is None: task boundaries only).

    Example:
        >>> c = TaskClock(period=3)
        >>> [c.tick() for _ in range(6)]
        [False, False, True, False, False, True]
    """

    def __init__(self, period: int | None = None) -> None:
        if period is not None and (isinstance(period, bool) or not isinstance(period, int) or period < 1):
            raise ValueError(f"period must be None (task boundaries only) or an int >= 1, got {period!r}")
        self.period = period
        self.steps = 0

    def tick(self, loss: float | None = None) -> bool:
        """Count one step; whether the slow level is due now (``loss`` is not used)."""
        self.steps += 1
        return self.period is not None and self.steps % self.period == 0

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


class SurpriseClock:
    """Due when the loss jumps (see the module docstring).

    Args:
        k: standard deviations above the running mean that count as a jump (default 4).
        rise: relative rise over the running mean also required (default 0.5, i.e. +50 %).
        beta: factor of the running statistics (default 0.95).
        warmup: steps before the first possible tick (default 20).
        min_gap: least number of steps between two ticks (default 20).
    """

    def __init__(self, k: float = 4.0, rise: float = 0.5, beta: float = 0.95, warmup: int = 20,
                 min_gap: int = 20) -> None:
        if not k > 0:
            raise ValueError(f"k must be > 0 (standard deviations of a jump), got {k!r}")
        if not rise >= 0:
            raise ValueError(f"rise must be >= 0 (relative rise of the loss), got {rise!r}")
        if not 0 < beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {beta!r}")
        for name, v in (("warmup", warmup), ("min_gap", min_gap)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.k, self.rise, self.beta, self.warmup, self.min_gap = float(k), float(rise), float(beta), warmup, min_gap
        self.steps, self.since, self.mean, self.var = 0, 0, None, 0.0

    def tick(self, loss: float | None = None) -> bool:
        """Count one step with its training loss; whether the loss shifted."""
        self.steps += 1
        self.since += 1
        if loss is None:
            raise ValueError("SurpriseClock needs the training loss: call recipe.step(loss=loss) "
                             "(or use TaskClock with end_task())")
        loss = float(loss)
        if not math.isfinite(loss):
            return False
        if self.mean is None:
            self.mean = loss
            return False
        sd = math.sqrt(self.var)
        jump = loss > self.mean + self.k * sd and loss > (1 + self.rise) * self.mean
        if jump and self.steps > self.warmup and self.since >= self.min_gap:
            self.restart(loss)
            return True
        d = loss - self.mean
        self.mean += (1 - self.beta) * d
        self.var = self.beta * (self.var + (1 - self.beta) * d * d)
        return False

    def restart(self, loss: float | None = None) -> None:
        """Forget the loss statistics (after a boundary announced from outside, or a detected one)."""
        self.since, self.var = 0, 0.0
        self.mean = None if loss is None else float(loss)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "since": self.since, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.since = int(state["steps"]), int(state["since"])
        self.mean, self.var = state["mean"], float(state["var"])
