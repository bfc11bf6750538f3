"""deepopt.functional: the same update as the classes, under vmap and grad."""

import pytest
import torch
from torch.func import grad, vmap

import deepopt
from deepopt import functional as F
from deepopt.levels import DiagonalPreconditioner, Momentum, NewtonSchulz

NAMES = ["MomentumMemory", "AdamMemory", "MuonMemory", "PreconditionedMomentum", "DeltaMomentum",
         "DeepMomentum", "DeepMomentum(precondition)", "M3"]
KW = {
    "MomentumMemory": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "AdamMemory": dict(lr=0.01, weight_decay=0.1),
    "MuonMemory": dict(lr=0.02, fallback_lr_ratio=0.5, ns_dtype=None),
    "PreconditionedMomentum": dict(lr=0.01, precond_period=3, weight_decay=0.01),
    "DeltaMomentum": dict(lr=0.05, delta=0.7, weight_decay=0.01),
    "DeepMomentum": dict(lr=0.05, inner_lr=0.3, weight_decay=0.01),
    "DeepMomentum(precondition)": dict(lr=0.01, inner_lr=0.3, weight_decay=0.01, precondition=True, beta2=0.99),
    "M3": dict(lr=0.01, frequency=3, weight_decay=0.01, ns_dtype=None),
}
def cls_name(name):
    """The optimizer of a case ("DeepMomentum(precondition)": DeepMomentum with the case's arguments)."""
    return name.split("(")[0]


SHAPES = {"w": (5, 3), "b": (7,), "conv": (4, 2, 3), "s": ()}


def _init(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()}


@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize("name", NAMES)
def test_functional_update_equals_class_step(name, impl):
    init = _init()
    ps = [v.clone().requires_grad_() for v in init.values()]
    opt = deepopt.OPTIMIZERS[cls_name(name)](ps, impl=impl, **KW[name])
    tx = F.make(cls_name(name), **KW[name])
    params, state = dict(init), tx.init(init)
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        grads = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in init.items()}
        for p, gr in zip(ps, grads.values()):
            p.grad = gr.clone()
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = F.apply_updates(params, updates)
    for p, k in zip(ps, init):
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-12, atol=1e-12)
        assert set(state[k]) == set(opt.state[p])
        for key, v in state[k].items():
            torch.testing.assert_close(v, opt.state[p][key], rtol=1e-12, atol=1e-12)


def _run(tx, w0, steps=6):
    """K steps on a loss whose gradients come from torch.func.grad; pure in w0 and in tx's tensors."""
    target = torch.linspace(-1, 1, w0["w"].numel(), dtype=w0["w"].dtype).reshape(w0["w"].shape)
    def loss(p):
        return ((p["w"] - target) ** 2).sum() + (p["b"] ** 2).sum() + p["w"].sum() * p["b"].sum()
    params, state = dict(w0), tx.init(w0)
    for _ in range(steps):
        updates, state = tx.update(grad(loss)(params), state, params)
        params = F.apply_updates(params, updates)
    return params, loss(params)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_four_seeds_equals_four_runs(name):
    tx = F.make(cls_name(name), **KW[name])
    seeds = [{"w": torch.randn(4, 6, dtype=torch.float64), "b": torch.randn(6, dtype=torch.float64)} for _ in range(4)]
    stacked = {k: torch.stack([s[k] for s in seeds]) for k in seeds[0]}
    batched, _ = vmap(lambda w0: _run(tx, w0))(stacked)
    for i, s in enumerate(seeds):
        single, _ = _run(tx, s)
        for k in single:
            torch.testing.assert_close(batched[k][i], single[k], rtol=1e-10, atol=1e-10)


def test_vmap_over_states_made_outside():
    """States from a vmapped init can be passed back in (the step counter is unwrapped)."""
    tx = F.adam_memory(lr=0.1)
    params = {"w": torch.randn(4, 3, dtype=torch.float64)}
    grads = {"w": torch.randn(4, 3, dtype=torch.float64)}
    state = vmap(tx.init)(params)
    for _ in range(3):
        updates, state = vmap(tx.update)(grads, state, params)
    for i in range(4):
        p, s = {"w": params["w"][i]}, tx.init({"w": params["w"][i]})
        for _ in range(3):
            u, s = tx.update({"w": grads["w"][i]}, s, p)
        torch.testing.assert_close(updates["w"][i], u["w"])


