"""PeriodicGradients without Lightning: resolution of level specs, the rule against the hand-written
reference for torch and deepopt optimizers, skipped steps, and checkpoints mid-period."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from deepopt.lightning import PeriodicGradients, resolve_levels
from deepopt import MomentumMemory

from .lightning_reference import PERIODS, loader, make_net, reference_fit


def test_resolve_levels_patterns_and_conflicts():
    names = ["enc.0.weight", "enc.0.bias", "enc.1.weight", "head.weight"]
    spec = {"enc.*": 4, "enc.0.bias": 4, "head.weight": 2}
    assert resolve_levels(names, spec) == {"enc.0.weight": 4, "enc.0.bias": 4, "enc.1.weight": 4,
                                           "head.weight": 2}
    with pytest.raises(ValueError, match="disjoint"):
        resolve_levels(names, {"enc.*": 4, "enc.1.*": 2})


def test_resolve_levels_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"'dec\.\*' matches no parameter"):
        resolve_levels(["enc.weight"], {"dec.*": 2})
    assert resolve_levels(["enc.weight"], {"dec.*": 2}, strict=False) == {"enc.weight": 1}
    with pytest.raises(ValueError, match="period must be >= 1"):
        resolve_levels(["a"], {"a": 0})
    with pytest.raises(TypeError, match="int period"):
        resolve_levels(["a"], {"a": 2.0})
    with pytest.raises(TypeError, match="int period"):
        resolve_levels(["a"], {"a": True})
    with pytest.raises(ValueError, match="reduce"):
        PeriodicGradients([], {}, reduce="max")


def _plain_loop(opt_factory, steps: int, periods, reduce="mean", stop_at=None, periodic_state=None, net=None,
                opt_state=None):
    net = copy.deepcopy(make_net()) if net is None else net
    opt = opt_factory(net)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    periodic = PeriodicGradients(net.named_parameters(), periods, reduce)
    if periodic_state is not None:
        periodic.load_state_dict(periodic_state)
    batches = list(loader())
    for _ in range(periodic.step, steps if stop_at is None else stop_at):
        x, y = batches[periodic.step % len(batches)]
        F.mse_loss(net(x), y).backward()
        periodic.before_step()
        opt.step()
        opt.zero_grad()
    return net, opt, periodic


def _groups(net, lr):
    w = [p for n, p in net.named_parameters() if n.endswith("weight")]
    b = [p for n, p in net.named_parameters() if n.endswith("bias")]
    return [{"params": w, "weight_decay": 0.1}, {"params": b, "weight_decay": 0.0, "lr": lr * 0.5}]


FACTORIES = {
    "adamw": (lambda net: torch.optim.AdamW(_groups(net, 0.05), lr=0.05), "adamw"),
    "sgd": (lambda net: torch.optim.SGD(_groups(net, 0.05), lr=0.05, momentum=0.9), "sgd"),
    "MomentumMemory": (lambda net: MomentumMemory(_groups(net, 0.05), lr=0.05, momentum=0.9), "sgd"),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_plain_loop_matches_reference_parameter_by_parameter(name):
    factory, ref = FACTORIES[name]
    net, _, periodic = _plain_loop(factory, 11, PERIODS)
    want = reference_fit(11, opt=ref, periods=PERIODS, bias_lr_mult=0.5)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), want[f"net.{n}"], rtol=0, atol=1e-12, msg=n)
    assert periodic.step == 11 and periodic.slow_names() == ["0.weight", "0.bias", "2.weight"]


def test_sum_reduce_is_period_times_mean_for_sgd_without_momentum():
    def factory(net):
        return torch.optim.SGD(net.parameters(), lr=0.01)
    mean_net, _, _ = _plain_loop(factory, 3, {"*": 3}, reduce="mean")
    sum_net, _, _ = _plain_loop(lambda n: torch.optim.SGD(n.parameters(), lr=0.01 / 3), 3, {"*": 3},
                                reduce="sum")
    torch.testing.assert_close(mean_net[0].weight, sum_net[0].weight, rtol=1e-12, atol=1e-14)


def test_skipped_step_is_neither_accumulated_nor_counted():
    net = make_net()
    periodic = PeriodicGradients(net.named_parameters(), {"0.weight": 2})
    net[0].weight.grad = torch.ones_like(net[0].weight)
    assert periodic.before_step(skip=True) == [] and periodic.step == 0
    assert net[0].weight.grad is not None  # untouched: the step will not happen anyway
    net[0].weight.grad = torch.full_like(net[0].weight, 2.0)
    assert periodic.before_step() == [] and net[0].weight.grad is None
    net[0].weight.grad = torch.full_like(net[0].weight, 4.0)
    assert periodic.before_step() == ["0.weight"]
    torch.testing.assert_close(net[0].weight.grad, torch.full_like(net[0].weight, 3.0))


def test_low_precision_gradients_accumulate_in_float32():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    periodic = PeriodicGradients([("p", p)], {"p": 4})
    for _ in range(4):
        p.grad = torch.full((4,), 1 + 2 ** -8, dtype=torch.bfloat16)  # exact in bf16 only alone
        periodic.before_step()
    assert p.grad.dtype == torch.bfloat16
    torch.testing.assert_close(p.grad, torch.full((4,), 1 + 2 ** -8, dtype=torch.bfloat16))


def test_checkpoint_mid_period_resumes_exactly():
    factory = FACTORIES["adamw"][0]
    full, _, _ = _plain_loop(factory, 10, PERIODS)
    net, opt, periodic = _plain_loop(factory, 10, PERIODS, stop_at=5)
    state = copy.deepcopy(periodic.state_dict())
    assert state["step"] == 5 and set(state["accumulators"]) == {"0.weight", "0.bias", "2.weight"}
    resumed, _, _ = _plain_loop(factory, 10, PERIODS, periodic_state=state, net=net,
                                opt_state=copy.deepcopy(opt.state_dict()))
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


def test_load_state_dict_refuses_other_levels():
    net = make_net()
    state = PeriodicGradients(net.named_parameters(), {"0.weight": 2}).state_dict()
    with pytest.raises(ValueError, match="checkpoint levels differ"):
        PeriodicGradients(net.named_parameters(), {"0.weight": 3}).load_state_dict(state)
    with pytest.raises(ValueError, match="reduce"):
        PeriodicGradients(net.named_parameters(), {"0.weight": 2}, reduce="sum").load_state_dict(state)


def test_import_deepopt_and_periodic_gradients_without_lightning():
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None\n"
            "import deepopt, deepopt.lightning\n"
            "from deepopt.lightning import PeriodicGradients\n"
            "try:\n    deepopt.lightning.MultiTimescale\nexcept ModuleNotFoundError as e:\n"
            "    assert 'deepopt-nl[lightning]' in str(e)\nelse:\n    raise SystemExit('no error')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
