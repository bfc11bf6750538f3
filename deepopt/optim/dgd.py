"""DGD: delta gradient descent for nn.Linear, plain gradient descent elsewhere."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..chain import Chain
from ..levels.base import Level
from ..levels.delta_rule import DeltaRule
from .base import LevelOptimizer

__all__ = ["DGD"]


class _Plain(Level):
    """Identity level: the step is the gradient itself."""

    name = "sgd"
    elementwise = True  # acts on each entry alone: runs on local DTensor shards


class _Capture:
    """Forward pre-hook: keep a linear layer's last input (flattened to ``(N, in_features)``) under
    its weight. An object, not a closure, so a model and its DGD deep-copied together stay wired."""

    def __init__(self, inputs: dict[torch.Tensor, torch.Tensor], weight: torch.Tensor) -> None:
        self.inputs, self.weight = inputs, weight

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and args:
            self.inputs[self.weight] = args[0].detach().reshape(-1, args[0].shape[-1])


class DGD(LevelOptimizer):
    r"""Delta gradient descent (Eqs. 56-57) for the ``nn.Linear`` layers of a model.

    .. math::
        W \leftarrow W - \frac{\eta}{1 + \eta\,\overline{\|x\|^2}}\Big(G + W\,\frac{X^\top X}{N}\Big)
        \quad\text{(linear weights)},\qquad \theta \leftarrow \theta - \eta\,g \quad\text{(the rest)}

    Nested Learning reading: a linear layer is a memory of its inputs' surprise signals; plain GD
    is one step on a dot-product objective, DGD one step on the L2 objective
    :math:`\frac12\|Wx - u\|^2`, so the layer also forgets what it stored along the current input
    direction (the delta rule). DGD needs the layer inputs, so it takes the model: forward
    pre-hooks capture each linear layer's last input (only when grad is enabled, so evaluation
    under ``torch.no_grad()`` does not overwrite it). Call ``opt.remove_hooks()`` when done.
    Under data parallelism (DDP, FSDP2) each rank sees a slice of the batch: the input statistics
    are averaged over the ranks (``sync_inputs``, on by default inside a process group), so the
    step equals the single-process step on the full batch.

    Args:
        params: the model (``nn.Module``), or parameters/param groups together with ``model=``.
        lr: learning rate; weight_decay: decoupled.
        model: the module whose ``nn.Linear`` layers get the DGD step.
        sync_inputs: average input statistics over the default process group (default: when one
            with more than one rank is initialized at construction).
        maximize: ascend (step along ``+g``), as torch optimizers.
        impl, nonfinite: see :class:`~deepopt.optim.base.LevelOptimizer`.

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = deepopt.DGD(model, lr=0.05)
        >>> model(torch.randn(16, 4)).square().mean().backward()
        >>> opt.step()
    """

    requires_model = True

    def __init__(self, params: Iterable[Any] | nn.Module, lr: float = 1e-3, weight_decay: float = 0.0, *,
                 model: nn.Module | None = None, sync_inputs: bool | None = None, impl: str = "auto",
                 nonfinite: str = "skip", maximize: bool = False) -> None:
        if isinstance(params, nn.Module):
            model, params = params, params.parameters()
        if model is None:
            raise ValueError("DGD needs the layer inputs: pass the model itself, DGD(model, lr=...), "
                             "or DGD(params, lr=..., model=model)")
        self._inputs: dict[torch.Tensor, torch.Tensor] = {}
        weights: set[torch.Tensor] = set()
        self._hooks = []
        for module in model.modules():
            if isinstance(module, nn.Linear):
                weights.add(module.weight)
                self._hooks.append(module.register_forward_pre_hook(_Capture(self._inputs, module.weight)))
        if sync_inputs is None:
            import torch.distributed as dist

            sync_inputs = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        chains = [Chain(DeltaRule(self._inputs, weights, sync=sync_inputs)), Chain(_Plain())]
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), chains, impl=impl, nonfinite=nonfinite,
                         maximize=maximize)

    def remove_hooks(self) -> None:
        """Detach the input-capturing hooks from the model."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __getstate__(self) -> dict[str, Any]:
        """A copy keeps the captured inputs but not the hooks: they belong to the original model
        (deep-copy the model together with the optimizer to get a copy that keeps capturing)."""
        state = super().__getstate__()
        state.pop("_hooks", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_hooks", [])
