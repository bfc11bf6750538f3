"""Property-based checks (hypothesis): exactness and path agreement hold for any shapes and settings."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepopt

shapes = st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)
unit = st.floats(0.0, 0.99)


def _pair(shapes_, make_a, make_b, steps=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes_]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa, ob = make_a(a), make_b(b)
    for _ in range(steps):
        for x, y in zip(a, b):
            grad = torch.randn(x.shape, generator=g, dtype=dtype)
            x.grad, y.grad = grad.clone(), grad.clone()
        oa.step()
        ob.step()
    return a, b


@settings(max_examples=25, deadline=None)
@given(shapes, unit, st.floats(0.0, 0.5), st.booleans(), st.floats(0.0, 0.1))
def test_momentum_memory_is_sgd_for_any_shapes(shapes_, momentum, dampening, nesterov, wd):
    if nesterov and (momentum == 0 or dampening != 0):
        dampening, momentum = 0.0, max(momentum, 0.1)
    kw = dict(lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd)
    a, b = _pair(shapes_, lambda p: torch.optim.SGD(p, **kw), lambda p: deepopt.MomentumMemory(p, **kw))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@settings(max_examples=25, deadline=None)
@given(shapes, unit, unit, st.floats(0.0, 0.1))
def test_adam_memory_is_adamw_for_any_shapes(shapes_, b1, b2, wd):
    kw = dict(lr=0.01, betas=(b1, b2), weight_decay=wd)
    a, b = _pair(shapes_, lambda p: torch.optim.AdamW(p, **kw), lambda p: deepopt.AdamMemory(p, **kw))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@settings(max_examples=20, deadline=None)
@given(shapes, unit, st.floats(0.0, 1.0), st.sampled_from(["DeltaMomentum", "M3", "PreconditionedMomentum"]))
def test_foreach_equals_reference_for_any_shapes(shapes_, momentum, delta, name):
    kw = {"DeltaMomentum": dict(momentum=momentum, delta=delta), "M3": dict(alpha=delta, frequency=2),
          "PreconditionedMomentum": dict(momentum=momentum, precond_period=2)}[name]
    cls = deepopt.OPTIMIZERS[name]
    a, b = _pair(shapes_, lambda p: cls(p, lr=0.01, impl="foreach", **kw),
                 lambda p: cls(p, lr=0.01, impl="reference", **kw))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
