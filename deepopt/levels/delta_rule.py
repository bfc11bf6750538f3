"""Delta gradient descent (DGD, paper Eqs. 56-57): a linear layer's step that also forgets.

For a linear layer ``y = W x`` with output gradient ``dy``, the step that solves
``min_W 1/2 ||W x - u||^2 + 1/(2 eta) ||W - W_t||^2`` with ``u = -dy`` is

    W <- W - c (W x x^T + dy x^T),    c = eta / (1 + eta ||x||^2):

gradient descent plus a decay of ``W`` along the input direction. For a batch, ``dy x^T`` summed
is the weight gradient ``G`` and ``x x^T`` (and ``||x||^2``) are averaged over the batch rows:

    d = G + W (X^T X) / N,    W <- W - eta / (1 + eta mean||x||^2) d.

The level reads the inputs that forward pre-hooks captured (see :class:`deepopt.DGD`).

Example:
    >>> import torch
    >>> from deepopt.levels.delta_rule import dgd_direction
    >>> W, G, X = torch.randn(3, 4), torch.zeros(3, 4), torch.randn(5, 4)
    >>> d, c = dgd_direction(W, G, X, lr=0.1)   # with no gradient, DGD still forgets along X
    >>> bool(((W - 0.1 * c * d) @ X.T).norm() < (W @ X.T).norm())
    True
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from torch import Tensor

from .base import Direction, Level, State, host_float

__all__ = ["DeltaRule", "dgd_direction"]


def dgd_direction(w: Tensor, g: Tensor, x: Tensor, lr: float, sync: bool = False) -> tuple[Tensor, float]:
    """Pure DGD direction ``d = G + W X^T X / N`` and its step factor ``1 / (1 + lr mean||x||^2)``.

    ``sync=True`` averages the input statistics over the default process group (data-parallel
    ranks each hold a slice of the batch; ``W`` and ``G`` are already the same on all of them).
    """
    x = x.to(w.dtype)
    n = x.shape[0]
    decay = (w @ x.transpose(0, 1)) @ x / n
    sq = x.square().sum().reshape(1) / n
    if sync:
        from ..distributed import all_reduce_mean

        all_reduce_mean(decay)
        all_reduce_mean(sq)
    return g + decay, 1.0 / (1.0 + lr * host_float(sq))


def _source(p: Tensor) -> Tensor:
    """The optimizer's parameter behind ``p`` (``p`` itself, or the DTensor a full copy came from)."""
    return getattr(p, "source", p)


class DeltaRule(Level):
    """DGD on the weights of linear layers whose inputs were captured.

    A weight whose layer has not run forward since the optimizer was built (for example in the
    zero-gradient step that ``torch.distributed.checkpoint`` uses to create optimizer state) gets a
    plain gradient step, with a warning.

    Args:
        inputs: a mapping ``weight -> last input (N, in_features)`` (keyed by the weight tensor
            itself, so ``copy.deepcopy``/``pickle`` of an optimizer carry it over), filled by hooks.
        weights: the weights this level owns.
        sync: average the input statistics over data-parallel ranks (see :func:`dgd_direction`).
    """

    name = "dgd"

    def __init__(self, inputs: Mapping[Tensor, Tensor], weights: set[Tensor], sync: bool = False) -> None:
        super().__init__()
        self.inputs = inputs
        self.weights = weights
        self.sync = sync

    def applies_to(self, p: Tensor, group: Mapping[str, Any]) -> bool:
        return _source(p) in self.weights

    def read(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> Direction:
        inp = self.inputs.get(_source(p))
        if inp is None:
            warnings.warn("DGD: no input was captured for a linear layer's weight (run the model's forward with "
                          "grad enabled before optimizer.step()); this step is plain gradient descent",
                          RuntimeWarning, stacklevel=2)
            return Direction(x)
        d, c = dgd_direction(p, x, inp, float(group["lr"]), self.sync)
        return Direction(d, mul=c)
