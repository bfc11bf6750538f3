"""torch.optim conventions, to the letter, for every optimizer in deepopt.OPTIMIZERS.

copy/pickle, repeated and old-format ``load_state_dict``, validation order and types, ``maximize``,
the classic counterparts' full signatures, OneCycleLR's momentum cycling, quiet ``torch.compile``
and float16 parameters on CPU.
"""

import copy
import inspect
import logging
import pickle

import pytest
import torch

import deepopt

from .helpers import loss_of, make, tiny_model, train

NAMES = sorted(deepopt.OPTIMIZERS)
#: the momentum-like group key OneCycleLR cycles ("momentum", or "betas" whose first entry it sets)
MOMENTUM_KEY = {"MomentumMemory": "momentum", "AdamMemory": "betas", "MuonMemory": "momentum",
                "PreconditionedMomentum": "momentum", "DeltaMomentum": "momentum", "DeepMomentum": "momentum",
                "M3": "betas"}


def params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def fixed_grads(opt, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(p.shape, generator=g).to(p.dtype) for p in params_of(opt)]


def set_grads(opt, grads):
    for p, g in zip(params_of(opt), grads):
        p.grad = g.clone()


def assert_same_run(a, b):
    """Same parameters and the same state, tensor for tensor (bit-exact)."""
    for p, q in zip(params_of(a), params_of(b)):
        assert torch.equal(p, q), (p - q).abs().max()
        sa, sb = a.state[p], b.state[q]
        assert sorted(sa) == sorted(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype, k


def trained(name, steps=2, **kw):
    model = tiny_model()
    opt = make(name, model, **kw)
    train(model, opt, steps)
    return model, opt


def step_all(pairs, seed):
    """One step of each ``(model, optimizer)`` on the same input (DGD captures it) and gradients."""
    grads = fixed_grads(pairs[0][1], seed)
    for model, opt in pairs:
        loss_of(model, seed)
        set_grads(opt, grads)
        opt.step()


# ------------------------------------------------------------------ 1. copy.deepcopy and pickle
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", NAMES)
def test_copied_optimizer_steps_like_the_original(name, how):
    _, opt = trained(name)
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    for attr in ("impl", "nonfinite", "skipped_steps", "weight_decay_mode"):
        assert getattr(clone, attr) == getattr(opt, attr), attr
    assert sorted(clone.defaults) == sorted(opt.defaults)
    assert [type(c) for c in clone.chains] == [type(c) for c in opt.chains]
    if name == "DeepMomentum":
        assert clone.memory is clone.chains[0].levels[0]
    for _ in range(2):
        grads = fixed_grads(opt, 7)
        set_grads(opt, grads)
        set_grads(clone, grads)
        opt.step()
        clone.step()
        assert_same_run(opt, clone)


def test_dgd_deep_copied_with_its_model_keeps_capturing_inputs():
    model, opt = trained("DGD")
    pair = copy.deepcopy({"model": model, "opt": opt})
    train(model, opt, 2, start=2)
    train(pair["model"], pair["opt"], 2, start=2)  # the copied hooks feed the copied optimizer
    assert_same_run(opt, pair["opt"])


# ------------------------------------------------------------------ 2, 3. load_state_dict
@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_twice_and_numeric_step(name):
    model, ref = trained(name)
    sd = copy.deepcopy(ref.state_dict())
    twice_model, numeric_model = copy.deepcopy(model), copy.deepcopy(model)
    twice = make(name, twice_model)
    twice.load_state_dict(sd)
    twice.load_state_dict(sd)  # torch's __setstate__ added "differentiable" to defaults after the first
    old = copy.deepcopy(sd)  # a checkpoint of older torch: per-parameter step as a plain number
    for s in old["state"].values():
        s["step"] = float(s["step"])
    numeric = make(name, numeric_model)
    numeric.load_state_dict(old)
    assert all(isinstance(s["step"], torch.Tensor) and s["step"].dtype == torch.float32
               for s in numeric.state.values())
    for seed in range(2):
        step_all([(model, ref), (twice_model, twice), (numeric_model, numeric)], seed)
    assert_same_run(ref, twice)
    assert_same_run(ref, numeric)


@pytest.mark.parametrize("name", ["AdamMemory", "M3"])
def test_checkpoint_without_newer_group_keys_loads(name):
    _, ref = trained(name)
    sd = copy.deepcopy(ref.state_dict())
    new_keys = {"AdamMemory": ("amsgrad",), "M3": ("betas",)}[name]
    for g in sd["param_groups"]:  # written before these keys existed
        for k in ("maximize", "foreach", "capturable", "differentiable", "fused", *new_keys):
            g.pop(k)
    _, opt = trained(name, steps=1)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["maximize"] is False
    assert opt.param_groups[0]["betas"] == ref.param_groups[0]["betas"]


# ------------------------------------------------------------------ 4. validation order and types
def build(name, params, **kw):
    cls = deepopt.OPTIMIZERS[name]
    return cls(params, model=tiny_model(), **kw) if name == "DGD" else cls(params, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_are_checked_before_params_like_torch(name):
    for torch_cls in (torch.optim.AdamW, torch.optim.SGD):  # what torch raises, params=None or not
        with pytest.raises(ValueError, match="1-element"):
            torch_cls(None, lr=torch.tensor([1.0, 2.0]))
        with pytest.raises(TypeError):
            torch_cls(None, lr="1e-3")
    with pytest.raises(ValueError, match="lr.*1-element"):
        build(name, None, lr=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="lr"):
        build(name, None, lr="1e-3")
    with pytest.raises(TypeError, match="lr"):
        build(name, [torch.nn.Parameter(torch.ones(2, 2))], lr="1e-3")
    with pytest.raises(ValueError, match="lr"):
        build(name, None, lr=-1.0)
    with pytest.raises(TypeError, match="weight_decay"):
        build(name, None, weight_decay="0.1")
    opt = build(name, [torch.nn.Parameter(torch.ones(2, 2))], lr=torch.tensor(0.01))
    assert torch.is_tensor(opt.param_groups[0]["lr"])


@pytest.mark.parametrize("kw", [dict(eps="1e-8"), dict(betas=("0.9", 0.999))])
def test_other_hyperparameter_types(kw):
    with pytest.raises(TypeError, match=next(iter(kw))):
        deepopt.AdamMemory([torch.nn.Parameter(torch.ones(2))], **kw)


# ------------------------------------------------------------------ 5. maximize
@pytest.mark.parametrize("name", NAMES)
def test_maximize_steps_along_plus_g_and_leaves_grads(name):
    up, down = tiny_model(), tiny_model()
    oa, ob = make(name, up, maximize=True), make(name, down)
    assert oa.param_groups[0]["maximize"] is True and ob.param_groups[0]["maximize"] is False
    for s in range(3):
        for m in (up, down):
            loss_of(m, s).backward()  # DGD captures its inputs
        grads = fixed_grads(oa, s)
        set_grads(oa, grads)
        set_grads(ob, [-g for g in grads])
        oa.step()
        ob.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params_of(oa), grads))
    assert_same_run(oa, ob)


