"""The Lightning examples' ``DeepMomentum.pretrained`` option: the shipped memory at its own
learning rate (a memory written to tmp_path stands in for the shipped ``default``)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lightning")  # the optional extra "lightning"; skip this module without it

import deepopt
from deepopt import pretrained

CONFIGS = Path(__file__).resolve().parents[2] / "lightning_examples" / "configs"
LR = 0.0375


@pytest.fixture
def default_memory(tmp_path, monkeypatch):
    """A ``default`` memory in a stand-in package folder."""
    init = {k: deepopt.levels.deep.default_memory_init(4)[k] + 0.01 for k in ("w1", "b1", "w2")}
    pretrained.save(tmp_path / "default.json", {"lr": LR, "momentum": 0.8, "inner_lr": 0.05, "memory_init": init},
                    name="default", card=dict.fromkeys(pretrained.CARD_KEYS, "test"))
    monkeypatch.setattr(pretrained, "_shipped", lambda: tmp_path)
    return pretrained.load("default")


def test_char_lm_builds_the_pretrained_memory_at_its_own_lr(default_memory):
    from lightning_examples.char_lm import CharLM

    model = CharLM(dim=16, depth=1, heads=2, optimizer="DeepMomentum.pretrained", lr=1.0, weight_decay=0.02,
                   warmup_steps=1)
    conf = model.configure_optimizers()
    opt = conf["optimizer"]
    assert type(opt) is deepopt.DeepMomentum
    group = opt.param_groups[0]
    assert group["initial_lr"] == LR and group["weight_decay"] == 0.02  # not model.lr
    assert group["momentum"] == 0.8 and group["inner_lr"] == 0.05
    assert group["memory_init"]["w2"].eq(0.01).all()
    named = CharLM(dim=16, depth=1, heads=2, optimizer="DeepMomentum.pretrained(default)", warmup_steps=1)
    assert named.configure_optimizers()["optimizer"].param_groups[0]["initial_lr"] == LR
    with pytest.raises(ValueError, match=r"unknown pretrained memory 'nope'.*\['default'\]"):
        CharLM(optimizer="DeepMomentum.pretrained(nope)")
    with pytest.raises(ValueError, match="only DeepMomentum has pretrained memories"):
        CharLM(optimizer="M3.pretrained")
    with pytest.raises(ValueError, match="'DeepMomentum.pretrained'"):
        CharLM(optimizer="Nope")


def test_char_lm_trains_with_the_pretrained_memory(default_memory, tmp_path, monkeypatch):
    from lightning_examples.char_lm import main

    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(CONFIGS / "char_lm_tiny.yaml"), "--model.arch", "transformer",
                "--model.optimizer", "DeepMomentum.pretrained"])
    assert cli.trainer.global_step == 4
    (opt,) = cli.trainer.optimizers
    assert type(opt).__name__ == "DeepMomentum" and opt.param_groups[0]["initial_lr"] == LR


def test_continual_deepopt_method_takes_the_pretrained_memory(default_memory):
    from lightning_examples.continual import ContinualClassifier

    model = ContinualClassifier(method="deepopt", hidden=8, lr=1.0, weight_decay=0.01,
                                deepopt_optimizer="DeepMomentum.pretrained")
    opt = model.configure_optimizers()
    assert type(opt) is deepopt.DeepMomentum
    assert sorted(g["period"] for g in opt.param_groups) == [1, 4, 16]  # the slow levels kept
    assert all(g["lr"] == LR and g["weight_decay"] == 0.01 for g in opt.param_groups)
    with pytest.raises(ValueError, match="only DeepMomentum has pretrained memories"):
        ContinualClassifier(deepopt_optimizer="M3.pretrained")
    named = ContinualClassifier(method="deepopt", hidden=8, deepopt_optimizer="DeepMomentum.pretrained(default)")
    assert all(g["lr"] == LR for g in named.configure_optimizers().param_groups)
