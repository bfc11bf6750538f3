"""MultiTimescale inside a real Trainer.fit: period semantics parameter by parameter, against the
hand-written reference, with param groups, LR schedules, accumulation, clipping, mixed precision,
a deepopt optimizer, and a kill-and-resume that must end bit-exactly where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch
pytest.importorskip("lightning")  # the optional extra "lightning"; skip this module without it

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from deepopt.lightning import MultiTimescale
from deepopt import AdamMemory, MomentumMemory

from .lightning_reference import LEVELS, PERIODS, TinyModule, loader, reference_fit


def _trainer(callbacks, max_steps, **kw) -> Trainer:
    kw.setdefault("enable_checkpointing", False)
    return Trainer(callbacks=callbacks, max_steps=max_steps, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", devices=1, **kw)


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _assert_same(got: dict, want: dict, atol: float = 1e-12) -> None:
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=atol, msg=f"parameter {n} differs")


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_fit_matches_hand_written_reference(opt):
    hp = dict(opt=opt, lr=0.05, weight_decay=0.1, bias_lr_mult=0.5, decay=0.95)
    module = TinyModule(**hp)
    _trainer([MultiTimescale(LEVELS)], max_steps=13).fit(module, loader())
    _assert_same(_params(module), reference_fit(13, periods=PERIODS, **hp))
    # the reference is sensitive: without the periods it ends elsewhere
    plain = reference_fit(13, **hp)
    assert not torch.allclose(plain["net.0.weight"], module.net[0].weight)


def test_accumulate_grad_batches_and_gradient_clipping():
    hp = dict(opt="adamw", lr=0.05, weight_decay=0.1, bias_lr_mult=2.0, decay=0.9)
    module = TinyModule(**hp)
    trainer = _trainer([MultiTimescale(LEVELS)], max_steps=7, accumulate_grad_batches=2,
                       gradient_clip_val=0.05, gradient_clip_algorithm="norm")
    trainer.fit(module, loader())
    _assert_same(_params(module), reference_fit(7, periods=PERIODS, accumulate=2, clip=0.05, **hp))


@pytest.mark.parametrize("opt_cls,ref", [(MomentumMemory, "sgd"), (AdamMemory, "adamw")])
def test_deepopt_optimizer_matches_reference(opt_cls, ref):
    hp = dict(lr=0.05, weight_decay=0.1, bias_lr_mult=0.5, decay=0.95)
    module = TinyModule(opt_cls=opt_cls, **hp)
    _trainer([MultiTimescale(LEVELS)], max_steps=9).fit(module, loader())
    _assert_same(_params(module), reference_fit(9, opt=ref, periods=PERIODS, **hp))


class _Recorder(Callback):
    """After every optimizer step: the slow parameter and its optimizer state."""

    def __init__(self):
        self.params, self.steps, self.exp_avg = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        p = pl_module.net[0].weight
        state = trainer.optimizers[0].state.get(p, {})
        self.params.append(p.detach().clone())
        self.steps.append(int(state["step"]) if "step" in state else 0)
        self.exp_avg.append(state["exp_avg"].clone() if "exp_avg" in state else None)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_held_steps_change_neither_parameter_nor_optimizer_state(precision):
    module = TinyModule(opt="adamw").float()
    rec = _Recorder()
    trainer = _trainer([MultiTimescale({"net.0.*": 3}), rec], max_steps=9, precision=precision)
    trainer.fit(module, loader(dtype=torch.float32))
    for t in range(1, 10):
        assert rec.steps[t - 1] == t // 3, "AdamW's step count must advance only at boundaries"
        if t > 1 and t % 3 != 0:
            assert torch.equal(rec.params[t - 1], rec.params[t - 2]), f"step {t} is held"
            if rec.exp_avg[t - 2] is not None:
                assert torch.equal(rec.exp_avg[t - 1], rec.exp_avg[t - 2]), "no phantom momentum update"
        elif t % 3 == 0:
            assert not torch.equal(rec.params[t - 1], rec.params[t - 2]), f"step {t} is a boundary"


class _FastParamMoved(Callback):
    def __init__(self):
        self.moved, self._before = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = pl_module.net[2].weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.moved.append(not torch.equal(self._before, pl_module.net[2].weight))


def test_steps_skipped_by_the_grad_scaler_are_not_counted():
    from lightning.pytorch.plugins import MixedPrecision

    module = TinyModule(opt="adamw").float()
    cb, moved = MultiTimescale({"net.0.*": 3}), _FastParamMoved()
    scaler = torch.amp.GradScaler("cpu")  # fp16 overflows at the initial scale 2**16: early steps are skipped
    trainer = _trainer([cb, moved], max_steps=10, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module, loader(dtype=torch.float32))
    taken = sum(moved.moved)
    assert 0 < taken < 10, "the test needs both skipped and taken steps"
    assert cb.steps == [taken]
    state = trainer.optimizers[0].state[module.net[0].weight]
    assert int(state["step"]) == taken // 3
    assert _all_finite(module)


class _InfAt(TinyModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == 2 else loss


def test_steps_a_deepopt_optimizer_skips_are_not_counted():
    module = _InfAt(opt_cls=lambda groups, lr: MomentumMemory(groups, lr=lr, momentum=0.9))
    cb = MultiTimescale({"net.0.*": 3})
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        _trainer([cb], max_steps=7).fit(module, loader())
    assert cb.steps == [6] and _all_finite(module)


def _all_finite(module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


class _Crash(Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise KeyboardInterrupt  # Lightning's graceful-shutdown path, like a killed job


def test_kill_mid_period_and_resume_is_bit_exact(tmp_path):
    hp = dict(opt="adamw", lr=0.05, weight_decay=0.1, decay=0.95)
    epochs = 3  # 8 batches an epoch: checkpoints at steps 8 and 16 are mid-period for C = 3
    full = TinyModule(**hp)
    _trainer([MultiTimescale(LEVELS)], max_steps=-1, max_epochs=epochs).fit(full, loader())

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    first = TinyModule(**hp)
    trainer = _trainer([MultiTimescale(LEVELS), ckpt, _Crash(at_step=11)], max_steps=-1, max_epochs=epochs,
                       enable_checkpointing=True)
    with pytest.raises(SystemExit):
        trainer.fit(first, loader())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 8
    state = saved["callbacks"]["MultiTimescale"]["optimizers"][0]
    assert state["step"] == 8 and set(state["accumulators"]) == {"net.0.weight", "net.0.bias"}  # C=2 is at its boundary

    resumed = TinyModule(**hp)
    cb = MultiTimescale(LEVELS)
    _trainer([cb], max_steps=-1, max_epochs=epochs).fit(resumed, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert cb.steps == [24]
    got, want = _params(resumed), _params(full)
    for n in want:
        assert torch.equal(got[n], want[n]), f"{n} differs after resume"


def test_resume_without_callback_state_would_differ(tmp_path):
    """The resume test can fail: dropping the open chunks from the checkpoint changes the result."""
    hp = dict(opt="adamw", lr=0.05, weight_decay=0.1)
    full = TinyModule(**hp)
    _trainer([MultiTimescale(LEVELS)], max_steps=-1, max_epochs=2).fit(full, loader())
    first = TinyModule(**hp)
    trainer = _trainer([MultiTimescale(LEVELS)], max_steps=-1, max_epochs=1)
    trainer.fit(first, loader())
    path = tmp_path / "one.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    ckpt["callbacks"]["MultiTimescale"]["optimizers"][0]["accumulators"] = {}
    torch.save(ckpt, path)
    resumed = TinyModule(**hp)
    _trainer([MultiTimescale(LEVELS)], max_steps=-1, max_epochs=2).fit(resumed, loader(), ckpt_path=path)
    assert not torch.equal(resumed.net[0].weight, full.net[0].weight)


def test_levels_relative_to_a_submodule():
    hp = dict(opt="sgd", lr=0.05, weight_decay=0.1)
    module = TinyModule(**hp)
    cb = MultiTimescale(PERIODS, module="net")  # names as nl_layers.nest(self.net) would return them
    _trainer([cb], max_steps=6).fit(module, loader())
    assert cb.periods["net.0.weight"] == 3 and cb.periods["net.2.bias"] == 1
    _assert_same(_params(module), reference_fit(6, periods=PERIODS, **hp))


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="reduce"):
        MultiTimescale(LEVELS, reduce="max")
    with pytest.raises(ValueError, match="period must be >= 1"):
        MultiTimescale({"net.*": 0})
    with pytest.raises(TypeError, match="levels must be a dict"):
        MultiTimescale(["net.*"])
    with pytest.raises(ValueError, match="matches no parameter"):
        _trainer([MultiTimescale({"encoder.*": 2})], max_steps=1).fit(TinyModule(), loader())
    with pytest.raises(ValueError, match="NestLevels"):
        _trainer([MultiTimescale()], max_steps=1).fit(TinyModule(), loader())