def run_pair(make_a, make_b, shapes, steps=6, negate_b=False):
    torch.manual_seed(0)
    init = [torch.randn(s) for s in shapes]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa, ob = make_a(a), make_b(b)
    for _ in range(steps):
        grads = [torch.randn_like(p) for p in init]
        for p, g in zip(a, grads):
            p.grad = g.clone()
        for p, g in zip(b, grads):
            p.grad = -g if negate_b else g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


SHAPES = [(5, 3), (7,), (4, 9)]


@pytest.mark.parametrize("impl", ["foreach", "reference"])
def test_maximize_equals_the_counterparts(impl):
    run_pair(lambda p: torch.optim.AdamW(p, lr=0.01, maximize=True),
             lambda p: deepopt.AdamMemory(p, lr=0.01, maximize=True, impl=impl), SHAPES)
    run_pair(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1, maximize=True),
             lambda p: deepopt.MomentumMemory(p, lr=0.1, momentum=0.9, weight_decay=0.1, maximize=True,
                                              impl=impl), SHAPES)
    # torch's Muon has no maximize: MuonMemory(maximize=True) on g is torch's Muon on -g
    run_pair(lambda p: deepopt.MuonMemory(p, lr=0.02, maximize=True, impl=impl, ns_method="standard"),
             lambda p: torch.optim.Muon(p, lr=0.02),
             [(5, 3), (4, 9)], negate_b=True)


