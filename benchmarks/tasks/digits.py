"""Digits tasks (scikit-learn's 8x8 ``load_digits``, 1,797 images, offline): an MLP and a small CNN,
and the residual MLP of the ``continual_levels`` suite.

Data: :func:`benchmarks.data.digits_split` (1,437 training and 360 held-out images, pixels in [0, 1]).
``train_loss`` is the cross-entropy of a minibatch of 64 drawn by the seed's generator;
``eval_loss`` is the cross-entropy on the 360 held-out images.

Example:
    >>> from benchmarks.tasks.digits import TASKS
    >>> p = TASKS["digits_mlp"].build(0, "cpu")
    >>> 2.0 < p.eval_loss() < 2.6  # about ln(10) at initialization
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import digits_split
from .base import Task, seeded_generator

BATCH = 64


class DigitsMLP(nn.Module):
    """inputs (64 pixels) -> hidden -> hidden -> 10 with ReLU."""

    def __init__(self, hidden: int = 64, inputs: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DigitsCNN(nn.Module):
    """conv(1->8) -> ReLU -> conv(8->16) -> ReLU -> 2x2 max-pool -> linear(256 -> 10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x.view(-1, 1, 8, 8)))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.head(h.flatten(1))


class ResidualMLP(nn.Module):
    """relu(Linear(64 -> width)), ``depth`` blocks x + mlp(LayerNorm(x)), LayerNorm, Linear(width -> 10)."""

    def __init__(self, width: int, depth: int, hidden: int):
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm": nn.LayerNorm(width),
            "mlp": nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))})
            for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.embed(x))
        for block in self.blocks:
            h = h + block["mlp"](block["norm"](h))
        return self.head(self.norm(h))


class DigitsProblem:
    """Minibatch cross-entropy on a digits classifier (see module doc)."""

    def __init__(self, model: nn.Module, seed: int, device: torch.device):
        x_tr, y_tr, x_te, y_te = digits_split()
        self.model = model.to(device)
        self.x_tr, self.y_tr, self.x_te, self.y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))
        self.gen = seeded_generator(seed, salt=64)

    def train_loss(self, step: int) -> torch.Tensor:
        idx = torch.randint(len(self.y_tr), (BATCH,), generator=self.gen).to(self.x_tr.device)
        return F.cross_entropy(self.model(self.x_tr[idx]), self.y_tr[idx])

    @torch.no_grad()
    def eval_loss(self) -> float:
        return float(F.cross_entropy(self.model(self.x_te), self.y_te))

    @torch.no_grad()
    def eval_accuracy(self) -> float:
        return float((self.model(self.x_te).argmax(-1) == self.y_te).float().mean())


TASKS = {
    "digits_mlp": Task(
        "digits_mlp", "MLP 64-64-64-10 on 8x8 digits, batch 64; held-out cross-entropy",
        lambda seed, dev: DigitsProblem(DigitsMLP(), seed, dev), steps=300, eval_every=15,
        lr_centres={"sgd": 0.1, "adam": 1e-2, "muon": 1e-2}, tags=("real",)),
    "digits_cnn": Task(
        "digits_cnn", "CNN (two 3x3 convs, 8 and 16 channels) on 8x8 digits; held-out cross-entropy",
        lambda seed, dev: DigitsProblem(DigitsCNN(), seed, dev), steps=200, eval_every=10,
        lr_centres={"sgd": 0.03, "adam": 1e-2, "muon": 3e-2}, tags=("real",)),
}
