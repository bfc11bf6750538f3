"""Each mechanism of deepopt.continual against its defining property (and its docstring examples)."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch

from deepopt.continual import (Importance, SlowDistillation, SlowLevel, SurpriseClock, TaskClock, build_optimizer,
                               cms_levels, level_groups, metrics)

MODULES = ["deepopt.continual", "deepopt.continual.metrics", "deepopt.continual.clock", "deepopt.continual.importance",
           "deepopt.continual.consolidation", "deepopt.continual.distill", "deepopt.continual.levels",
           "deepopt.continual.recipe"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- metrics
def test_average_is_plasticity_plus_backward_transfer():
    g = torch.Generator().manual_seed(0)
    for t in (2, 3, 5):
        R = torch.rand(t, t, generator=g).tolist()
        lhs = metrics.average_accuracy(R)
        rhs = metrics.learning_accuracy(R) + (t - 1) / t * metrics.backward_transfer(R)
        assert math.isclose(lhs, rhs, rel_tol=1e-12, abs_tol=1e-12)


def test_no_forgetting_matrix():
    R = [[0.8, 0.1, 0.1], [0.8, 0.9, 0.2], [0.8, 0.9, 0.7]]
    assert metrics.backward_transfer(R) == 0.0 and metrics.forgetting(R) == 0.0
    assert math.isclose(metrics.forward_transfer(R, [0.1, 0.1, 0.1]), 0.05)
    assert metrics.per_task_curves(R) == [[0.8, 0.8, 0.8], [0.9, 0.9], [0.7]]


def test_forgetting_uses_best_earlier_value_and_lower_is_better_negates():
    R = [[0.9, 0.0, 0.0], [0.5, 0.9, 0.0], [0.7, 0.4, 0.9]]
    assert math.isclose(metrics.forgetting(R), ((0.9 - 0.7) + (0.9 - 0.4)) / 2)
    loss = [[1.0, 3.0], [2.0, 1.0]]  # loss on task 0 rose from 1 to 2: forgetting
    assert metrics.backward_transfer(loss, higher_is_better=False) == -1.0
    assert metrics.forgetting(loss, higher_is_better=False) == 1.0


@pytest.mark.parametrize("bad, word", [([[0.1, 0.2]], "T x T"), ([[0.1, float("nan")], [0.1, 0.2]], "finite")])
def test_metrics_bad_input(bad, word):
    with pytest.raises(ValueError, match=word):
        metrics.backward_transfer(bad)
    with pytest.raises(ValueError, match="untrained"):
        metrics.forward_transfer([[0.1, 0.2], [0.3, 0.4]], [0.1])


# ----------------------------------------------------------------------------- clocks
def test_task_clock_period_and_bad_input():
    c = TaskClock(4)
    assert [i + 1 for i in range(12) if c.tick()] == [4, 8, 12]
    assert not any(TaskClock(None).tick() for _ in range(50))
    with pytest.raises(ValueError, match="period"):
        TaskClock(0)


def _stream(shifts, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    level, out = 1.0, []
    for t in range(n):
        if t in shifts:
            level = 3.0
        level = 0.3 + (level - 0.3) * 0.97  # each task's loss decays from its start
        out.append(level * (1 + 0.05 * float(torch.randn((), generator=g))))
    return out


def test_surprise_clock_ticks_once_per_shift_and_never_without_one():
    clock = SurpriseClock()
    ticks = [t for t, loss in enumerate(_stream({100, 200})) if clock.tick(loss)]
    assert ticks == [100, 200]
    quiet = SurpriseClock()
    assert not any(quiet.tick(loss) for loss in _stream(set()))
    with pytest.raises(ValueError, match="loss"):
        SurpriseClock().tick(None)
    with pytest.raises(ValueError, match="beta"):
        SurpriseClock(beta=1.0)


# ----------------------------------------------------------------------------- importance
def test_fisher_importance_is_mean_squared_gradient_normalised():
    w = torch.nn.Parameter(torch.zeros(3))
    imp = Importance([w], "fisher")
    for g in ([1.0, 0.0, 2.0], [3.0, 0.0, 0.0]):
        w.grad = torch.tensor(g)
        imp.before_step(); imp.after_step()
    raw = torch.tensor([5.0, 0.0, 2.0])  # mean of g^2
    torch.testing.assert_close(imp.take()[0], raw * 3 / raw.sum())
    assert imp.count == 0 and float(imp.take()[0].sum()) == 0.0  # restarted; nothing learned -> zeros


def test_path_importance_credits_only_moves_that_lowered_the_loss():
    w = torch.nn.Parameter(torch.zeros(3))
    imp = Importance([w], "path", xi=1e-3)
    w.grad = torch.tensor([1.0, 1.0, 0.0])
    imp.before_step()
    with torch.no_grad():
        w.add_(torch.tensor([-0.1, 0.1, 0.1]))  # down the gradient, up it, and a move without gradient
    imp.after_step()
    out = imp.take()[0]
    assert out[0] > 0 and out[1] == 0 and out[2] == 0
    assert math.isclose(float(out.mean()), 1.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        Importance([w], "hessian")


# ----------------------------------------------------------------------------- slow level
def test_consolidation_copies_then_moves_by_rate():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    slow = SlowLevel([w], rate=0.25)
    slow.consolidate([torch.ones(2)])
    torch.testing.assert_close(slow.slow[0], torch.tensor([1.0, 2.0]))  # first write: a copy
    with torch.no_grad():
        w.copy_(torch.tensor([5.0, 2.0]))
    slow.consolidate([torch.ones(2)])
    torch.testing.assert_close(slow.slow[0], torch.tensor([2.0, 2.0]))  # 1 + 0.25 (5 - 1)
    torch.testing.assert_close(slow.importance[0], torch.full((2,), 2.0))


def test_pull_contracts_by_exactly_one_minus_lr_strength_importance_and_never_overshoots():
    w = torch.nn.Parameter(torch.zeros(3))
    slow = SlowLevel([w], strength=2.0)
    slow.pull(lr=0.1)
    assert torch.equal(w.detach(), torch.zeros(3))  # no write yet: no pull
    slow.consolidate([torch.tensor([1.0, 0.5, 100.0])])
    with torch.no_grad():
        w.fill_(1.0)
    slow.pull(lr=0.1)
    torch.testing.assert_close(w.detach(), torch.tensor([0.8, 0.9, 0.0]))  # k = 0.2, 0.1, min(1, 20)
    assert slow.distance() == pytest.approx(1.0 * 0.64 + 0.5 * 0.81)


def test_slow_level_state_round_trip_and_bad_input():
    w = torch.nn.Parameter(torch.randn(4))
    a = SlowLevel([w], strength=1.0)
    a.consolidate([torch.rand(4)])
    b = SlowLevel([w], strength=1.0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.slow[0], b.slow[0]) and torch.equal(a.importance[0], b.importance[0]) and b.writes == 1
    for kw, word in (({"rate": 0.0}, "rate"), ({"strength": -1.0}, "strength"), ({"decay": 2.0}, "decay")):
        with pytest.raises(ValueError, match=word):
            SlowLevel([w], **kw)


# ----------------------------------------------------------------------------- distillation
def test_distillation_gradient_moves_outputs_toward_the_slow_level():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    names = [n for n, _ in model.named_parameters()]
    slow = [p.detach() + 0.5 * torch.randn_like(p) for p in model.parameters()]
    d = SlowDistillation(model, names, weight=1.0, temperature=1.0)
    x = torch.randn(16, 5)
    model(x)
    kl0 = float(d.add_gradients(slow))
    assert kl0 > 0
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    model.zero_grad()
    assert float(d.add_gradients(slow)) < kl0
    d.remove_hooks()


def test_distillation_errors_name_the_fix():
    model = torch.nn.Linear(3, 2)
    d = SlowDistillation(model, [n for n, _ in model.named_parameters()])
    with pytest.raises(RuntimeError, match="forward"):
        d.add_gradients([p.detach() for p in model.parameters()])
    with pytest.raises(ValueError, match="distill"):
        SlowDistillation(model, ["weight"], weight=0.0)

    class Dict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.lin(x)}

    m = Dict()
    d = SlowDistillation(m, [n for n, _ in m.named_parameters()])
    m(torch.randn(2, 3))
    with pytest.raises(TypeError, match="output="):
        d.add_gradients([p.detach() for p in m.parameters()])
    ok = SlowDistillation(m, [n for n, _ in m.named_parameters()], output=lambda o: o["logits"])
    m(torch.randn(2, 3))
    assert float(ok.add_gradients([p.detach() for p in m.parameters()])) == 0.0


# ----------------------------------------------------------------------------- levels
def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def test_slow_level_of_a_torch_optimizer_moves_only_every_period_with_its_lr():
    model = _mlp()
    opt, periodic = build_optimizer(model, lr=0.1, optimizer="sgd", periods={"0.*": 3}, lr_scales={"0.*": 0.5})
    assert sorted(g["lr"] for g in opt.param_groups) == [0.05, 0.1]
    x = torch.randn(8, 4)
    w0 = model[0].weight.detach().clone()
    grads = []
    for step in range(1, 4):
        opt.zero_grad()
        model(x).square().mean().backward()
        grads.append(model[0].weight.grad.clone())
        periodic.before_step()
        opt.step()
        if step < 3:
            assert torch.equal(model[0].weight.detach(), w0)
    torch.testing.assert_close(model[0].weight.detach(), w0 - 0.05 * sum(grads) / 3)


def test_deepopt_optimizers_take_periods_as_groups_m3_and_dgd():
    from nl_layers import CMS

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), CMS(dim=4, hidden=8, periods=(1, 4)))
    spec = cms_levels(model)
    assert spec and set(spec.values()) == {1, 4} and all(k.startswith("1.blocks.") for k in spec)
    groups = level_groups(model, lr=1e-2)
    assert sorted(g["period"] for g in groups) == [1, 4]
    opt, periodic = build_optimizer(model, lr=1e-2, optimizer="M3")
    assert periodic is None and sorted(g["period"] for g in opt.param_groups) == [1, 4]
    dgd, _ = build_optimizer(_mlp(), lr=1e-2, optimizer="DGD")
    assert type(dgd).__name__ == "DGD" and dgd._hooks
    dgd.remove_hooks()


@pytest.mark.parametrize("kw, word", [({"optimizer": "adagrad"}, "optimizer"), ({"periods": {"nope.*": 2}}, "nope"),
                                      ({"lr_scales": {"0.*": -1.0}}, "lr_scales"), ({"lr": 0.0}, "lr")])
def test_levels_bad_input(kw, word):
    kw = {"lr": 1e-2, **kw}
    with pytest.raises(ValueError, match=word):
        build_optimizer(_mlp(), **kw)


def test_running_fisher_weights_the_end_of_the_task():
    w = torch.nn.Parameter(torch.zeros(2))
    imp = Importance([w], "fisher", beta=0.5)
    for g in ([4.0, 0.0], [0.0, 1.0]):  # early: a large transient on w0; late: w1
        w.grad = torch.tensor(g)
        imp.before_step(); imp.after_step()
    raw = torch.tensor([0.5 * 16.0 * 0.5, 0.5 * 1.0]) / (1 - 0.25)  # EMA, bias-corrected
    torch.testing.assert_close(imp.take()[0], raw * 2 / raw.sum())
    plain = Importance([w], "fisher")
    for g in ([4.0, 0.0], [0.0, 1.0]):
        w.grad = torch.tensor(g)
        plain.before_step(); plain.after_step()
    out = plain.take()[0]
    assert out[0] / out[1] == 16.0  # the plain mean keeps the transient's full weight (EMA: 8)
    with pytest.raises(ValueError, match="beta"):
        Importance([w], "path", beta=0.9)


def test_coupled_pull_adds_strength_importance_times_distance_to_the_gradient():
    w = torch.nn.Parameter(torch.zeros(2))
    slow = SlowLevel([w], strength=3.0)
    w.grad = torch.ones(2)
    slow.pull_gradients()
    assert torch.equal(w.grad, torch.ones(2))  # no write yet
    slow.consolidate([torch.tensor([2.0, 0.0])])
    with torch.no_grad():
        w.fill_(0.5)
    slow.pull_gradients()
    torch.testing.assert_close(w.grad, torch.tensor([1.0 + 3.0 * 2.0 * 0.5, 1.0]))


def test_damping_divides_each_weights_step_by_one_plus_damping_importance():
    w = torch.nn.Parameter(torch.zeros(3))
    slow = SlowLevel([w], strength=0.0)
    before = [w.detach().clone()]
    with torch.no_grad():
        w.add_(torch.tensor([1.0, 1.0, -2.0]))
    slow.damp(before, 4.0)
    assert torch.equal(w.detach(), torch.tensor([1.0, 1.0, -2.0]))  # no write yet: the full step
    slow.consolidate([torch.tensor([0.0, 1.0, 0.5])])
    before = [w.detach().clone()]
    with torch.no_grad():
        w.add_(torch.tensor([1.0, 1.0, 1.0]))
    slow.damp(before, 4.0)
    torch.testing.assert_close(w.detach(), torch.tensor([2.0, 1.0 + 1 / 5, -2.0 + 1 / 3]))


# ----------------------------------------------------------------------------- shared pull
def test_shared_pull_pulls_less_where_the_new_task_needs_the_weight():
    """Equal old importance: the pull shrinks as the new task's importance grows (Omega / (Omega +
    c Omega_new) of it), and with Omega_new = 0 (or share = 0) it is the existing pull bit for bit."""
    old = torch.full((4,), 2.0)
    new = [torch.tensor([0.0, 1.0, 2.0, 20.0])]
    grads = {}
    for share, n in ((0.0, None), (1.0, None), (1.0, [torch.zeros(4)]), (1.0, new), (0.0, new), (2.0, new)):
        w = torch.nn.Parameter(torch.zeros(4))
        slow = SlowLevel([w], strength=3.0, share=share)
        slow.consolidate([old])
        with torch.no_grad():
            w.copy_(torch.randn(4, generator=torch.Generator().manual_seed(1)) + 1.0)
        w.grad = torch.zeros(4)
        slow.pull_gradients(new=n)
        grads[share, None if n is None else float(n[0].sum())] = w.grad.clone()
    plain = grads[0.0, None]
    assert torch.equal(grads[1.0, None], plain) and torch.equal(grads[1.0, 0.0], plain)  # exactly the pull
    assert torch.equal(grads[0.0, 23.0], plain)  # share = 0 ignores Omega_new
    shared = grads[1.0, 23.0]
    assert shared[0] == plain[0]  # only old tasks need weight 0: the full pull
    torch.testing.assert_close(shared / plain, torch.tensor([1.0, 2 / 3, 1 / 2, 2 / 22]))
    torch.testing.assert_close(grads[2.0, 23.0] / plain, torch.tensor([1.0, 2 / 4, 2 / 6, 2 / 42]))


def test_shared_decoupled_pull_and_damping():
    w = torch.nn.Parameter(torch.zeros(2))
    slow = SlowLevel([w], strength=1.0, share=1.0, share_damping=True)
    slow.consolidate([torch.tensor([1.0, 1.0])])
    new = [torch.tensor([0.0, 1.0])]  # the new task needs weight 1 as much as the old ones
    with torch.no_grad():
        w.fill_(1.0)
    slow.pull(lr=0.1, new=new)
    torch.testing.assert_close(w.detach(), torch.tensor([0.9, 0.95]))  # k = 0.1 and 0.1 * 1/2
    before = [w.detach().clone()]
    with torch.no_grad():
        w.add_(1.0)
    slow.damp(before, 2.0, new=new)
    torch.testing.assert_close(w.detach() - before[0], torch.tensor([1 / 3, 1 / 2]))  # 1/(1 + 2*1), 1/(1 + 2*0.5)
    plain = SlowLevel([w], strength=1.0, share=1.0)  # share_damping off: the damping ignores Omega_new
    plain.consolidate([torch.tensor([1.0, 1.0])])
    before = [w.detach().clone()]
    with torch.no_grad():
        w.add_(1.0)
    plain.damp(before, 2.0, new=new)
    torch.testing.assert_close(w.detach() - before[0], torch.full((2,), 1 / 3))
    for kw, word in (({"share": -1.0}, "share"), ({"share_damping": True}, "share > 0")):
        with pytest.raises(ValueError, match=word):
            SlowLevel([w], **kw)
    with pytest.raises(ValueError, match="one tensor per parameter"):
        slow.pull_gradients(new=[])


@pytest.mark.parametrize("kind, beta", [("fisher", 0.0), ("fisher", 0.9), ("path", 0.0)])
def test_current_importance_is_what_take_would_return_without_restarting(kind, beta):
    w = torch.nn.Parameter(torch.zeros(3))
    imp = Importance([w], kind, beta=beta)
    assert torch.equal(imp.current()[0], torch.zeros(3))  # nothing seen yet
    for g in ([1.0, 0.0, 2.0], [3.0, 0.5, 0.0]):
        w.grad = torch.tensor(g)
        imp.before_step()
        with torch.no_grad():
            w.sub_(0.1 * w.grad)
        imp.after_step()
    now = imp.current()[0]
    assert imp.count == 2
    assert torch.equal(now, imp.take()[0]) and math.isclose(float(now.mean()), 1.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="predictive"):
        Importance([w], "predictive", model=torch.nn.Linear(3, 1)).current()


def test_predictive_fisher_is_the_models_own_fisher_on_the_last_training_input():
    """Softmax regression: grad of log p(y|x) in W is (e_y - p) x^T; y drawn from p with the
    importance's generator (seed 8191 + number of earlier takes); mean over the input's rows,
    normalised to mean 1."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3, bias=False)
    imp = Importance(list(model.parameters()), "predictive", model=model)
    with torch.no_grad():
        model(torch.randn(2, 4))  # no gradient: not a training input, not captured
    assert imp.input is None
    x = torch.randn(5, 4)
    model(x).sum().backward()
    imp.before_step(); imp.after_step()
    gen = torch.Generator().manual_seed(8191)
    p = torch.softmax(model(x), -1).detach()
    expected = torch.zeros(3, 4)
    for i in range(5):
        y = int(torch.multinomial(p[i : i + 1], 1, generator=gen))
        expected += torch.outer(torch.nn.functional.one_hot(torch.tensor(y), 3).float() - p[i], x[i]) ** 2 / 5
    torch.testing.assert_close(imp.take()[0], expected * expected.numel() / expected.sum())
    assert imp.takes == 1 and imp.count == 0
    imp.remove_hooks()
    model(x).sum().backward()
    assert imp.input.shape == (5, 4) and not model._forward_pre_hooks
    with pytest.raises(ValueError, match="model"):
        Importance(list(model.parameters()), "predictive")
