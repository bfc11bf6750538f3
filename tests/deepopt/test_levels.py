"""Level-level properties: Newton-Schulz quality, delta forgetting, deep memory learning, docs."""

import doctest
import importlib
import pkgutil

import pytest
import torch

import deepopt
from deepopt.levels import DeltaMomentumLevel, Momentum, newton_schulz
from deepopt.levels.orthogonal import adjust_lr_ratio
from deepopt.levels.deep import DeepMemory

from ..example_imports import skip_if_examples_need_missing


def orthogonality_error(o):
    o = o.double()
    small = o @ o.T if o.shape[0] <= o.shape[1] else o.T @ o
    return (small - torch.eye(small.shape[0], dtype=torch.float64)).norm() / small.shape[0] ** 0.5


@pytest.mark.parametrize("shape", [(16, 16), (8, 40), (40, 8), (3, 63)])
def test_newton_schulz_matches_torch_muon_and_is_near_orthogonal(shape):
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.randn(shape)
    ours = newton_schulz(g)
    theirs = _zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    assert torch.equal(ours, theirs)
    assert orthogonality_error(newton_schulz(g, dtype=torch.float32)) < 0.35


def test_batched_newton_schulz_equals_one_by_one():
    g = torch.randn(4, 6, 10, dtype=torch.float64)
    batched = newton_schulz(g, dtype=None)
    single = torch.stack([newton_schulz(m, dtype=None) for m in g])
    torch.testing.assert_close(batched, single)


def test_delta_momentum_forgets_along_the_gradient_of_a_vector():
    lvl = DeltaMomentumLevel(momentum=1.0, delta=1.0)
    group = dict(lvl.defaults)
    p = torch.zeros(3, dtype=torch.float64)
    state = {"momentum_buffer": torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)}
    g = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    new = lvl.write(state, g, p, group, t=2)
    # full forgetting along e2, then g is written: [1, 2, 0] -> [1, 0, 0] + g
    torch.testing.assert_close(new["momentum_buffer"], torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))


def test_delta_momentum_matrix_decay_is_bounded():
    lvl = DeltaMomentumLevel(momentum=0.9, delta=1.0)
    group = dict(lvl.defaults)
    p = torch.zeros(6, 5, dtype=torch.float64)
    state = lvl.init(p, group)
    for t in range(1, 200):
        state = lvl.write(state, torch.randn(6, 5, dtype=torch.float64), p, group, t)
    assert state["momentum_buffer"].norm() < 10 * 30 ** 0.5  # a geometric sum of unit-scale gradients


def test_deep_memory_is_a_real_network_that_learns():
    lvl = DeepMemory(momentum=0.9, inner_lr=0.5, hidden=4)
    group = dict(lvl.defaults)
    p = torch.zeros(50)
    state = lvl.init(p, group)
    for t in range(1, 20):
        state = lvl.write(state, torch.randn(50) * 1e-3 + 1e-3, p, group, t)
    assert state["w2"].abs().sum() > 0  # the MLP's output layer has learned
    assert not torch.equal(state["w1"], lvl.memory_init["w1"])  # and so have its features
    read = lvl.read(state, torch.ones(50) * 1e-3, p, group, 20).num
    assert not torch.allclose(read, state["bias"])  # and it changes the read-out


@pytest.mark.parametrize("sigma", ["identity", "sign", "rms", "ns"])
def test_deep_momentum_sigmas(sigma):
    model = torch.nn.Linear(6, 4)
    opt = deepopt.DeepMomentum(model.parameters(), lr=0.01, sigma=sigma)
    model(torch.randn(3, 6)).square().sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    step = (before - model.weight.detach()) / 0.01
    if sigma == "sign":
        assert set(step.abs().round(decimals=4).unique().tolist()) <= {0.0, 1.0}
    if sigma == "ns":
        assert orthogonality_error(step / step.norm() * 2) < 1.0
    if sigma == "rms":  # a step of RMS lr per tensor
        torch.testing.assert_close(step.square().mean().sqrt(), torch.tensor(1.0), rtol=1e-4, atol=0)


