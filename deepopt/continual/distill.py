r"""Distillation from the slow level: the fast level is asked to keep the slow level's outputs on
the inputs it sees now (no stored data), the functional side of consolidation.

With the slow weights :math:`\bar\theta`, the current training input :math:`x` (captured by a
forward pre-hook on the model when gradients are enabled) and temperature :math:`T`:

.. math::
    L_\text{distill} = \beta\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(f(x;\bar\theta)/T)\ \big\|\
    \mathrm{softmax}(f(x;\theta)/T)\big)

Its gradient is added to the fast weights' ``.grad`` (:meth:`SlowDistillation.add_gradients`,
called after the task loss's backward): it is zero when the fast outputs equal the slow ones and
otherwise moves them toward the slow ones (Learning without Forgetting, Li and Hoiem 2017, with
the slow level as the teacher instead of a frozen copy). The model's output (or the ``output``
callable applied to it) must be logits over the last dimension.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 4)
    >>> names = [n for n, _ in model.named_parameters()]
    >>> slow = [p.detach().clone() for p in model.parameters()]
    >>> d = SlowDistillation(model, names, weight=1.0)
    >>> model(torch.randn(5, 3)).sum().backward(); model.zero_grad()
    >>> float(d.add_gradients(slow))                      # fast == slow: nothing to distill
    0.0
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["SlowDistillation"]


class SlowDistillation:
    """See the module docstring.

    Args:
        model: the trained module; its first positional input is captured at each training forward.
        names: names of the parameters that the slow tensors of :meth:`add_gradients` stand for.
        weight: :math:`\\beta` (> 0).
        temperature: :math:`T` (> 0, default 2).
        output: maps the model's output to logits (default: the output itself, which must be a tensor).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], weight: float = 1.0, temperature: float = 2.0,
                 output: Callable[[Any], Tensor] | None = None) -> None:
        if not weight > 0:
            raise ValueError(f"distill weight must be > 0 (leave distillation off with distill=0), got {weight!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.model, self.names = model, list(names)
        self.weight, self.temperature, self.output = float(weight), float(temperature), output
        self.input: Tensor | None = None
        self._busy = False
        self._hook = model.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        if self._busy or not torch.is_grad_enabled() or not args or not isinstance(args[0], Tensor):
            return
        self.input = args[0].detach()

    def _logits(self, out: Any) -> Tensor:
        out = out if self.output is None else self.output(out)
        if not isinstance(out, Tensor) or out.ndim < 1:
            raise TypeError("distillation needs logits: the model returned "
                            f"{type(out).__name__}; pass output=lambda out: <logits tensor> (or distill=0)")
        return out

    def add_gradients(self, slow: Sequence[Tensor]) -> Tensor:
        """Backpropagate the distillation loss on the last captured input into ``.grad``; returns the loss."""
        if self.input is None:
            raise RuntimeError("no training input was captured: run the model's forward with gradients "
                               "enabled (model(x) in the training step) before the recipe's step; with the Lightning "
                               "callback, module= must name the submodule the training step calls")
        if len(slow) != len(self.names):
            raise ValueError(f"slow needs one tensor per parameter name ({len(self.names)}), got {len(slow)}")
        self._busy = True
        try:
            params = dict(zip(self.names, slow))
            with torch.no_grad():
                teacher = self._logits(functional_call(self.model, params, (self.input,), strict=False))
            student = self._logits(self.model(self.input))
        finally:
            self._busy = False
        t = self.temperature
        width = student.shape[-1]
        loss = self.weight * t * t * F.kl_div(F.log_softmax(student / t, -1).reshape(-1, width),
                                              F.log_softmax(teacher / t, -1).reshape(-1, width),
                                              reduction="batchmean", log_target=True)
        loss.backward()
        return loss.detach()

    def remove_hooks(self) -> None:
        """Detach the input-capturing hook from the model."""
        self._hook.remove()