def test_functional_form_honours_maximize():
    from deepopt import functional as F

    params = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    up, down = F.make("MuonMemory", lr=0.02, maximize=True), F.make("MuonMemory", lr=0.02)
    u, _ = up.update(grads, up.init(params), params)
    d, _ = down.update({k: -g for k, g in grads.items()}, down.init(params), params)
    assert all(torch.equal(u[k], d[k]) for k in params)
    with pytest.raises(ValueError, match="fused"):
        F.make("AdamMemory", fused=True)


# ------------------------------------------------------------------ 6. counterparts' full signatures
COUNTERPARTS = [(torch.optim.AdamW, "AdamMemory"), (torch.optim.SGD, "MomentumMemory"), (torch.optim.Muon, "MuonMemory")]


@pytest.mark.parametrize("torch_cls,name", COUNTERPARTS)
def test_counterpart_signature_is_accepted_in_order(torch_cls, name):
    ours = inspect.signature(deepopt.OPTIMIZERS[name]).parameters
    theirs = inspect.signature(torch_cls).parameters
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
    positional = [n for n, p in theirs.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert list(ours)[:len(positional)] == positional  # a positional call means the same
    kw = {n: p.default for n, p in theirs.items() if n != "params"}
    build(name, [torch.nn.Parameter(torch.ones(3, 3))], **kw)  # torch's defaults, spelled out


@pytest.mark.parametrize("foreach", [True, False])
def test_counterpart_arguments_are_honoured_exactly(foreach):
    run_pair(lambda p: torch.optim.AdamW(p, 0.01, (0.8, 0.99), 1e-6, 0.1, True, foreach=foreach),
             lambda p: deepopt.AdamMemory(p, 0.01, (0.8, 0.99), 1e-6, 0.1, True, foreach=foreach), SHAPES)
    run_pair(lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True, maximize=True, foreach=foreach),
             lambda p: deepopt.AdamMemory(p, lr=0.01, amsgrad=True, maximize=True, foreach=foreach), SHAPES)
    run_pair(lambda p: torch.optim.SGD(p, 0.1, 0.5, 0.3, 0.01, foreach=foreach),
             lambda p: deepopt.MomentumMemory(p, 0.1, 0.5, 0.3, 0.01, foreach=foreach), SHAPES)
    run_pair(lambda p: torch.optim.SGD(p, 0.1, 0.9, 0.0, 0.01, True, foreach=foreach),
             lambda p: deepopt.MomentumMemory(p, 0.1, 0.9, 0.0, 0.01, True, foreach=foreach), SHAPES)
    run_pair(lambda p: torch.optim.Muon(p, 0.02, 0.05, 0.9, False, eps=1e-6, ns_steps=3, adjust_lr_fn="original"),
             lambda p: deepopt.MuonMemory(p, 0.02, 0.05, 0.9, False, eps=1e-6, ns_steps=3, adjust_lr_fn="original",
                                          ns_method="standard"),
             [(5, 3), (4, 9)])


@pytest.mark.parametrize("name,arg", [("AdamMemory", "fused"), ("AdamMemory", "capturable"),
                                      ("AdamMemory", "differentiable"), ("MomentumMemory", "fused"),
                                      ("MomentumMemory", "differentiable")])
def test_unsupported_counterpart_values_raise_naming_the_argument(name, arg):
    p = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError, match=rf"{arg}=True is not supported.*use {arg}="):
        build(name, p, **{arg: True})
    with pytest.raises(ValueError, match=f"{arg}=True"):  # also as a param-group value
        build(name, [{"params": p, arg: True}])
    build(name, p, **{arg: False})


def test_foreach_and_impl_conflict():
    with pytest.raises(ValueError, match="foreach.*impl"):
        deepopt.AdamMemory([torch.nn.Parameter(torch.ones(3))], foreach=True, impl="reference")


# ------------------------------------------------------------------ 7. OneCycleLR(cycle_momentum=True)
@pytest.mark.parametrize("name", NAMES)
def test_one_cycle_lr_cycles_the_momentum_the_step_reads(name):
    model, opt = trained(name)
    if name not in MOMENTUM_KEY:  # no momentum-like hyperparameter: torch's own clear error
        with pytest.raises(ValueError, match="momentum"):
            torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=4)
        return
    key = MOMENTUM_KEY[name]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=6, cycle_momentum=True)
    seen = set()
    for s in range(4):
        train(model, opt, 1, start=s)
        sched.step()
        value = opt.param_groups[0][key]
        seen.add(value[0] if key == "betas" else value)
    assert len(seen) > 1  # the scheduler moved it
    other = copy.deepcopy(opt)  # the step reads it: a different value gives a different step
    value = other.param_groups[0][key]
    other.param_groups[0][key] = (0.5, *value[1:]) if key == "betas" else 0.5
    grads = fixed_grads(opt, 11)
    set_grads(opt, grads)
    set_grads(other, grads)
    opt.step()
    other.step()
    assert any(not torch.equal(p, q) for p, q in zip(params_of(opt), params_of(other)))


