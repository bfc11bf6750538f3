"""Hand-written reference for the slow-level rule, and a tiny LightningModule to check it against.

The reference does not use ``PeriodicGradients`` nor torch optimizers: it computes gradients with
``torch.autograd.grad`` and applies SGD-with-momentum and AdamW written out by hand, so a test that
compares it with ``Trainer.fit(callbacks=[MultiTimescale(...)])`` checks the whole chain.

Rule: a parameter of period C sums its gradients over C optimizer steps; at t % C == 0 its
gradient is the chunk's mean, otherwise it has none (no update, no state change). Clipping by norm
applies to the gradients the optimizer steps with. Hyperparameters: ``lr(t) = lr * decay**(t-1)``;
biases form a second param group (``lr * bias_lr_mult``, no weight decay).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
import pytest
pytest.importorskip("lightning")  # the optional extra "lightning"; skip this module without it

from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: the levels over the LightningModule's names, and the same periods over the bare net's names
LEVELS = {"net.0.*": 3, "net.2.weight": 2}
PERIODS = {"0.weight": 3, "0.bias": 3, "2.weight": 2}


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def make_data(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.stack([x[:, 0] * x[:, 1], torch.sin(x[:, 2])], dim=1)
    return TensorDataset(x, y)


def loader(batch_size: int = 6, dtype: torch.dtype = torch.float64) -> DataLoader:
    data = TensorDataset(*(t.to(dtype) for t in make_data().tensors))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


class TinyModule(LightningModule):
    """MSE regression with a choice of optimizer, param groups and a per-step LR schedule."""

    def __init__(self, opt: str = "adamw", lr: float = 0.05, weight_decay: float = 0.1,
                 bias_lr_mult: float = 1.0, decay: float = 1.0, opt_cls=None) -> None:
        super().__init__()
        self.net = make_net()
        self.opt, self.lr, self.wd, self.bias_lr_mult, self.decay = opt, lr, weight_decay, bias_lr_mult, decay
        self.opt_cls = opt_cls

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        weights = [p for n, p in self.net.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in self.net.named_parameters() if n.endswith("bias")]
        groups = [{"params": weights, "weight_decay": self.wd},
                  {"params": biases, "weight_decay": 0.0, "lr": self.lr * self.bias_lr_mult}]
        if self.opt_cls is not None:
            opt = self.opt_cls(groups, lr=self.lr)
        elif self.opt == "adamw":
            opt = torch.optim.AdamW(groups, lr=self.lr)
        else:
            opt = torch.optim.SGD(groups, lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: self.decay ** s)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def reference_fit(steps: int, *, opt: str = "adamw", lr: float = 0.05, weight_decay: float = 0.1,
                  bias_lr_mult: float = 1.0, decay: float = 1.0, periods: dict[str, int] | None = None,
                  accumulate: int = 1, clip: float | None = None, batch_size: int = 6) -> dict[str, torch.Tensor]:
    """Parameters (prefixed ``net.``) after ``steps`` optimizer steps of the hand-written rule."""
    net = copy.deepcopy(make_net())
    params = dict(net.named_parameters())
    periods = {n: (periods or {}).get(n, 1) for n in params}
    batches = list(loader(batch_size))
    acc: dict[str, torch.Tensor] = {}
    state: dict[str, dict] = {n: {} for n in params}
    b = 0
    for t in range(1, steps + 1):
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        for _ in range(accumulate):
            x, y = batches[b % len(batches)]
            b += 1
            loss = F.mse_loss(net(x), y) / accumulate
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
                grads[n] += g
        used: dict[str, torch.Tensor] = {}
        for n, g in grads.items():
            c = periods[n]
            if c == 1:
                used[n] = g
                continue
            acc[n] = g.clone() if n not in acc else acc[n] + g
            if t % c == 0:
                used[n] = acc.pop(n) / c
        if clip is not None:
            total = math.sqrt(sum(float(g.pow(2).sum()) for g in used.values()))
            coef = min(1.0, clip / (total + 1e-6))
            used = {n: g * coef for n, g in used.items()}
        with torch.no_grad():
            for n, g in used.items():
                is_bias = n.endswith("bias")
                step_lr = lr * (bias_lr_mult if is_bias else 1.0) * decay ** (t - 1)
                wd = 0.0 if is_bias else weight_decay
                _update(opt, params[n], g, state[n], step_lr, wd)
    return {f"net.{n}": p.detach().clone() for n, p in params.items()}


def _update(opt: str, p: torch.Tensor, g: torch.Tensor, s: dict, lr: float, wd: float) -> None:
    if opt == "sgd":  # torch.optim.SGD(momentum=0.9): coupled decay, buffer starts at g
        g = g + wd * p
        s["buf"] = g.clone() if "buf" not in s else 0.9 * s["buf"] + g
        p -= lr * s["buf"]
        return
    b1, b2, eps = 0.9, 0.999, 1e-8  # torch.optim.AdamW defaults
    p *= 1 - lr * wd
    s["k"] = s.get("k", 0) + 1
    s["m"] = b1 * s.get("m", torch.zeros_like(p)) + (1 - b1) * g
    s["v"] = b2 * s.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** s["k"], 1 - b2 ** s["k"]
    p -= (lr / bc1) * s["m"] / (s["v"].sqrt() / math.sqrt(bc2) + eps)
