"""LevelMonitor and NestLevels in a real Trainer.fit: what reaches CSV and TensorBoard loggers, where
the levels come from, and nesting a module in setup before the optimizer exists."""

from __future__ import annotations

import csv

import pytest
import torch
pytest.importorskip("lightning")  # the optional extra "lightning"; skip this module without it

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from deepopt.lightning import LevelMonitor, MultiTimescale, NestLevels
from deepopt import MomentumMemory

from .lightning_reference import TinyModule, loader


def _trainer(callbacks, max_steps, logger=False, **kw) -> Trainer:
    return Trainer(callbacks=callbacks, max_steps=max_steps, logger=logger, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", **kw)


class _SGDWithStats(torch.optim.SGD):
    """A stand-in optimizer that exposes ``memory_stats`` like deepopt optimizers do."""

    def memory_stats(self):
        bufs = [s["momentum_buffer"] for s in self.state.values() if "momentum_buffer" in s]
        return {"momentum/momentum_buffer_norm": float(sum(b.pow(2).sum() for b in bufs) ** 0.5)}


def test_csv_logger_gets_per_level_update_norms_fractions_and_memory(tmp_path):
    monitor = LevelMonitor(logging_interval=4)
    module = TinyModule(opt_cls=lambda groups, lr: _SGDWithStats(groups, lr=lr, momentum=0.9))
    logger = CSVLogger(tmp_path, name="run")
    _trainer([MultiTimescale({"net.0.*": 4}), monitor], max_steps=8, logger=logger).fit(module, loader())
    assert monitor.periods == {"net.0.weight": 4, "net.0.bias": 4, "net.2.weight": 1, "net.2.bias": 1}
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("levels/period_4/update_fraction")]
    assert [int(r["step"]) for r in rows] == [4, 8]
    last = rows[-1]
    assert float(last["levels/period_4/update_fraction"]) == pytest.approx(0.25)
    assert float(last["levels/period_1/update_fraction"]) == pytest.approx(1.0)
    assert float(last["levels/period_4/update_norm"]) > 0
    assert float(last["levels/period_4/state/momentum_buffer_norm"]) > 0
    assert float(last["levels/memory/momentum/momentum_buffer_norm"]) > 0
    # the update norm is the norm of the level's last update, measured from the parameters
    assert monitor.history[-1]["levels/period_1/param_norm"] == pytest.approx(
        float(torch.cat([module.net[2].weight.flatten(), module.net[2].bias]).norm()), rel=1e-9)


def test_levels_from_deepopt_param_groups_and_tensorboard(tmp_path):
    def opt_cls(groups, lr):
        groups[1]["period"] = 3  # the biases are a slow level of the deepopt optimizer itself
        return MomentumMemory(groups, lr=lr, momentum=0.9)

    monitor = LevelMonitor(logging_interval=3)
    logger = TensorBoardLogger(tmp_path, name="tb")
    _trainer([monitor], max_steps=9, logger=logger).fit(TinyModule(opt_cls=opt_cls), loader())
    assert monitor.history[-1]["levels/period_3/update_fraction"] == pytest.approx(1 / 3)
    assert monitor.history[-1]["levels/period_1/update_fraction"] == pytest.approx(1.0)
    assert any(k.startswith("levels/memory/") for k in monitor.history[-1])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "levels/period_3/update_norm" in tags and "levels/period_1/update_fraction" in tags


def test_bad_logging_interval():
    with pytest.raises(ValueError, match="logging_interval"):
        LevelMonitor(logging_interval=0)


def _split_last_linear(net: nn.Module, periods=(1, 2)) -> dict[str, int]:
    """A stand-in for nl_layers.nest: replace the last Linear by a residual two-level block."""

    class TwoLevel(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.fast = linear
            self.slow = nn.Linear(linear.out_features, linear.out_features, dtype=linear.weight.dtype)
            nn.init.zeros_(self.slow.weight)
            nn.init.zeros_(self.slow.bias)

        def forward(self, x):
            h = self.fast(x)
            return h + self.slow(h)

    net[2] = TwoLevel(net[2])
    return {"2.fast.*": periods[0], "2.slow.*": periods[1]}


def test_nest_levels_runs_in_setup_before_the_optimizer_and_feeds_multitimescale():
    module = TinyModule()
    nest = NestLevels(module="net", nest_kwargs={"periods": (1, 3)}, nest_fn=_split_last_linear)
    mt, monitor = MultiTimescale(), LevelMonitor(logging_interval=6)
    trainer = _trainer([nest, mt, monitor], max_steps=6)
    trainer.fit(module, loader())
    assert nest.nested_levels == {"net.2.fast.*": 1, "net.2.slow.*": 3}
    assert mt.periods["net.2.slow.weight"] == 3 and mt.periods["net.0.weight"] == 1
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(module.net[2].slow.weight) in opt_params, "the optimizer must see the nested parameters"
    assert monitor.history[-1]["levels/period_3/update_fraction"] == pytest.approx(2 / 6)
    # fitting again does not nest twice
    _trainer([nest, MultiTimescale()], max_steps=7).fit(module, loader())
    assert not hasattr(module.net[2].fast, "fast")


def test_nest_levels_bad_module_path():
    nest = NestLevels(module="encoder", nest_fn=_split_last_linear)
    with pytest.raises(ValueError, match="no such submodule"):
        _trainer([nest], max_steps=1).fit(TinyModule(), loader())


def test_nested_run_resumes_from_checkpoint_exactly(tmp_path):
    """NestLevels nests in setup, before Lightning restores the checkpoint's (nested) weights."""

    def callbacks():
        return [NestLevels(module="net", nest_kwargs={"periods": (1, 3)}, nest_fn=_split_last_linear),
                MultiTimescale()]

    full = TinyModule()
    _trainer(callbacks(), max_steps=-1, max_epochs=2).fit(full, loader())
    first = TinyModule()
    trainer = _trainer(callbacks(), max_steps=-1, max_epochs=1)
    trainer.fit(first, loader())  # 8 steps: the period-3 level holds an open chunk of 2
    trainer.save_checkpoint(tmp_path / "nested.ckpt")
    resumed = TinyModule()
    _trainer(callbacks(), max_steps=-1, max_epochs=2).fit(resumed, loader(), ckpt_path=tmp_path / "nested.ckpt")
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