def test_straight_through_sign_keeps_the_step_and_passes_the_gradient():
    from deepopt.levels.deep import straight_through_sign

    lvl = DeepMemory(hidden=4)
    group = dict(lvl.defaults, sigma="sign")
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(20, dtype=torch.float64)
    plain = lvl._sigma(x, x, group).num
    assert torch.autograd.grad((plain * weights).sum(), x, allow_unused=True)[0].abs().sum() == 0  # sign's own
    with straight_through_sign():
        with straight_through_sign():  # nested: restored to the outer block's setting, not off
            pass
        through = lvl._sigma(x, x, group).num
    assert torch.equal(through, plain)  # the same step, bit for bit
    assert torch.equal(torch.autograd.grad((through * weights).sum(), x)[0], weights)  # the identity's gradient
    assert torch.equal(lvl._sigma(x, x, group).num, plain)  # off again after the block
    assert lvl._sigma(x, x, group).num.grad_fn is not None and "SignBackward" in type(
        lvl._sigma(x, x, group).num.grad_fn).__name__


def test_momentum_level_rejects_unknown_form():
    with pytest.raises(ValueError, match="form"):
        Momentum(form="adam")


def test_chain_rejects_conflicting_hyperparameters():
    with pytest.raises(ValueError, match="momentum"):
        deepopt.Chain(Momentum(0.9), DeltaMomentumLevel(momentum=0.5))


def _modules():
    for info in pkgutil.walk_packages(deepopt.__path__, "deepopt."):
        if ".lightning" in info.name or "triton_" in info.name:  # triton_*: kernels, no examples
            continue
        yield info.name


@pytest.mark.parametrize("module", sorted(_modules()))
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    skip_if_examples_need_missing(mod)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def _delta_run(forget_dtype=..., steps=3):
    torch.manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(16, 48)), torch.nn.Parameter(torch.randn(30))]
    kw = {} if forget_dtype is ... else dict(forget_dtype=forget_dtype)
    opt = deepopt.DeltaMomentum(ps, lr=0.01, momentum=0.9, delta=1.0, **kw)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    return [p.detach().clone() for p in ps]


@pytest.mark.parametrize("native", [True, False])
def test_delta_momentum_auto_forget_dtype_takes_bf16_only_where_it_is_native(monkeypatch, native):
    """The default ``forget_dtype="auto"``: bf16 matmuls on a CPU with AVX512-BF16/AMX, the
    parameter's dtype on one without (where bf16 is emulated, ~80x slower than float32)."""
    from deepopt.levels import precision

    monkeypatch.setattr(precision, "_cpu_capabilities", lambda: {"avx512_bf16": native, "amx_bf16": False})
    assert precision.native_bf16_matmul(torch.device("cpu")) is native
    auto = _delta_run()
    ref = _delta_run(torch.bfloat16 if native else None)
    other = _delta_run(None if native else torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(auto, ref))
    assert not torch.equal(auto[0], other[0])


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("impl", ["foreach", "reference"])
def test_deep_momentum_ns_read_out_computes_in_float32_only_where_bf16_is_emulated(monkeypatch, native, impl):
    """sigma="ns": Newton-Schulz in bf16 where bf16 matmuls are native, in float32 on an AVX2 CPU."""
    from deepopt.levels import precision

    monkeypatch.setattr(precision, "_cpu_capabilities", lambda: {"avx512_bf16": native})
    torch.manual_seed(0)
    g = torch.randn(8, 24)
    p = torch.nn.Parameter(torch.zeros(8, 24))
    opt = deepopt.DeepMomentum([p], lr=1.0, inner_lr=0.0, momentum=0.0, sigma="ns", impl=impl)
    p.grad = g.clone()
    opt.step()  # momentum 0 and a silent MLP: the read-out is g, the step -lr adjust NS(g)
    mul = adjust_lr_ratio(p.shape, None)
    ns = {dt: newton_schulz(g, dtype=dt).float() for dt in (torch.bfloat16, torch.float32)}
    want, other = (ns[torch.bfloat16], ns[torch.float32]) if native else (ns[torch.float32], ns[torch.bfloat16])
    torch.testing.assert_close(p.detach(), -mul * want, rtol=1e-6, atol=1e-7)
    assert (p.detach() + mul * other).abs().max() > 1e-3  # the two dtypes are told apart


