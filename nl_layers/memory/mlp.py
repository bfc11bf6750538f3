"""Memory models for the deep (fast-weight) memories: a residual MLP and a plain linear map.

A memory model is an ordinary ``nn.Module`` mapping (..., d) -> (..., d). Its parameters are the
*initial* fast weights (learnable by the outer optimizer); the layers hold one copy per batch row
and head in their state and call the module with :func:`torch.func.functional_call`.
``layer_inputs(params, x)`` gives, for every weight matrix, the input it multiplies, which the
delta-gradient-descent (DGD) rule needs for its decay along the input direction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}


class ResidualMLPMemory(nn.Module):
    """M(x) = x + W_out act(W_in x): the Titans memory (residual MLP, no biases).

    W_out starts small (std ``out_scale / sqrt(hidden)``) so that M starts near the identity.

    Example:
        >>> m = ResidualMLPMemory(dim=8, hidden=16)
        >>> m(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, dim: int, hidden: int, activation: str = "silu", out_scale: float = 0.1):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.w_in = nn.Parameter(torch.randn(hidden, dim) / math.sqrt(dim))
        self.w_out = nn.Parameter(torch.randn(dim, hidden) * (out_scale / math.sqrt(hidden)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _ACTIVATIONS[self.activation]
        return x + act(x @ self.w_in.transpose(-1, -2)) @ self.w_out.transpose(-1, -2)

    def layer_inputs(self, params: dict, x: torch.Tensor) -> dict:
        """Input of each weight matrix for key x (one token): {"w_in": x, "w_out": act(W_in x)}."""
        act = _ACTIVATIONS[self.activation]
        return {"w_in": x, "w_out": act(params["w_in"] @ x)}


class LinearMapMemory(nn.Module):
    """M(x) = W x with W initialised to zero: the linear memory of the delta rule, as a module.

    Example:
        >>> LinearMapMemory(4)(torch.ones(2, 4)).abs().sum().item()
        0.0
    """

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.transpose(-1, -2)

    def layer_inputs(self, params: dict, x: torch.Tensor) -> dict:
        return {"weight": x}


def make_memory(kind, dim: int, expansion: float = 2.0) -> nn.Module:
    """Build a memory model from "mlp", "linear" or an ``nn.Module`` mapping (..., dim) -> (..., dim)."""
    if isinstance(kind, nn.Module):
        return kind
    if kind == "mlp":
        return ResidualMLPMemory(dim, max(1, int(round(expansion * dim))))
    if kind == "linear":
        return LinearMapMemory(dim)
    raise ValueError(f"memory must be 'mlp', 'linear' or an nn.Module, got {kind!r}")
