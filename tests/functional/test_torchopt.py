"""torchopt interop: a deepopt optimizer as a torchopt GradientTransformation."""

import pytest
import torch

from deepopt import functional as F

torchopt = pytest.importorskip("torchopt", reason="the optional 'meta' extra (torchopt) is not installed")


def test_metaoptimizer_meta_step_differentiates_through_deep_momentum():
    """MAML-style: inner steps with torchopt.MetaOptimizer, a meta-gradient for the network's init
    and for a learnable inner step size of the memory."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    inner_lr = torch.tensor(0.1, requires_grad=True)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    snapshot = torchopt.extract_state_dict(net)
    inner = torchopt.MetaOptimizer(net, F.as_torchopt("DeepMomentum", lr=0.1, inner_lr=inner_lr))
    for _ in range(3):
        inner.step((net(x) - y).square().mean())
    meta_loss = (net(x) - y).square().mean()
    meta_loss.backward()
    torchopt.recover_state_dict(net, snapshot)
    assert inner_lr.grad is not None and inner_lr.grad.abs() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_torchopt_functional_loop_equals_deepopt_functional():
    params = (torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64))
    tx = F.as_torchopt("M3", lr=0.01, frequency=2, ns_dtype=None)
    ours = F.m3(lr=0.01, frequency=2, ns_dtype=None)
    a, b = params, list(params)
    sa, sb = tx.init(a), ours.init(b)
    for _ in range(5):
        grads = tuple(torch.randn_like(p) for p in params)
        ua, sa = tx.update(grads, sa, params=a, inplace=False)
        a = torchopt.apply_updates(a, ua, inplace=False)
        ub, sb = ours.update(list(grads), sb, b)
        b = F.apply_updates(b, ub)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_chain_with_torchopt_transformations():
    """A deepopt transformation composes with torchopt's own (here: gradient clipping first)."""
    tx = torchopt.chain(torchopt.clip_grad_norm(1.0), F.as_torchopt("AdamMemory", lr=0.1, weight_decay=0.0))
    params = (torch.zeros(3),)
    state = tx.init(params)
    updates, state = tx.update((torch.tensor([100.0, 0.0, 0.0]),), state, params=params, inplace=False)
    torch.testing.assert_close(updates[0], torch.tensor([-0.1, 0.0, 0.0]))


def test_update_needs_params():
    tx = F.as_torchopt("MomentumMemory", lr=0.1)
    params = (torch.zeros(2),)
    with pytest.raises(ValueError, match="need the parameters"):
        tx.update((torch.ones(2),), tx.init(params))
