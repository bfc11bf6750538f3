"""The foreach fast path equals the pure reference (float64), on awkward inputs."""

import pytest
import torch
from torch import nn

import deepopt
from deepopt.levels import DiagonalPreconditioner, Momentum, NewtonSchulz

from .helpers import LR, make

NAMES = sorted(deepopt.OPTIMIZERS)


def awkward_model(seed=0):
    """Odd shapes, a conv filter, a scalar, a parameter that only sometimes gets a gradient."""
    torch.manual_seed(seed)
    model = nn.ModuleDict({
        "a": nn.Linear(5, 7), "b": nn.Linear(7, 3, bias=False), "conv": nn.Conv1d(2, 3, 3),
        "unused": nn.Linear(4, 4),
    }).double()
    model.register_parameter("scale", nn.Parameter(torch.tensor(1.5, dtype=torch.float64)))
    return model


def awkward_loss(model, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    s = torch.randn(4, 2, 6, generator=g, dtype=torch.float64)
    out = model["b"](torch.tanh(model["a"](x))).square().mean() * model.scale
    out = out + model["conv"](s).square().mean()
    if step % 3 == 0:  # "unused" gets a gradient only every third step (grad None otherwise)
        out = out + model["unused"](torch.randn(2, 4, generator=g, dtype=torch.float64)).square().mean()
    return out


def run(name, impl, steps=12, groups=None, **kw):
    model = awkward_model()
    params = list(model.parameters())
    if groups == "slow":
        params = [{"params": params[:3]}, {"params": params[3:], "period": 3}, {"params": []}]
    opt = make(name, model, params=params, impl=impl, **kw)
    for s in range(steps):
        opt.zero_grad()
        awkward_loss(model, s).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("groups", [None, "slow"])
def test_foreach_equals_reference_float64(name, groups):
    fast, opt_fast = run(name, "foreach", groups=groups)
    ref, opt_ref = run(name, "reference", groups=groups)
    for (n, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=n)
    for p in fast.parameters():
        sf, sr = opt_fast.state[p], opt_ref.state[dict(zip(fast.parameters(), ref.parameters()))[p]]
        assert sorted(sf) == sorted(sr)
        for k in sf:
            torch.testing.assert_close(sf[k], sr[k], rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("impl", ["foreach", "reference"])
def test_nested_optimizer_with_slow_levels_paths_agree(impl):
    levels = lambda: [DiagonalPreconditioner(0.99, 1e-8, period=4), Momentum(0.9, form="ema", period=2),  # noqa: E731
                      NewtonSchulz(ns_dtype=None)]
    fast, _ = _nested("foreach", levels())
    ref, _ = _nested("reference", levels())
    for p, q in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def _nested(impl, levels):
    model = awkward_model()
    opt = deepopt.NestedOptimizer(model.parameters(), levels=levels, lr=0.01, impl=impl)
    for s in range(10):
        opt.zero_grad()
        awkward_loss(model, s).backward()
        opt.step()
    return model, opt


def test_params_without_grad_are_untouched_and_get_no_state():
    model = awkward_model()
    opt = make("AdamMemory", model)
    awkward_loss(model, 1).backward()  # step 1: "unused" has no gradient
    before = model["unused"].weight.detach().clone()
    opt.step()
    assert torch.equal(model["unused"].weight, before)
    assert len(opt.state[model["unused"].weight]) == 0


def test_slow_group_updates_only_at_boundary_with_mean_gradient():
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = deepopt.MomentumMemory([{"params": [w], "period": 3}], lr=1.0, momentum=0.5)
    grads = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, 0.0]), torch.tensor([2.0, 1.0, 0.0])]
    for i, g in enumerate(grads * 2):
        w.grad = g.double()
        opt.step()
        if i in (0, 1, 3, 4):  # held: no parameter change, no state advance
            assert int(opt.state[w].get("step", torch.tensor(0.0))) == (0 if i < 2 else 1)
    mean = torch.stack(grads).mean(0).double()
    # two boundary updates: m1 = mean; m2 = 0.5 m1 + mean
    torch.testing.assert_close(w.detach(), -(mean + (0.5 * mean + mean)))
    assert int(opt.state[w]["step"]) == 2


def test_slow_level_in_chain_holds_its_output_between_boundaries():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = deepopt.NestedOptimizer([p], levels=[Momentum(0.0, period=2)], lr=1.0)
    steps = []
    for g in ([1.0, 1.0], [3.0, 3.0], [5.0, 5.0], [7.0, 7.0]):
        before = p.detach().clone()
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        steps.append((before - p.detach())[0].item())
    # boundary at t=2 writes mean(1, 3) = 2; t=3 holds 2; t=4 writes mean(5, 7) = 6; t=1 reads nothing yet.
    assert steps == [0.0, 2.0, 2.0, 6.0]


def test_lr_table_covers_registry():
    assert set(LR) == set(deepopt.OPTIMIZERS)
