"""ContinualRecipe in a real Trainer.fit: it consolidates at task boundaries, steps exactly as the
plain-loop Recipe does, and its state goes through a checkpoint."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lightning")

import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from deepopt.continual import Recipe
from deepopt.lightning import ContinualRecipe

KNOBS = dict(strength=1.0, distill=0.3)
CB = dict(module="net", **KNOBS)  # training_step calls self.net: distillation hooks that module


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    return x, (x[:, 0] > 0).long()


class Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.0)


def _fit(callback, epochs=4):
    module = Tiny()
    Trainer(callbacks=[callback], max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, accelerator="cpu", devices=1).fit(
        module, DataLoader(TensorDataset(*_data()), batch_size=16))
    return module


def test_callback_matches_the_plain_loop_recipe():
    cb = ContinualRecipe(epochs_per_task=2, **CB)
    module = _fit(cb)
    assert cb.consolidations == 2

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    recipe = Recipe(net, lr=1e-2, **KNOBS)
    x, y = _data()
    for epoch in range(4):
        for i in range(4):
            recipe.zero_grad()
            loss = F.cross_entropy(net(x[16 * i : 16 * i + 16]), y[16 * i : 16 * i + 16])
            loss.backward()
            recipe.step(loss)
        if epoch % 2 == 1:
            recipe.end_task()
    for p, q in zip(module.net.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_callback_state_round_trip_and_errors():
    cb = ContinualRecipe(epochs_per_task=1, **CB)
    _fit(cb, epochs=2)
    state = cb.state_dict()
    fresh = ContinualRecipe(epochs_per_task=1, **CB)
    fresh.load_state_dict(state)
    _fit(fresh, epochs=1)  # the saved slow level is loaded at fit start, then one more task
    assert fresh.consolidations == 3
    with pytest.raises(ValueError, match="epochs_per_task"):
        ContinualRecipe(epochs_per_task=0)
    with pytest.raises(RuntimeError, match="on_fit_start"):
        ContinualRecipe().end_task()