# ------------------------------------------------------------------ 9. torch.compile, quietly
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_prints_no_graph_break_warning(name):
    torch._dynamo.reset()
    from torch._dynamo.variables.tensor import TensorVariable  # its warning is printed once per process

    TensorVariable._warn_capture_scalar_outputs.cache_clear()
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("torch", "torch._dynamo")]  # the latter does not propagate
    for logger in loggers:
        logger.addHandler(records)
    try:
        model, eager = tiny_model(), tiny_model()
        opt, opt_eager = make(name, model), make(name, eager)
        step = torch.compile(opt.step, backend="eager")
        for s in range(2):
            for m, o in ((model, opt), (eager, opt_eager)):
                o.zero_grad()
                loss_of(m, s).backward()
            step()
            opt_eager.step()
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    assert not [m for m in records.messages if "Graph break" in m], records.messages
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q)


def test_compiled_step_still_skips_nonfinite_gradients():
    model = tiny_model()
    opt = make("AdamMemory", model)
    step = torch.compile(opt.step, backend="eager")
    train(model, opt, 1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_of(model, 1).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# ------------------------------------------------------------------ 8. float16 on CPU, state_dtype
def rounded_reference_run(name, dtype, steps=3, **group):
    """The low-precision run (float32 state) against a float32 run whose parameters are rounded to
    ``dtype`` after every step: the same numbers, when the step is computed in float32."""
    low, ref = tiny_model(dtype=dtype), tiny_model(dtype=dtype).float()
    ol = make(name, low, params=[{"params": list(low.parameters()), **group}])
    orf = make(name, ref)
    for s in range(steps):
        x = torch.randn(16, 5, generator=torch.Generator().manual_seed(s)).to(dtype)
        low(x).float().square().mean().backward()
        ref(x.float()).square().mean().backward()  # DGD captures the same inputs, upcast
        if name == "DGD":  # deeper layers' inputs differ in float16: give both the same ones
            orf._inputs.update({q: ol._inputs[p].float() for p, q in zip(low.parameters(), ref.parameters())
                                if p in ol._inputs})
        grads = fixed_grads(ol, s, scale=1e-3)
        set_grads(ol, grads)
        set_grads(orf, [g.float() for g in grads])
        ol.step()
        orf.step()
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(p.to(dtype))
    return ol, low, ref


@pytest.mark.parametrize("name", NAMES)
def test_float16_parameters_on_cpu_step_finitely_with_float32_state(name):
    opt, low, ref = rounded_reference_run(name, torch.float16)
    assert all(p.dtype == torch.float16 and p.isfinite().all() for p in low.parameters())
    for p, q in zip(low.parameters(), ref.parameters()):
        assert torch.equal(p, q.half()), name
    floats = [v for s in opt.state.values() for k, v in s.items() if k != "step" and v.is_floating_point()]
    assert (floats or name == "DGD") and all(v.dtype == torch.float32 for v in floats)  # DGD is stateless


@pytest.mark.parametrize("name", ["AdamMemory", "MomentumMemory", "M3"])
def test_state_dtype_is_honoured_on_cpu(name):
    opt, low, ref = rounded_reference_run(name, torch.bfloat16, state_dtype=torch.float32)
    for p, q in zip(low.parameters(), ref.parameters()):
        assert torch.equal(p, q.bfloat16())
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values())
    resumed = make(name, tiny_model(dtype=torch.bfloat16), params=None)
    resumed.load_state_dict(opt.state_dict())  # torch would cast the state to bfloat16; it stays float32
    assert all(v.dtype == torch.float32 for s in resumed.state.values() for v in s.values())
    with pytest.raises(ValueError, match="state_dtype"):
        make(name, tiny_model(), params=[{"params": list(tiny_model().parameters()), "state_dtype": torch.bfloat16}])
