"""Exact equality with the classic counterparts, and the documented reductions."""

import pytest
import torch

import deepopt
from deepopt.levels import AdamMoments

from .helpers import feed

DTYPES = [torch.float32, torch.float64]
IMPLS = ["foreach", "reference"]
SHAPES = [(5, 3), (7,), (4, 9), (1,)]


def run_pair(make_a, make_b, steps=25, shapes=SHAPES, dtype=torch.float32, groups=False, seed=0):
    """Feed identical gradients to two optimizers over the same initial parameters."""
    torch.manual_seed(seed)
    init = [torch.randn(s, dtype=dtype) for s in shapes]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    if groups:  # two param groups with different learning rates
        pa = [{"params": a[:2]}, {"params": a[2:], "lr": 0.03}]
        pb = [{"params": b[:2]}, {"params": b[2:], "lr": 0.03}]
    else:
        pa, pb = a, b
    oa, ob = make_a(pa), make_b(pb)
    for _ in range(steps):
        feed(a, b, [torch.randn_like(p) for p in init])
        oa.step()
        ob.step()
    return a, b


def assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


MOMENTUM_KW = [
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True, weight_decay=0.1),
    dict(momentum=0.5, dampening=0.3, weight_decay=0.01),
    dict(momentum=0.9, maximize=True, weight_decay=0.01),
    dict(momentum=0.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw", MOMENTUM_KW)
@pytest.mark.parametrize("groups", [False, True])
def test_momentum_memory_equals_sgd(dtype, impl, kw, groups):
    a, b = run_pair(lambda p: torch.optim.SGD(p, lr=0.1, **kw),
                    lambda p: deepopt.MomentumMemory(p, lr=0.1, impl=impl, **kw), dtype=dtype, groups=groups)
    assert_same(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6), dict(weight_decay=0.0)])
@pytest.mark.parametrize("groups", [False, True])
def test_adam_memory_equals_adamw(dtype, impl, kw, groups):
    a, b = run_pair(lambda p: torch.optim.AdamW(p, lr=0.01, **kw),
                    lambda p: deepopt.AdamMemory(p, lr=0.01, impl=impl, **kw), dtype=dtype, groups=groups)
    assert_same(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw", [
    dict(),
    dict(nesterov=False, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
    dict(momentum=0.9, ns_steps=3, weight_decay=0.05, adjust_lr_fn="original"),
])
@pytest.mark.parametrize("groups", [False, True])
def test_muon_memory_equals_torch_muon_on_matrices(dtype, impl, kw, groups):
    shapes = [(5, 3), (7, 9), (4, 4), (2, 11)]
    a, b = run_pair(lambda p: torch.optim.Muon(p, lr=0.02, **kw),
                    lambda p: deepopt.MuonMemory(p, lr=0.02, impl=impl, ns_method="standard", **kw), shapes=shapes,
                    dtype=dtype,
                    groups=groups)
    assert_same(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_muon_memory_fallback_is_adamw_on_vectors(impl):
    shapes = [(7,), (3,)]
    a, b = run_pair(lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1),
                    lambda p: deepopt.MuonMemory(p, lr=0.01, impl=impl), shapes=shapes)
    assert_same(a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_delta_momentum_with_zero_delta_is_sgd(impl, nesterov):
    a, b = run_pair(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01),
                    lambda p: deepopt.DeltaMomentum(p, lr=0.1, momentum=0.9, delta=0.0, nesterov=nesterov,
                                                    weight_decay=0.01, impl=impl))
    assert_same(a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_deep_momentum_with_zero_inner_lr_is_sgd(impl, dtype):
    a, b = run_pair(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
                    lambda p: deepopt.DeepMomentum(p, lr=0.1, momentum=0.9, inner_lr=0.0, weight_decay=0.01,
                                                   impl=impl), dtype=dtype)
    assert_same(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_preconditioned_deep_momentum_with_zero_inner_lr_is_preconditioned_momentum(impl):
    # (weight decay differs: coupled in DeepMomentum, as SGD; decoupled in PreconditionedMomentum)
    a, b = run_pair(lambda p: deepopt.PreconditionedMomentum(p, lr=0.01, momentum=0.9, beta2=0.99, eps=1e-6,
                                                             impl=impl),
                    lambda p: deepopt.DeepMomentum(p, lr=0.01, momentum=0.9, inner_lr=0.0, precondition=True,
                                                   beta2=0.99, eps=1e-6, impl=impl))
    assert_same(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_m3_one_level_identity_is_adamw(impl):
    def m3(p):
        opt = deepopt.M3(p, lr=0.01, momenta=[(0.9, 1, 1.0)], betas=(0.9, 0.999, 0.0), weight_decay=0.1,
                         target_rms=None, impl=impl)
        for g in opt.param_groups:
            g["orthogonalize"] = False
        return opt
    a, b = run_pair(lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), m3)
    assert_same(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_m3_literal_one_level_is_accumulating_adam_memory(impl):
    def m3(p):
        opt = deepopt.M3(p, lr=0.01, momenta=[(0.9, 1, 1.0)], betas=(0.9, 0.999, 0.0), form="literal", impl=impl)
        for g in opt.param_groups:
            g["orthogonalize"] = False
        return opt
    a, b = run_pair(lambda p: deepopt.AdamMemory(p, lr=0.01, form="accumulate", weight_decay=0.0), m3)
    assert_same(a, b)


def test_adam_memory_accumulate_is_paper_literal():
    p = torch.zeros(3, requires_grad=True)
    opt = deepopt.AdamMemory([p], lr=0.1, betas=(0.5, 0.25), eps=0.0, weight_decay=0.0, form="accumulate")
    gs = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([2.0, 1.0, -1.0])]
    m, h, w = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    for g in gs:
        p.grad = g
        opt.step()
        m, h = m + 0.5 * g, h + 0.25 * g * g
        w = w - 0.1 * m / h.sqrt()
    torch.testing.assert_close(p.detach(), w)


def test_preconditioned_momentum_matches_hand_computation():
    p = torch.zeros(2, requires_grad=True)
    opt = deepopt.PreconditionedMomentum([p], lr=0.1, momentum=0.5, beta2=0.9, eps=0.0, precond_period=2)
    gs = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0]), torch.tensor([-1.0, 2.0]), torch.tensor([2.0, 2.0])]
    v, m, w, acc, writes = torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), 0
    for t, g in enumerate(gs, start=1):
        p.grad = g
        opt.step()
        acc = acc + g * g
        if (t - 1) % 2 == 0:  # written at t = 1, 3, 5, ... with the chunk's mean of g^2
            n = 1 if t == 1 else 2
            v, acc, writes = 0.9 * v + 0.1 * acc / n, torch.zeros(2), writes + 1
        pg = g / (v / (1 - 0.9**writes)).sqrt()
        m = pg if t == 1 else 0.5 * m + pg
        w = w - 0.1 * m
    torch.testing.assert_close(p.detach(), w)


def test_adam_moments_level_reads_exact_first_step():
    lvl = AdamMoments()
    group = dict(lvl.defaults)
    p = torch.zeros(2)
    s = lvl.write(lvl.init(p, group), torch.tensor([3.0, -0.5]), p, group, 1)
    torch.testing.assert_close(lvl.read(s, None, p, group, 1).materialize(), torch.tensor([1.0, -1.0]))
