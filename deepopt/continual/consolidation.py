r"""The slow level: a copy of the weights written from what the fast level learned, and the pull
that keeps the fast level near it.

Two levels over the same weights: the fast level :math:`\theta` (the model, stepped by the
optimizer at every step) and the slow level :math:`\bar\theta` with its importance :math:`\Omega`.
When the slow level's clock is due (a task boundary, a detected shift, or every ``C`` steps) it
**consolidates** what the fast level learned since the last time:

.. math::
    \bar\theta \leftarrow \bar\theta + \tau\,(\theta - \bar\theta), \qquad
    \Omega \leftarrow \gamma\,\Omega + \Omega_\text{task}

(``rate`` :math:`\tau`: 1 copies the fast weights, smaller values average the solutions of
successive tasks; ``decay`` :math:`\gamma`; :math:`\Omega_\text{task}` from
:class:`~deepopt.continual.importance.Importance`). Between writes the slow level reads back into
the fast one: after every optimizer step with learning rate :math:`\eta`,

.. math::
    \theta \leftarrow \theta - \min(1,\ \eta\,\lambda\,\Omega) \odot (\theta - \bar\theta)

(``strength`` :math:`\lambda`), a decoupled elastic pull: the proximal step of
:math:`\frac{\lambda}{2}\sum\Omega(\theta-\bar\theta)^2`, applied like decoupled weight decay so
Adam's normalisation does not rescale it, and never past :math:`\bar\theta` (:meth:`SlowLevel.pull`).
The coupled form adds the penalty's gradient to the task gradient before the optimizer step,

.. math:: g \leftarrow g + \lambda\,\Omega \odot (\theta - \bar\theta)

(:meth:`SlowLevel.pull_gradients`), so under Adam a weight settles where the task's push balances
the pull, :math:`|\theta - \bar\theta| \approx |g_\text{task}| / (\lambda\Omega)`: it moves further
where the new task needs it more (the decoupled pull bounds every weight of equal importance by the
same :math:`\approx 1/(\lambda\Omega)`, whatever the task's need). Before the first consolidation
:math:`\Omega = 0` and nothing is pulled.

The importance also sets a learning rate per weight (``damping`` :math:`\kappa`,
:meth:`SlowLevel.damp`): the optimizer's step :math:`\Delta` (taken with the pull's gradient in
it) is applied as

.. math:: \theta \leftarrow \theta_\text{before} + \Delta \,/\, (1 + \kappa\,\Omega),

so a weight important to earlier tasks moves :math:`1 + \kappa\Omega` times slower and an
unimportant one (:math:`\Omega \approx 0`) at the full rate: a slow level per weight whose rate the
importance sets. The pull sets where a weight settles (under Adam, where the task's and the pull's
gradients balance; Adam normalises their sum, so the step size does not shrink with the stiffness);
the damping slows the move itself, on the weights earlier tasks need.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    >>> slow = SlowLevel([w], strength=10.0, rate=1.0)
    >>> with torch.no_grad(): _ = w.add_(1.0)
    >>> slow.consolidate([torch.tensor([1.0, 0.0])])      # slow copy = [1, 1], importance [1, 0]
    >>> with torch.no_grad(): _ = w.add_(1.0)              # fast moves on to [2, 2]
    >>> slow.pull(lr=0.05); w.data
    tensor([1.5000, 2.0000])
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["SlowLevel"]


class SlowLevel:
    """The slow copy and its importance (see the module docstring).

    Args:
        params: the fast weights.
        strength: :math:`\\lambda`, stiffness of the pull per unit importance (>= 0).
        rate: :math:`\\tau` in (0, 1], how far a consolidation moves the slow copy.
        decay: :math:`\\gamma` in [0, 1], how much earlier importance is kept at a consolidation.
    """

    def __init__(self, params: Sequence[Tensor], strength: float = 1.0, rate: float = 1.0, decay: float = 1.0) -> None:
        if not strength >= 0:
            raise ValueError(f"strength must be >= 0 (0 = no pull), got {strength!r}")
        if not 0 < rate <= 1:
            raise ValueError(f"rate must be in (0, 1] (1 = copy the fast weights), got {rate!r}")
        if not 0 <= decay <= 1:
            raise ValueError(f"decay must be in [0, 1] (1 = keep all earlier importance), got {decay!r}")
        self.params = list(params)
        self.strength, self.rate, self.decay = float(strength), float(rate), float(decay)
        self.slow = [p.detach().clone() for p in self.params]
        self.importance = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.writes = 0

    @torch.no_grad()
    def consolidate(self, task_importance: Sequence[Tensor], source: Sequence[Tensor] | None = None) -> None:
        """Write the slow level from the fast one (see the module docstring); ``source``: fast
        weights to write from instead of the current ones (e.g. those before the last step)."""
        if len(task_importance) != len(self.params):
            raise ValueError(f"task_importance needs one tensor per parameter ({len(self.params)}), "
                             f"got {len(task_importance)}")
        source = [p.detach() for p in self.params] if not source else source
        for s, p, imp, new in zip(self.slow, source, self.importance, task_importance):
            s.lerp_(p, self.rate) if self.writes else s.copy_(p)
            imp.mul_(self.decay).add_(new.to(imp.device, imp.dtype))
        self.writes += 1

    @torch.no_grad()
    def pull(self, lr: float) -> None:
        """One decoupled elastic step of the fast weights toward the slow copy."""
        if not self.writes or self.strength == 0:
            return
        for p, s, imp in zip(self.params, self.slow, self.importance):
            k = (imp * (lr * self.strength)).clamp_(max=1.0).to(p.dtype)
            p.sub_(k * (p - s))

    @torch.no_grad()
    def pull_gradients(self) -> None:
        """Coupled pull: add lambda Omega (theta - slow) to each ``.grad`` (weights without one are skipped)."""
        if not self.writes or self.strength == 0:
            return
        for p, s, imp in zip(self.params, self.slow, self.importance):
            if p.grad is not None:
                p.grad.add_((imp * self.strength).to(p.dtype) * (p.detach() - s))

    @torch.no_grad()
    def damp(self, before: Sequence[Tensor], damping: float) -> None:
        """Scale the step just taken from ``before`` by ``1 / (1 + damping * Omega)`` per weight."""
        if not self.writes or damping == 0:
            return
        for p, b, imp in zip(self.params, before, self.importance):
            p.copy_(b + (p - b) / (1 + damping * imp).to(p.dtype))

    def distance(self) -> float:
        """Importance-weighted squared distance sum Omega (theta - slow)^2 (0 before the first write)."""
        return float(sum((imp * (p.detach().float() - s.float()) ** 2).sum()
                         for p, s, imp in zip(self.params, self.slow, self.importance)))

    def state_dict(self) -> dict[str, Any]:
        return {"slow": [s.cpu().clone() for s in self.slow], "importance": [i.cpu().clone() for i in self.importance],
                "writes": self.writes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["slow"]) != len(self.params):
            raise ValueError(f"checkpoint slow level has {len(state['slow'])} tensors, the model {len(self.params)}")
        for s, new in zip(self.slow + self.importance, state["slow"] + state["importance"]):
            if s.shape != new.shape:
                raise ValueError(f"checkpoint slow level shape {tuple(new.shape)} != {tuple(s.shape)}; same model?")
            s.copy_(new)
        self.writes = int(state["writes"])