def test_grad_wrt_initial_params_and_hyperparameters_matches_finite_differences():
    w0 = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}

    def final_loss(w, b, lr, momentum):
        tx = F.momentum_memory(lr=lr, momentum=momentum, nesterov=True)
        return _run(tx, {"w": w, "b": b})[1]

    inputs = (w0["w"].requires_grad_(), w0["b"].requires_grad_(),
              torch.tensor(0.05, dtype=torch.float64, requires_grad=True),
              torch.tensor(0.8, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(final_loss, inputs)
    g = grad(final_loss, argnums=(0, 2))(*[x.detach() for x in inputs])  # torch.func.grad agrees
    ref = torch.autograd.grad(final_loss(*inputs), (inputs[0], inputs[2]))
    torch.testing.assert_close(g, ref)


def test_grad_through_deep_memory_init_matches_finite_differences():
    from deepopt.levels.deep import default_memory_init

    init = {k: v.double() + 0.1 for k, v in default_memory_init(4).items()}

    def final_loss(w1, b1, w2, inner_lr):
        tx = F.deep_momentum(lr=0.05, inner_lr=inner_lr, hidden=4, memory_init={"w1": w1, "b1": b1, "w2": w2})
        return _run(tx, {"w": torch.ones(2, 3, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)})[1]

    inputs = (*[init[k].requires_grad_() for k in ("w1", "b1", "w2")],
              torch.tensor(0.2, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(final_loss, inputs, fast_mode=True)


def test_from_levels_runs_a_slow_level_like_nested_optimizer():
    levels = [DiagonalPreconditioner(period=3), Momentum(0.9, form="ema", period=2), NewtonSchulz(ns_dtype=None)]
    init = _init()
    ps = [v.clone().requires_grad_() for v in init.values()]
    opt = deepopt.NestedOptimizer(ps, levels=levels, lr=0.02, impl="reference")
    tx = F.from_levels(*levels, lr=0.02)
    params, state = dict(init), tx.init(init)
    for _ in range(7):
        grads = {k: torch.randn_like(v) for k, v in init.items()}
        for p, gr in zip(ps, grads.values()):
            p.grad = gr.clone()
        opt.step()
        u, state = tx.update(grads, state, params)
        params = F.apply_updates(params, u)
    for p, k in zip(ps, init):
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-12, atol=1e-12)


def test_dgd_functional_equals_class():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = deepopt.DGD(model, lr=0.1)
    tx = F.dgd(lr=0.1)
    params, state = dict(params0), tx.init(params0)
    for _ in range(4):
        x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        h = torch.tanh(torch.nn.functional.linear(x, params["0.weight"], params["0.bias"]))
        def loss_fn(p):
            hh = torch.tanh(torch.nn.functional.linear(x, p["0.weight"], p["0.bias"]))
            return (torch.nn.functional.linear(hh, p["2.weight"], p["2.bias"]) - y).square().mean()
        grads = grad(loss_fn)(params)
        u, state = tx.update(grads, state, params, inputs={"0.weight": x, "2.weight": h})
        params = F.apply_updates(params, u)
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    for k, v in model.named_parameters():
        torch.testing.assert_close(params[k], v.detach(), rtol=1e-12, atol=1e-12)
    opt.remove_hooks()


def test_lists_and_none_grads():
    tx = F.momentum_memory(lr=0.1)
    params = [torch.ones(2), torch.ones(3)]
    state = tx.init(params)
    updates, state = tx.update([torch.ones(2), None], state, params)
    new = F.apply_updates(params, updates)
    assert isinstance(new, list) and torch.equal(new[1], params[1]) and torch.equal(new[0], torch.full((2,), 0.9))


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="unknown optimizer"):
        F.make("Adamm")
    with pytest.raises(ValueError, match="DGD needs the layer inputs"):
        F.make("DGD")
    with pytest.raises(TypeError, match="no hyperparameter"):
        F.make("AdamMemory", momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        F.momentum_memory(momentum=-1.0)
    tx = F.momentum_memory()
    with pytest.raises(ValueError, match="same keys"):
        tx.update({"a": torch.ones(1)}, tx.init({"b": torch.ones(1)}), {"b": torch.ones(1)})
    with pytest.raises(ValueError, match="need the parameters"):
        tx.update({"a": torch.ones(1)}, tx.init({"a": torch.ones(1)}), None)
    with pytest.raises(TypeError, match="dict of tensors"):
        tx.init(torch.ones(2))


def test_rule_classmethod_builds_what_the_constructor_builds():
    p = [torch.nn.Parameter(torch.randn(3, 3))]
    for name in NAMES:
        opt = deepopt.OPTIMIZERS[cls_name(name)](p, **KW[name])
        rule = deepopt.OPTIMIZERS[cls_name(name)].rule(**KW[name])
        assert [repr(c) for c in rule.chains] == [repr(c) for c in opt.chains]
        assert rule.weight_decay_mode == opt.weight_decay_mode
        group = {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "period")}
        assert set(group) == set(F.make(cls_name(name), **KW[name]).group)


def test_vmap_over_learning_rates_and_decays():
    """A hyperparameter sweep as one vmapped run (hyperparameters as batched tensors)."""
    w0 = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    lrs = torch.tensor([0.01, 0.05, 0.1], dtype=torch.float64)
    mus = torch.tensor([0.0, 0.5, 0.9], dtype=torch.float64)
    swept = vmap(lambda lr, mu: _run(F.deep_momentum(lr=lr, momentum=mu, inner_lr=0.1), w0)[1])(lrs, mus)
    for i in range(3):
        single = _run(F.deep_momentum(lr=float(lrs[i]), momentum=float(mus[i]), inner_lr=0.1), w0)[1]
        torch.testing.assert_close(swept[i], single, rtol=1e-10, atol=1e-12)