def test_delta_momentum_rejects_an_unknown_forget_dtype():
    with pytest.raises(ValueError, match="forget_dtype"):
        deepopt.DeltaMomentum([torch.nn.Parameter(torch.ones(2, 2))], forget_dtype="fast")


def test_delta_momentum_bf16_forget_term_stays_within_its_stated_tolerance_of_float32():
    """The forget term in bf16 (float32 accumulation, DeltaMomentum's default) moves the buffer
    by at most about lam 2^-8 ||m|| per step, damped by the decay a: over many steps the drift
    from the float32 step stays below 2^-8 / (1 - a) relative."""
    torch.manual_seed(0)
    shapes = [(16, 48), (16, 48), (40, 24), (30,)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(30)]
    runs = {}
    for dt in (torch.bfloat16, None):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = deepopt.DeltaMomentum(ps, lr=0.01, momentum=0.9, delta=1.0, forget_dtype=dt)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        runs[dt] = ([opt.state[p]["delta.momentum_buffer"] for p in ps], [p.detach() for p in ps])
    (mb, pb), (mf, pf) = runs[torch.bfloat16], runs[None]
    bound = 2.0**-8 / (1 - 0.9)
    for a, b in zip(mb[:3], mf[:3]):
        rel = float((a - b).norm() / b.norm())
        assert 0 < rel < bound  # bf16 was used (not equal) and stayed close
    assert torch.equal(mb[3], mf[3])  # vectors take no matmul: unchanged
    for a, b in zip(pb, pf):
        assert float((a - b).norm()) < bound * 0.01 * 30 * float(mf[0].norm())


@pytest.mark.parametrize("sigma", ["identity", "sign", "rms", "ns"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("chunk", [7, 40])
def test_deep_memory_analytic_foreach_equals_the_autograd_reference(sigma, dtype, tol, chunk, monkeypatch):
    """The one-pass analytic write/read (chunks smaller than the tensors)
    equals the reference's torch.func.grad, with a memory that has learned (w2 != 0): every tensor
    walked alone in several chunks (chunk 7), and the small ones of equal size stacked (chunk 40)."""
    import deepopt.levels.deep.level as deep_level

    monkeypatch.setattr(deep_level, "CHUNK", chunk)
    assert len(deep_level._batches([torch.zeros(6, 5)] * 2)) == (2 if chunk == 7 else 1)
    torch.manual_seed(0)
    shapes = [(6, 5), (6, 5), (4, 3, 2), (11,), ()]
    init = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, dtype=dtype) * (1 + t) for s in shapes] for t in range(6)]
    out = {}
    for impl in ("foreach", "reference"):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = deepopt.DeepMomentum(ps, lr=0.05, inner_lr=0.5, sigma=sigma, hidden=5)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        out[impl] = [p.detach().clone() for p in ps] + [v for p in ps for v in opt.state[p].values()]
    assert float(out["foreach"][len(shapes) + 3].abs().max()) > 0.01  # w2 of the first tensor has learned
    for a, b in zip(out["foreach"], out["reference"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("period", [1, 3])
def test_diagonal_preconditioner_foreach_is_the_reference_bit_for_bit(period):
    """DiagonalPreconditioner's foreach write_/read_ run the reference's operations (float32, equal)."""
    torch.manual_seed(0)
    shapes = [(16, 48), (30,), (5, 3, 2)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(7)]
    runs = []
    for impl in ("foreach", "reference"):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = deepopt.PreconditionedMomentum(ps, lr=0.01, precond_period=period, weight_decay=0.1, impl=impl)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        runs.append([p.detach() for p in ps] + [opt.state[p]["precond.exp_avg_sq"] for p in ps])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
