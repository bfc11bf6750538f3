"""Shared helpers for the deepopt tests."""

from __future__ import annotations

import torch
from torch import nn

import deepopt

#: A learning rate per optimizer at which a small MLP trains stably (used across tests).
LR = {
    "MomentumMemory": 0.05,
    "AdamMemory": 3e-3,
    "MuonMemory": 0.02,
    "PreconditionedMomentum": 1e-3,
    "DeltaMomentum": 0.05,
    "DeepMomentum": 0.05,
    "M3": 3e-3,
    "DGD": 0.1,
}


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A model with matrices, vectors, an odd-shaped layer and a conv (any optimizer must cope)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def make(name: str, model: nn.Module, params=None, **kw) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model`` (DGD gets the model for its hooks)."""
    cls = deepopt.OPTIMIZERS[name]
    kw.setdefault("lr", LR[name])
    params = model.parameters() if params is None else params
    if getattr(cls, "requires_model", False):
        return cls(params, model=model, **kw)
    return cls(params, **kw)


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(16, 5, generator=g).to(dtype)
    y = torch.randn(16, 3, generator=g).to(dtype)
    return (model(x) - y).square().mean()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> list[float]:
    losses = []
    for s in range(start, start + steps):
        opt.zero_grad()
        loss = loss_of(model, s)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def feed(params_a, params_b, grads) -> None:
    for p, g in zip(params_a, grads):
        p.grad = g.clone()
    for p, g in zip(params_b, grads):
        p.grad = g.clone()
