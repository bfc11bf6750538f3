"""Drop-in conformance: every optimizer in deepopt.OPTIMIZERS behaves like a torch optimizer."""

import io

import pytest
import torch

import deepopt

from .helpers import loss_of, make, params_equal, tiny_model, train

NAMES = sorted(deepopt.OPTIMIZERS)


@pytest.mark.parametrize("name", NAMES)
def test_is_torch_optimizer_and_documented(name):
    cls = deepopt.OPTIMIZERS[name]
    assert issubclass(cls, torch.optim.Optimizer)
    doc = cls.__doc__ or ""
    assert "Nested Learning" in doc and "Example" in doc and "math" in doc


@pytest.mark.parametrize("name", NAMES)
def test_step_closure_returns_loss_and_calls_once(name):
    model = tiny_model()
    opt = make(name, model)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        return loss

    out = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(out) and out.ndim == 0
    assert opt.step() is None


@pytest.mark.parametrize("name", NAMES)
def test_grads_are_not_consumed_and_zero_grad_clears(name):
    model = tiny_model()
    opt = make(name, model)
    loss_of(model, 0).backward()
    before = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_drives_group_lr(name):
    model = tiny_model()
    opt = make(name, model, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 3 else 0.0)
    for s in range(3):
        train(model, opt, 1, start=s)
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    frozen = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 3, start=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), frozen))


@pytest.mark.parametrize("name", NAMES)
def test_cosine_schedule_runs(name):
    model = tiny_model()
    opt = make(name, model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    for s in range(4):
        train(model, opt, 1, start=s)
        sched.step()
    assert opt.param_groups[0]["lr"] < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_bit_exactly(name):
    ref, run = tiny_model(), tiny_model()
    opt_ref = make(name, ref)
    train(ref, opt_ref, 8)

    opt_run = make(name, run)
    train(run, opt_run, 4)
    buf = io.BytesIO()
    torch.save({"model": run.state_dict(), "opt": opt_run.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = tiny_model(seed=1)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = make(name, resumed)
    opt_resumed.load_state_dict(ckpt["opt"])
    train(resumed, opt_resumed, 4, start=4)
    assert params_equal(ref, resumed)


@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_lr_zero_step_changes_nothing(name):
    model = tiny_model()
    opt = make(name, model, lr=0.0)
    loss_of(model, 0).backward()  # a real forward (DGD captures layer inputs), then zero grads
    for p in model.parameters():
        p.grad.zero_()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_and_multiple_groups(name):
    model = tiny_model()
    params = list(model.parameters())
    opt = make(name, model, params=[{"params": params[:2]}, {"params": params[2:4], "lr": 1e-4}])
    opt.add_param_group({"params": params[4:]})
    assert len(opt.param_groups) == 3
    before = [p.detach().clone() for p in params]
    train(model, opt, 2)
    assert all(not torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_are_called(name):
    model = tiny_model()
    opt = make(name, model)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    train(model, opt, 1)
    assert seen == ["pre", "post"]


@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_step_runs(name):
    model = tiny_model()
    opt = make(name, model)
    eager, compiled_model = tiny_model(), model
    opt_eager = make(name, eager)
    step = torch.compile(opt.step, backend="eager")
    for s in range(3):
        for m, o in ((compiled_model, None), (eager, opt_eager)):
            (o or opt).zero_grad()
            loss_of(m, s).backward()
        step()
        opt_eager.step()
    for p, q in zip(compiled_model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["AdamMemory", "MomentumMemory"])
def test_torch_compile_inductor(name):
    model, eager = tiny_model(), tiny_model()
    opt, opt_eager = make(name, model), make(name, eager)
    step = torch.compile(opt.step)
    for s in range(2):
        for m, o in ((model, opt), (eager, opt_eager)):
            o.zero_grad()
            loss_of(m, s).backward()
        step()
        opt_eager.step()
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("name", NAMES)
def test_memory_stats_are_finite_floats(name):
    model = tiny_model()
    opt = make(name, model)
    train(model, opt, 2)
    stats = opt.memory_stats()
    assert all(isinstance(v, float) and v == v for v in stats.values())
    if name != "DGD":
        assert stats
