"""The continual suite: sequences, EWC, replay, slow levels, and a tiny end-to-end run."""

import json

import pytest
import torch

from benchmarks.cli import main
from benchmarks.continual import EWC, Method, continual_methods, period_groups, run_sequence
from benchmarks.continual_tasks import PermutedDigits, ShakespeareGenres, SplitDigits
from benchmarks.optimizers import select_optimizers

LRS = {"adam": 3e-3, "sgd": 0.1, "muon": 0.02}


def test_sequences_define_distinct_tasks():
    perm = PermutedDigits(n_tasks=3, steps=1)
    assert torch.equal(perm.perms[0], torch.arange(64)) and not torch.equal(perm.perms[1], perm.perms[2])
    split = SplitDigits(n_tasks=5, steps=1)
    gen = torch.Generator().manual_seed(0)
    x, y = split.sample(2, gen, 32)
    assert set(y.tolist()) <= {4, 5}
    # the task mask makes the untrained model pick within the task's two classes only
    model = split.model(0)
    assert 0.0 <= split.evaluate(model, 3) <= 1.0
    text = ShakespeareGenres(steps=1)
    assert text.evaluate(text.model(0), 0) > 3.0  # untrained: near log2(36) bits per character


def test_run_sequence_matrix_and_methods():
    specs = select_optimizers(["AdamW"])
    methods = continual_methods(specs)
    assert set(methods) == {"finetune-AdamW", "EWC", "replay"}
    seq = SplitDigits(n_tasks=3, steps=8)
    for method in methods.values():
        out = run_sequence(seq, method, LRS, seed=0)
        assert out["error"] is None
        assert len(out["matrix"]) == 3 and all(len(row) == 3 for row in out["matrix"])
        assert all(0.0 <= v <= 1.0 for row in out["matrix"] for v in row)
    # training on task 0 lifts task 0 well above the untrained model
    out = run_sequence(seq, methods["finetune-AdamW"], LRS, seed=0)
    assert out["matrix"][0][0] > 0.8


def test_ewc_penalty_is_zero_before_and_grows_with_distance_after():
    seq = SplitDigits(n_tasks=2, steps=1)
    model = seq.model(0)
    ewc = EWC(lam=10.0)
    assert ewc.penalty(model) == 0.0
    ewc.consolidate(model, seq, 0, torch.Generator().manual_seed(0))
    assert float(ewc.penalty(model).detach()) == 0.0  # at the anchor
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    expected = 0.5 * 10.0 * sum(float((f * 0.01).sum()) for f in ewc.fisher)
    assert float(ewc.penalty(model).detach()) == pytest.approx(expected, rel=1e-5)


def test_period_groups_follow_the_level_spec():
    model = PermutedDigits(n_tasks=2, steps=1).model(0)
    groups = period_groups(model, {"body.*": 4})
    periods = {g["period"]: len(g["params"]) for g in groups}
    assert periods == {1: 2, 4: 4}  # head weight+bias fast; two body layers slow


def test_slow_method_holds_slow_parameters_between_boundaries():
    import deepopt

    from benchmarks.continual import _optimizer

    name = "MomentumMemory" if "MomentumMemory" in deepopt.OPTIMIZERS else sorted(deepopt.OPTIMIZERS)[0]
    spec = select_optimizers([name])[name]
    seq = PermutedDigits(n_tasks=2, steps=1)
    model = seq.model(0)
    opt = _optimizer(Method(f"{name}+slow", spec, "slow"), model, LRS, seq.slow_spec)  # body.* period 4
    gen = torch.Generator().manual_seed(0)
    body0, head0 = model.body[0].weight.detach().clone(), model.head.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        seq.train_loss(model, 0, gen).backward()
        opt.step()
    assert torch.equal(model.body[0].weight, body0) and not torch.equal(model.head.weight, head0)
    opt.zero_grad()
    seq.train_loss(model, 0, gen).backward()
    opt.step()
    assert not torch.equal(model.body[0].weight, body0)


def test_cli_tiny_continual_run(tmp_path):
    main(["run", "--suite", "continual", "--tasks", "split_digits", "--optimizers", "AdamW", "SGD",
          "--steps", "4", "--seeds", "1", "--factors", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    seq = result["sequences"]["split_digits"]
    assert set(seq["results"]) == {"finetune-AdamW", "finetune-SGD", "EWC", "replay"}
    for r in seq["results"].values():
        assert r["bwt"]["n"] == 1 and r["matrix_mean"] is not None and r["lr"] > 0
    assert result["command"].startswith("python -m benchmarks run --suite continual")
    assert "| EWC |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "accuracy_split_digits.png").stat().st_size > 1000
