"""deepopt.pretrained: memory files (save/load bit for bit, every refusal), DeepMomentum.pretrained
and its functional twin, checkpoints. The shipped files may change: everything here uses
memories written to tmp_path (``available()`` is checked on whatever ships)."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import pytest
import torch

import deepopt
from deepopt import functional as F
from deepopt import pretrained as P
from deepopt.meta import MetaLearner

from .helpers import loss_of, params_equal, tiny_model, train

CARD = {k: f"the {k}" for k in P.CARD_KEYS}


def _learned(hidden: int = 4, seed: int = 0) -> dict:
    """Hyperparameters as ``MetaLearner.learned()`` gives them (float32 values, tensors for the MLP)."""
    g = torch.Generator().manual_seed(seed)
    return {"lr": float(torch.tensor(0.037)), "momentum": float(torch.tensor(0.87)),
            "inner_lr": float(torch.tensor(0.21)), "sigma": "identity", "weight_decay": 0.0,
            "memory_init": {k: torch.randn(hidden, generator=g) for k in ("w1", "b1", "w2")}}


@pytest.fixture
def path(tmp_path):
    return P.save(tmp_path / "mem.json", _learned(), name="mem", card=CARD)


def _doc(path):
    return json.loads(path.read_text())


def _write(tmp_path, doc, name="bad.json"):
    out = tmp_path / name
    out.write_text(json.dumps(doc))  # allow_nan: NaN/Infinity written as JSON's extensions
    return out


# ---------------------------------------------------------------------------- files
def test_save_load_round_trip_is_bit_exact(tmp_path):
    awkward = torch.tensor([1 / 3, -0.0, 1e-45, 3.4028235e38, -2.5e-39, 0.1, 7.0, -1.2345678e-8])
    hp = {"lr": torch.tensor(0.1, dtype=torch.float32), "momentum": torch.tensor(0.9), "inner_lr": 1 / 3,
          "sigma": "sign", "weight_decay": 1e-4,
          "memory_init": {"w1": awkward, "b1": awkward.flip(0), "w2": awkward * 0.5}}
    out = P.save(tmp_path / "m.json", hp, name="m-1_x", card={**CARD, "extra": "kept"})
    assert out == tmp_path / "m.json"
    mem = P.load(out)
    assert (mem.name, mem.optimizer) == ("m-1_x", "DeepMomentum")
    assert mem.card == {**CARD, "extra": "kept"}
    h = mem.hyperparameters
    assert h["lr"] == float(torch.tensor(0.1)) and h["momentum"] == float(torch.tensor(0.9))
    assert h["inner_lr"] == 1 / 3 and h["weight_decay"] == 1e-4
    assert h["sigma"] == "sign" and h["hidden"] == 8 and type(h["hidden"]) is int
    for k, v in hp["memory_init"].items():
        got = h["memory_init"][k]
        assert got.dtype == torch.float32 and got.shape == (8,)
        assert torch.equal(got.view(torch.int32), v.view(torch.int32))  # bit for bit (-0.0, subnormals)
    again = P.save(tmp_path / "again.json", h, name="m-1_x", card=mem.card)
    assert again.read_text() == out.read_text()  # a loaded memory saves to the same bytes
    text = out.read_text()
    assert text.count("\n") > 20 and '"w1": [' in text  # indented, each MLP list on one line


def test_save_fills_hidden_weight_decay_and_the_class_defaults(tmp_path):
    init = _learned(hidden=5)["memory_init"]
    mem = P.load(P.save(tmp_path / "m.json", {"memory_init": init}, name="m", card=CARD))
    assert mem.hyperparameters["hidden"] == 5 and mem.hyperparameters["weight_decay"] == 0.0
    default = deepopt.DeepMomentum([torch.nn.Parameter(torch.zeros(1))]).defaults
    for k in ("lr", "momentum", "inner_lr", "sigma"):
        assert mem.hyperparameters[k] == default[k]


def test_meta_learner_values_save_and_build_the_same_optimizer(tmp_path):
    learner = MetaLearner("DeepMomentum", lr=0.05, momentum=0.9, inner_lr=0.1, hidden=6)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    learned = learner.learned()
    path = P.save(tmp_path / "learned.json", learned, name="learned", card=CARD)
    kw = P.load(path).kwargs()
    for k in ("lr", "momentum", "inner_lr"):
        assert kw[k] == learned[k]
    for k in ("w1", "b1", "w2"):
        assert torch.equal(kw["memory_init"][k], learned["memory_init"][k])
    a, b = tiny_model(), tiny_model()
    train(a, learner.optimizer(a.parameters()), 5)
    train(b, deepopt.DeepMomentum.pretrained(b.parameters(), name=path), 5)
    assert params_equal(a, b)


def _mutate(doc, where, value):
    target = doc
    for k in where[:-1]:
        target = target[k]
    if value is KeyError:
        del target[where[-1]]
    else:
        target[where[-1]] = value
    return doc


@pytest.mark.parametrize("where,value,match", [
    (("format",), 2, r"format 2 is not readable here: this deepopt reads format 1"),
    (("optimizer",), "M3", r"optimizer 'M3': pretrained memories are DeepMomentum memories"),
    (("card",), KeyError, r"the file is missing the keys \['card'\]"),
    (("format",), KeyError, r"missing the keys \['format'\]"),
    (("hyperparameters", "lr"), KeyError, r"'hyperparameters' is missing the keys \['lr'\]"),
    (("memory_init", "w2"), KeyError, r"'memory_init' is missing the keys \['w2'\]"),
    (("card", "horizon"), KeyError, r"'card' is missing the keys \['horizon'\]"),
    (("hyperparameters", "beta"), 0.5, r"unknown keys \['beta'\]"),
    (("surprise",), 1, r"the file has unknown keys \['surprise'\]"),
    (("memory_init", "b1"), [0.0, 1.0, 2.0], r"memory_init.b1 must be a list of hidden=4 numbers, got 3"),
    (("hyperparameters", "hidden"), 5, r"memory_init.w1 must be a list of hidden=5 numbers, got 4"),
    (("memory_init", "w1"), [0.0, float("nan"), 0.0, 0.0], r"memory_init.w1\[1\] is not finite"),
    (("hyperparameters", "lr"), float("inf"), r"hyperparameters.lr is not finite"),
    (("hyperparameters", "momentum"), "0.9", r"hyperparameters.momentum must be a number"),
    (("hyperparameters", "hidden"), 4.0, r"hidden must be an int >= 1"),
    (("hyperparameters", "hidden"), True, r"hidden must be an int >= 1"),
    (("hyperparameters", "sigma"), "tanh", r"sigma 'tanh' must be one of"),
    (("hyperparameters", "momentum"), -0.5, r"DeepMomentum refuses these hyperparameters: .*momentum"),
    (("hyperparameters", "lr"), -1.0, r"DeepMomentum refuses these hyperparameters: .*lr"),
    (("card", "summary"), 3, r"\['summary'\] are not strings"),
    (("name",), "../evil", r"name '../evil' must be letters, digits"),
])
def test_load_refuses_bad_files_naming_the_problem(path, tmp_path, where, value, match):
    bad = _write(tmp_path, _mutate(_doc(path), where, value))
    with pytest.raises(ValueError, match=match) as info:
        P.load(bad)
    assert str(bad) in str(info.value)  # names the file


def test_load_refuses_other_files(tmp_path):
    (tmp_path / "huge.json").write_text('{"format": 1e999}')
    with pytest.raises(ValueError, match="format inf"):
        P.load(tmp_path / "huge.json")
    (tmp_path / "broken.json").write_text('{"format": 1,')
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        P.load(str(tmp_path / "broken.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON object, got list"):
        P.load(tmp_path / "list.json")
    with pytest.raises(FileNotFoundError, match="no memory file"):
        P.load(tmp_path / "absent.json")
    with pytest.raises(ValueError, match=r"unknown pretrained memory 'no_such_memory'; the shipped ones are \["):
        P.load("no_such_memory")
    with pytest.raises(TypeError, match="name or a path"):
        P.load(3)


def test_save_refuses_what_load_would(tmp_path):
    hp = _learned()
    with pytest.raises(ValueError, match="ends in .json"):
        P.save(tmp_path / "m.txt", hp, name="m", card=CARD)
    with pytest.raises(ValueError, match="no memory_init"):
        P.save(tmp_path / "m.json", {k: v for k, v in hp.items() if k != "memory_init"}, name="m", card=CARD)
    with pytest.raises(ValueError, match=r"drop \['impl'\]"):
        P.save(tmp_path / "m.json", {**hp, "impl": "foreach"}, name="m", card=CARD)
    nan = {**hp, "memory_init": {**hp["memory_init"], "b1": torch.tensor([0.0, math.nan, 0.0, 0.0])}}
    with pytest.raises(ValueError, match=r"memory_init.b1\[1\] is not finite"):
        P.save(tmp_path / "m.json", nan, name="m", card=CARD)
    with pytest.raises(ValueError, match=r"'card' is missing the keys \['compute'\]"):
        P.save(tmp_path / "m.json", hp, name="m", card={k: v for k, v in CARD.items() if k != "compute"})
    with pytest.raises(ValueError, match="must be letters"):
        P.save(tmp_path / "m.json", hp, name="a/b", card=CARD)
    with pytest.raises(ValueError, match=r"hyperparameters.lr must be a number, got 'fast'"):
        P.save(tmp_path / "m.json", {**hp, "lr": "fast"}, name="m", card=CARD)
    with pytest.raises(ValueError, match="must be one number"):
        P.save(tmp_path / "m.json", {**hp, "lr": torch.ones(2)}, name="m", card=CARD)
    with pytest.raises(ValueError, match="hidden=8 numbers, got 4"):
        P.save(tmp_path / "m.json", {**hp, "hidden": 8}, name="m", card=CARD)
    assert not (tmp_path / "m.json").exists()  # nothing written on a refusal


# ---------------------------------------------------------------------------- kwargs
def test_kwargs_overrides_win_and_are_checked(path):
    mem = P.load(path)
    kw = mem.kwargs()
    assert set(kw) == {"lr", "momentum", "inner_lr", "sigma", "hidden", "weight_decay", "memory_init",
                       "precondition", "beta2", "eps", "normalize"}
    assert kw["lr"] == float(torch.tensor(0.037)) and kw["precondition"] is False
    kw["memory_init"]["w1"].zero_()  # fresh tensors: the memory is unchanged
    assert not torch.equal(mem.hyperparameters["memory_init"]["w1"], kw["memory_init"]["w1"])
    over = mem.kwargs(lr=0.5, weight_decay=0.01, impl="reference", maximize=True)
    assert (over["lr"], over["weight_decay"], over["impl"], over["maximize"]) == (0.5, 0.01, "reference", True)
    assert over["momentum"] == mem.hyperparameters["momentum"]
    with pytest.raises(TypeError, match=r"DeepMomentum\(\) got an unexpected keyword argument 'lrr'"):
        mem.kwargs(lrr=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'params'"):
        mem.kwargs(params=[])
    with pytest.raises(ValueError, match=r"hidden=8 does not fit the pretrained memory 'mem'.*width 4"):
        mem.kwargs(hidden=8)
    assert mem.kwargs(hidden=4)["hidden"] == 4
    wide = {k: torch.zeros(8) for k in ("w1", "b1", "w2")}
    assert mem.kwargs(hidden=8, memory_init=wide)["memory_init"] is wide
    with pytest.raises(dataclasses.FrozenInstanceError):
        mem.name = "other"
    assert "PretrainedMemory(name='mem'" in repr(mem) and "hidden=4" in repr(mem)


# ---------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("overrides", [{}, {"weight_decay": 0.01, "lr": 0.02}, {"impl": "reference"}])
def test_pretrained_equals_the_constructor_step_for_step(path, overrides):
    a, b = tiny_model(), tiny_model()
    opt_a = deepopt.DeepMomentum.pretrained(a.parameters(), name=path, **overrides)
    opt_b = deepopt.DeepMomentum(b.parameters(), **P.load(path).kwargs(**overrides))
    assert type(opt_a) is deepopt.DeepMomentum
    assert opt_a.param_groups[0]["lr"] == overrides.get("lr", float(torch.tensor(0.037)))
    for step in range(6):
        train(a, opt_a, 1, start=step)
        train(b, opt_b, 1, start=step)
        assert params_equal(a, b)
    default = tiny_model()
    train(default, deepopt.DeepMomentum(default.parameters(), lr=opt_a.param_groups[0]["lr"]), 6)
    assert not params_equal(a, default)  # the memory matters


def test_pretrained_accepts_param_groups_and_str_paths(path):
    model = tiny_model()
    groups = [{"params": [model[0].weight]}, {"params": [model[0].bias], "lr": 0.001}]
    opt = deepopt.DeepMomentum.pretrained(groups, name=str(path))
    assert [g["lr"] for g in opt.param_groups] == [float(torch.tensor(0.037)), 0.001]


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_functional_twin_equals_the_class(path, impl):
    shapes = {"w": (5, 3), "b": (7,), "s": ()}
    g = torch.Generator().manual_seed(0)
    init = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    ps = [v.clone().requires_grad_() for v in init.values()]
    opt = deepopt.DeepMomentum.pretrained(ps, name=path, impl=impl, weight_decay=0.01)
    tx = F.deep_momentum_pretrained(path, weight_decay=0.01)
    assert tx.group["lr"] == opt.param_groups[0]["lr"]
    params, state = dict(init), tx.init(init)
    for _ in range(5):
        grads = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in init.items()}
        for p, gr in zip(ps, grads.values()):
            p.grad = gr.clone()
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = F.apply_updates(params, updates)
    for p, k in zip(ps, init):
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        F.deep_momentum_pretrained(path, nope=1)


def test_state_dict_round_trip_of_a_pretrained_optimizer(path):
    ref, run = tiny_model(), tiny_model()
    train(ref, deepopt.DeepMomentum.pretrained(ref.parameters(), name=path), 8)
    opt_run = deepopt.DeepMomentum.pretrained(run.parameters(), name=path)
    train(run, opt_run, 4)
    buf = io.BytesIO()
    torch.save({"model": run.state_dict(), "opt": opt_run.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    saved = ckpt["opt"]["param_groups"][0]["memory_init"]
    assert all(torch.equal(saved[k], P.load(path).hyperparameters["memory_init"][k]) for k in saved)
    resumed = tiny_model(seed=1)
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = deepopt.DeepMomentum.pretrained(resumed.parameters(), name=path)
    opt_resumed.load_state_dict(ckpt["opt"])
    train(resumed, opt_resumed, 4, start=4)
    assert params_equal(ref, resumed)
    loss_of(resumed, 0)  # still a working model


# ---------------------------------------------------------------------------- shipped files
def test_available_lists_the_shipped_files_sorted_and_each_loads():
    names = P.available()
    assert isinstance(names, list) and names == sorted(names)
    for name in names:
        mem = P.load(name)
        assert mem.name == name and mem.optimizer == "DeepMomentum" and set(P.CARD_KEYS) <= set(mem.card)


def test_the_default_memory_ships_with_its_card_and_trains():
    """The shipped ``default`` memory: a complete card and a working optimizer at its recommended rate."""
    assert "default" in P.available()
    mem = P.load("default")
    assert all(mem.card[k].strip() for k in P.CARD_KEYS)
    assert "meta_train" in mem.card["command"] and "--ship default" in mem.card["command"]
    torch.manual_seed(0)
    model = tiny_model()
    opt = deepopt.DeepMomentum.pretrained(model.parameters())
    assert opt.param_groups[0]["lr"] == mem.hyperparameters["lr"]
    x, y = torch.randn(64, 5), torch.randn(64, 3)
    first = float(torch.nn.functional.mse_loss(model(x), y))
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert float(torch.nn.functional.mse_loss(model(x), y)) < first


def test_shipped_names_resolve_in_the_package_folder(tmp_path, monkeypatch):
    for name in ("default", "b_mem", "a-mem"):
        P.save(tmp_path / f"{name}.json", _learned(), name=name, card=CARD)
    (tmp_path / "notes.txt").write_text("not a memory")
    (tmp_path / "sub.json").mkdir()
    monkeypatch.setattr(P, "_shipped", lambda: tmp_path)
    assert P.available() == ["a-mem", "b_mem", "default"]
    assert P.load().name == "default" and P.load("b_mem").name == "b_mem"
    model = tiny_model()
    opt = deepopt.DeepMomentum.pretrained(model.parameters())  # name="default"
    assert opt.param_groups[0]["lr"] == float(torch.tensor(0.037))
    assert F.deep_momentum_pretrained().group["lr"] == float(torch.tensor(0.037))
    with pytest.raises(ValueError, match=r"unknown pretrained memory 'c'; the shipped ones are \['a-mem', 'b_mem'"):
        P.load("c")
    _write(tmp_path, {**_doc(tmp_path / "default.json"), "name": "other"}, name="misnamed.json")
    with pytest.raises(ValueError, match="says its name is 'other'.*rename the file to other.json"):
        P.load("misnamed")


def test_public_names():
    assert "pretrained" in deepopt.__all__ and deepopt.pretrained is P
    assert "deep_momentum_pretrained" in F.__all__
    assert set(P.__all__) >= {"available", "load", "save", "PretrainedMemory"}


def test_preconditioned_memory_round_trip(tmp_path, path):
    """precondition, beta2 and eps are written for a preconditioned memory only, read back exactly, and
    build DeepMomentum(precondition=True); a plain file has none of them and reads precondition=False."""
    assert "precondition" not in _doc(path)["hyperparameters"]
    pre = P.save(tmp_path / "pre.json", dict(_learned(), precondition=True, beta2=0.99, eps=torch.tensor(1e-6)),
                 name="pre", card=CARD)
    hp = _doc(pre)["hyperparameters"]
    assert (hp["precondition"], hp["beta2"], hp["eps"]) == (True, 0.99, float(torch.tensor(1e-6)))
    mem = P.load(pre)
    assert "precondition=True, beta2=0.99" in repr(mem)
    opt = deepopt.DeepMomentum.pretrained([torch.nn.Parameter(torch.ones(3))], name=pre)
    assert opt.precondition and opt.param_groups[0]["beta2"] == 0.99
    assert [type(lv).__name__ for lv in opt.chains[0].levels] == ["DiagonalPreconditioner", "DeepMemory"]
    doc = _doc(pre)
    doc["hyperparameters"]["precondition"] = "yes"
    with pytest.raises(ValueError, match="hyperparameters.precondition must be true, false or"):
        P.load(_write(tmp_path, doc))
    doc["hyperparameters"]["precondition"] = True
    doc["hyperparameters"]["beta3"] = 0.9
    with pytest.raises(ValueError, match=r"unknown keys \['beta3'\].*optionally"):
        P.load(_write(tmp_path, doc))
