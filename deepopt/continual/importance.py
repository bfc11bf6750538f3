r"""How much each weight mattered to what the fast level just learned: the per-weight importance
that consolidation writes into the slow level.

Both estimators watch the training loop (``before_step`` with the task gradient ``g_t``,
``after_step`` once the optimizer moved the weights by :math:`\Delta_t`) and need no stored data:

* ``"fisher"``: the empirical Fisher diagonal of the task from minibatch gradients,
  :math:`\Omega = \frac1n\sum_t g_t^2` (``beta=0``), or with ``beta > 0`` its running average
  :math:`F \leftarrow \beta F + (1-\beta) g_t^2`, bias-corrected, which weights the end of the task
  (where, at a minimum, the minibatch gradient is noise whose square tracks the per-example
  Fisher, as EWC measures it) over its first steps (large transient gradients);
* ``"path"``: the path integral of Synaptic Intelligence (Zenke et al. 2017),
  :math:`\omega = \sum_t \max(0, -g_t \odot \Delta_t)` (the loss decrease each weight is responsible
  for) divided by the squared total move of the task plus ``xi``:
  :math:`\Omega = \omega / ((\theta_\text{end} - \theta_\text{start})^2 + \xi)`.

* ``"predictive"``: at the consolidation, the diagonal Fisher of the model's own predictive
  distribution on the last training minibatch :math:`x_1..x_n` (captured by a forward pre-hook; no
  data is stored beyond it), :math:`\Omega = \frac1n\sum_i (\nabla_\theta \log p_\theta(\hat y_i
  \mid x_i))^2` with :math:`\hat y_i \sim p_\theta(\cdot \mid x_i)` (the "true" Fisher, which
  needs no labels; with the write rate 1 the fast weights are the slow copy's), one backward per row.

``take()`` returns the task's importance normalised to mean 1 over all weights (so the strength
of the pull that uses it does not depend on the loss scale) and restarts the estimate.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    >>> imp = Importance([w], kind="fisher")
    >>> w.grad = torch.tensor([2.0, 0.0]); imp.before_step(); imp.after_step()
    >>> imp.take()[0]
    tensor([2., 0.])
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Importance", "KINDS"]

KINDS = ("fisher", "path", "predictive")


class Importance:
    """Per-weight importance of the current task (see the module docstring).

    Args:
        params: the weights (those with ``requires_grad``).
        kind: ``"fisher"``, ``"path"`` or ``"predictive"``.
        xi: damping of the path estimate (default 1e-3).
        beta: running-average factor of the Fisher estimate in [0, 1) (0: the plain mean).
        model, output: the model and its logits map (``"predictive"`` only; see ``Recipe``).
    """

    def __init__(self, params: Sequence[Tensor], kind: str = "fisher", xi: float = 1e-3, beta: float = 0.0,
                 model: nn.Module | None = None, output: Callable[[Any], Tensor] | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"importance kind must be one of {KINDS}, got {kind!r}")
        if not xi > 0:
            raise ValueError(f"xi must be > 0 (damping of the path importance), got {xi!r}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1) (0 = plain mean of g^2), got {beta!r}")
        if beta and kind != "fisher":
            raise ValueError(f"beta (importance_beta) averages the Fisher estimate; kind={kind!r} takes beta=0")
        if kind == "predictive" and model is None:
            raise ValueError("importance='predictive' needs the model (it differentiates the model's outputs)")
        self.params, self.kind, self.xi, self.beta = list(params), kind, float(xi), float(beta)
        self.model, self.output, self.input, self.takes, self._busy = model, output, None, 0, False
        self._hook = model.register_forward_pre_hook(self._capture) if kind == "predictive" else None
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.count = 0
        self.start = [p.detach().float().clone() for p in self.params]
        self._grads: list[Tensor | None] = []
        self._before: list[Tensor] = []

    def _capture(self, module: nn.Module, args: tuple) -> None:
        if not self._busy and torch.is_grad_enabled() and args and isinstance(args[0], Tensor):
            self.input = args[0].detach()

    @torch.no_grad()
    def before_step(self) -> None:
        """Record the task gradients (call after backward, before the optimizer step)."""
        if self.kind == "predictive":
            self._grads = [None]
            return
        self._grads = [None if p.grad is None else p.grad.detach().float().clone() for p in self.params]
        if self.kind == "path":
            self._before = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def after_step(self) -> None:
        """Add this step's contribution (call after the optimizer step)."""
        if not self._grads:
            return
        if self.kind == "predictive":
            self.count += 1
            self._grads = []
            return
        for i, (p, g) in enumerate(zip(self.params, self._grads)):
            if g is None:
                continue
            if self.kind == "fisher" and self.beta:
                self.sums[i].mul_(self.beta).addcmul_(g, g, value=1 - self.beta)
            elif self.kind == "fisher":
                self.sums[i].addcmul_(g, g)
            else:
                self.sums[i].add_((-g * (p.detach().float() - self._before[i])).clamp_(min=0))
        self.count += 1
        self._grads, self._before = [], []

    def predictive_fisher(self) -> list[Tensor]:
        r"""Diagonal Fisher of the model's predictive distribution on the last training input:
        :math:`\frac1n\sum_i (\nabla \log p_\theta(\hat y_i \mid x_i))^2`, :math:`\hat y_i` drawn from
        :math:`p_\theta(\cdot \mid x_i)` (seeded by the number of earlier ``take()`` calls)."""
        if self.input is None:
            raise RuntimeError("importance='predictive' found no training input: run the model's forward with "
                               "gradients enabled in the training step")
        gen = torch.Generator().manual_seed(8191 + self.takes)
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        x = self.input
        for i in range(len(x)):
            out = self.model(x[i : i + 1])
            logits = (out if self.output is None else self.output(out)).float()
            logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)
            y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).to(logp.device)
            grads = torch.autograd.grad(logp.gather(1, y).mean(), self.params, allow_unused=True)
            for s, g in zip(sums, grads):
                if g is not None:
                    s.addcmul_(g.float(), g.float(), value=1.0 / len(x))
        return sums

    @torch.no_grad()
    def current(self) -> list[Tensor]:
        """The current task's importance so far, normalised like ``take()`` (mean 1 over all weights;
        all zero before its first step), without restarting the estimate: :math:`\\Omega_\\text{new}`
        of the shared pull (:class:`~deepopt.continual.consolidation.SlowLevel`). ``"fisher"`` and
        ``"path"`` only (the predictive Fisher is computed at the consolidation)."""
        if self.kind == "predictive":
            raise ValueError("importance='predictive' has no estimate before the consolidation; the shared pull "
                             "needs importance='fisher' or 'path'")
        if not self.count:
            return [torch.zeros_like(s) for s in self.sums]
        return self._normalise(self._raw())

    def _raw(self) -> list[Tensor]:
        if self.kind == "fisher":
            norm = (1 - self.beta ** self.count) if self.beta else max(self.count, 1)
            return [s / norm if self.count else s for s in self.sums]
        return [s / ((p.detach().float() - s0) ** 2 + self.xi) for s, p, s0 in zip(self.sums, self.params, self.start)]

    @staticmethod
    def _normalise(raw: list[Tensor]) -> list[Tensor]:
        # one host read for all tensors (the same float32 sums, added in the same order on the host)
        total = sum(torch.stack([r.sum().to(raw[0].device) for r in raw]).tolist()) if raw else 0.0
        numel = sum(r.numel() for r in raw)
        scale = numel / total if total > 0 else 0.0
        return [r * scale for r in raw]

    @torch.no_grad()
    def take(self) -> list[Tensor]:
        """The task's importance, mean 1 over all weights (all zero if nothing was learned); restarts."""
        if self.kind == "predictive":
            self._busy = True
            try:
                with torch.enable_grad():
                    raw = self.predictive_fisher() if self.count else self.sums
            finally:
                self._busy = False
        else:
            raw = self._raw()
        out = self._normalise(raw)
        self.sums = [torch.zeros_like(s) for s in self.sums]
        self.count, self.takes = 0, self.takes + 1
        self.start = [p.detach().float().clone() for p in self.params]
        return out

    def remove_hooks(self) -> None:
        """Detach the input-capturing hook (``"predictive"`` only)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "sums": [s.cpu().clone() for s in self.sums], "count": self.count,
                "start": [s.cpu().clone() for s in self.start], "takes": self.takes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"checkpoint importance kind {state['kind']!r} differs from this run's {self.kind!r}")
        self.sums = [s.to(p.device) for s, p in zip(state["sums"], self.params)]
        self.start = [s.to(p.device) for s, p in zip(state["start"], self.params)]
        self.count = int(state["count"])
        self.takes = int(state.get("takes", 0))
