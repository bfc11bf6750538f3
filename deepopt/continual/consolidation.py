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

**Shared pull** (``share`` :math:`c > 0`; off by default here, on in ``Recipe``'s defaults): the weights the new task also needs are pulled
less. With :math:`\Omega` the earlier tasks' importance (the slow level's) and
:math:`\Omega_\text{new}` the current task's so far (the same estimate, normalised to mean 1, that
the next consolidation will add: :meth:`~deepopt.continual.importance.Importance.current`), both
couplings of the pull use, per weight,

.. math::
    \Omega_\text{pull} = \Omega \cdot \frac{\Omega + \epsilon}{\Omega + c\,\Omega_\text{new} + \epsilon}
    \qquad (\epsilon = 10^{-12})

in place of :math:`\Omega`: a weight only earlier tasks need (:math:`\Omega_\text{new} = 0`) keeps
the full pull exactly; one with :math:`c\,\Omega_\text{new} = \Omega` half of it; one the new task
needs far more almost none. With ``share_damping`` the damping uses :math:`\Omega_\text{pull}` too.
``c = 0`` (the default) is the pull above. Since :math:`\Omega_\text{new}` has mean 1 and
:math:`\Omega` the number of tasks written (``decay=1``), ``c`` sets how much more the new task must
need a weight than the old ones did for its pull to halve.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    >>> slow = SlowLevel([w], strength=10.0, rate=1.0)
    >>> with torch.no_grad(): _ = w.add_(1.0)
    >>> slow.consolidate([torch.tensor([1.0, 0.0])])      # slow copy = [1, 1], importance [1, 0]
    >>> with torch.no_grad(): _ = w.add_(1.0)              # fast moves on to [2, 2]
    >>> slow.pull(lr=0.05); w.data
    tensor([1.5000, 2.0000])

The shared pull: equal old importance, the new task needs only the second weight.

    >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    >>> slow = SlowLevel([w], strength=1.0, share=1.0)
    >>> slow.consolidate([torch.tensor([1.0, 1.0])])      # slow copy [1, 1], Omega [1, 1]
    >>> with torch.no_grad(): _ = w.add_(1.0)              # fast at [2, 2]
    >>> w.grad = torch.zeros(2)
    >>> slow.pull_gradients(new=[torch.tensor([0.0, 1.0])]); w.grad   # Omega_new [0, 1]
    tensor([1.0000, 0.5000])
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
        share: :math:`c` >= 0, weight of the new task's importance in the shared pull (0 = off:
            the pull is :math:`\\lambda\\Omega`); the pull's methods take that importance as ``new``.
        share_damping: the damping uses the shared importance too (needs ``share > 0``).
    """

    def __init__(self, params: Sequence[Tensor], strength: float = 1.0, rate: float = 1.0, decay: float = 1.0,
                 share: float = 0.0, share_damping: bool = False) -> None:
        if not strength >= 0:
            raise ValueError(f"strength must be >= 0 (0 = no pull), got {strength!r}")
        if not 0 < rate <= 1:
            raise ValueError(f"rate must be in (0, 1] (1 = copy the fast weights), got {rate!r}")
        if not 0 <= decay <= 1:
            raise ValueError(f"decay must be in [0, 1] (1 = keep all earlier importance), got {decay!r}")
        if not share >= 0:
            raise ValueError(f"share must be >= 0 (0 = the pull ignores the new task's importance), got {share!r}")
        if share_damping and not share:
            raise ValueError("share_damping shares the damping by the new task's importance: it needs share > 0")
        self.params = list(params)
        self.strength, self.rate, self.decay = float(strength), float(rate), float(decay)
        self.share, self.share_damping = float(share), bool(share_damping)
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
    def shared(self, new: Sequence[Tensor] | None = None, eps: float = 1e-12) -> list[Tensor]:
        """The importance the pull uses: :math:`\\Omega (\\Omega + \\epsilon) / (\\Omega + c\\,\\Omega_\\text{new}
        + \\epsilon)` per weight, ``new`` the current task's importance (mean 1); ``self.importance``
        itself when ``share == 0`` or ``new`` is None."""
        if not self.share or new is None:
            return self.importance
        if len(new) != len(self.params):
            raise ValueError(f"new needs one tensor per parameter ({len(self.params)}), got {len(new)}")
        return [imp * ((imp + eps) / (imp + self.share * n.to(imp.device, imp.dtype) + eps))
                for imp, n in zip(self.importance, new)]

    @torch.no_grad()
    def pull(self, lr: float, new: Sequence[Tensor] | None = None) -> None:
        """One decoupled elastic step of the fast weights toward the slow copy (``new``: the shared pull's
        current-task importance)."""
        if not self.writes or self.strength == 0:
            return
        for p, s, imp in zip(self.params, self.slow, self.shared(new)):
            k = (imp * (lr * self.strength)).clamp_(max=1.0).to(p.dtype)
            p.sub_(k * (p - s))

    @torch.no_grad()
    def pull_gradients(self, new: Sequence[Tensor] | None = None) -> None:
        """Coupled pull: add lambda Omega (theta - slow) to each ``.grad`` (weights without one are skipped;
        ``new``: the shared pull's current-task importance)."""
        if not self.writes or self.strength == 0:
            return
        for p, s, imp in zip(self.params, self.slow, self.shared(new)):
            if p.grad is not None:
                p.grad.add_((imp * self.strength).to(p.dtype) * (p.detach() - s))

    @torch.no_grad()
    def damp(self, before: Sequence[Tensor], damping: float, new: Sequence[Tensor] | None = None) -> None:
        """Scale the step just taken from ``before`` by ``1 / (1 + damping * Omega)`` per weight (with
        ``share_damping``, the shared importance of ``new``)."""
        if not self.writes or damping == 0:
            return
        for p, b, imp in zip(self.params, before, self.shared(new) if self.share_damping else self.importance):
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
