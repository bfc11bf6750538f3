"""Each optimizer trains a small MLP on scikit-learn's digits to a stated test accuracy.

Measured on the 2-core CPU (200 steps, batch 128, seed 0): see ``STATED`` (threshold) next to
the accuracy reached when the test was written (comment).
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import deepopt

from .helpers import make

# name: (lr, stated accuracy).  Reached when written: Momentum 0.957, Adam 0.965, Muon 0.975,
# Preconditioned 0.970, Delta 0.957, Deep 0.970, M3 0.935, DGD 0.864.
STATED = {
    "MomentumMemory": (0.1, 0.93),
    "AdamMemory": (0.01, 0.94),
    "MuonMemory": (0.03, 0.94),
    "PreconditionedMomentum": (0.003, 0.94),
    "DeltaMomentum": (0.1, 0.93),
    "DeepMomentum": (0.1, 0.94),
    "M3": (0.1, 0.90),
    "DGD": (0.3, 0.82),
}


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


@pytest.mark.parametrize("name", sorted(deepopt.OPTIMIZERS))
def test_trains_digits_to_stated_accuracy(name, digits):
    xtr, ytr, xte, yte = digits
    lr, stated = STATED[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = make(name, model, lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        idx = torch.randint(0, len(xtr), (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    assert acc >= stated, f"{name}: test accuracy {acc:.3f} < stated {stated}"


def test_every_optimizer_has_a_stated_accuracy():
    assert set(STATED) == set(deepopt.OPTIMIZERS)
