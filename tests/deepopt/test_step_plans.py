"""What the shell caches between steps, and when it must not reuse it.

* step counters banked as entries of one tensor (:func:`deepopt.levels.base.advance_steps`);
* per-group plans (:meth:`LevelOptimizer._plan`): chains, fused steps, kept across steps and
  rebuilt when the parameters, their dtypes or the group's non-float values change, and dropped by
  ``add_param_group`` and ``load_state_dict``;
* the CPU non-finite check by sums (:func:`deepopt.optim.conventions.nonfinite_flag`).

The references: the same optimizer with every plan dropped before each step (nothing cached), and
with the step counters one tensor each (nothing banked); they must agree bit for bit.
"""

import copy
import io

import pytest
import torch

import deepopt
import deepopt.levels.fused as K
from deepopt.levels.base import advance_steps
from deepopt.optim.conventions import nonfinite_flag

REAL = K.fused_step_for
NAMES = ["MomentumMemory", "AdamMemory", "PreconditionedMomentum", "DeltaMomentum", "DeepMomentum", "MuonMemory"]
KW = {"MomentumMemory": dict(lr=0.1, momentum=0.9, weight_decay=0.01), "AdamMemory": dict(lr=0.01, weight_decay=0.1),
      "PreconditionedMomentum": dict(lr=0.01), "DeltaMomentum": dict(lr=0.05, delta=0.5),
      "DeepMomentum": dict(lr=0.05, inner_lr=0.5), "MuonMemory": dict(lr=0.02)}


def params_list(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (3, 2, 3), (7,), (), (130,), (4, 4)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def grads(params, step, skip=()):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=g).to(p.dtype)


def build(name, impl, params, monkeypatch=None, **kw):
    """``impl``: ``"foreach"`` (the chain's foreach path) or ``"fused"`` (the fused steps'
    references through FusedStep, no Triton needed)."""
    cls = deepopt.OPTIMIZERS[name]
    if impl == "fused":
        monkeypatch.setattr(K, "fused_step_for", lambda chain, group: REAL(chain, group, impl="reference"))
        return cls(params, impl="triton", **{**KW[name], **kw})
    return cls(params, impl="foreach", **{**KW[name], **kw})


def same(opt_a, pa, opt_b, pb):
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        sa, sb = opt_a.state.get(x, {}), opt_b.state.get(y, {})
        assert sorted(sa) == sorted(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def uncached(opt):
    """Step ``opt`` with nothing cached: every plan dropped, every counter its own tensor."""
    opt._plans.clear()
    for s in opt.state.values():
        if "step" in s:
            s["step"] = s["step"].clone()


# ------------------------------------------------------------------ step counters
def test_advance_steps_banks_the_counters_and_keeps_their_values():
    states = [{"step": torch.tensor(float(i))} for i in range(4)]
    assert advance_steps(states) == [1, 2, 3, 4]
    base = states[0]["step"]._base
    assert base is not None and all(s["step"]._base is base for s in states)
    assert all(s["step"].dtype == torch.float32 and s["step"].ndim == 0 for s in states)
    assert advance_steps(states) == [2, 3, 4, 5]
    states[2]["step"] = torch.tensor(10.0)  # replaced (a loaded checkpoint): banked again, values kept
    assert advance_steps(states) == [3, 4, 11, 6]
    assert advance_steps(states[1:3]) == [5, 12]  # another subset: its own bank
    assert advance_steps(states) == [4, 6, 13, 7]
    states[0]["step"].fill_(0.0)  # written in place through the view: seen by the bank
    assert advance_steps(states) == [1, 7, 14, 8]


def test_advance_steps_counts_other_counters_one_by_one():
    states = [{"step": torch.tensor(1.0, dtype=torch.float64)}, {"step": torch.tensor(2.0)}]
    assert advance_steps(states) == [2, 3]
    assert states[0]["step"].dtype == torch.float64 and states[0]["step"]._base is None


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_banked_counters_save_and_resume_bit_exactly(name, impl, monkeypatch):
    pa, pb = params_list(), params_list()
    a, b = build(name, impl, pa, monkeypatch), build(name, impl, pb, monkeypatch)
    for s in range(3):
        grads(pa, s)
        a.step()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert all(int(v["step"]) == 3 for v in sd["state"].values())
    with torch.no_grad():
        for x, y in zip(pa, pb):
            y.copy_(x)
    b.load_state_dict(sd)
    for s in range(3, 6):
        grads(pa, s)
        grads(pb, s)
        a.step()
        b.step()
    same(a, pa, b, pb)
    assert all(int(b.state[p]["step"]) == 6 for p in pb)


# ------------------------------------------------------------------ plans
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_cached_plans_step_like_no_cache(name, impl, monkeypatch):
    """Scheduler changes of lr, parameters without gradients at some steps (counters then differ
    between parameters), add_param_group and load_state_dict: the cached run equals a run that
    caches nothing."""
    pa, pb = params_list(), params_list()
    a, b = build(name, impl, pa, monkeypatch), build(name, impl, pb, monkeypatch)
    sa, sb = (torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (a, b))
    extra_a, extra_b = params_list(1)[:2], params_list(1)[:2]
    for s in range(8):
        skip = {1} if s % 3 == 1 else ({0, 4} if s == 2 else ())
        grads(pa, s, skip)
        grads(pb, s, skip)
        if s == 4:
            a.add_param_group({"params": extra_a})
            b.add_param_group({"params": extra_b})
        if s >= 4:
            grads(extra_a, 50 + s)
            grads(extra_b, 50 + s)
        if s == 6:
            a.load_state_dict(copy.deepcopy(a.state_dict()))
        uncached(b)
        a.step()
        b.step()
        sa.step()
        sb.step()
        same(a, pa + extra_a, b, pb + extra_b)
    assert len(a._plans) == 2


def test_plan_follows_the_group_structure(monkeypatch):
    """Setting a group's ``foreach`` between steps moves it from the fused step to the foreach
    path at the next step (a non-float group value is part of the plan's key)."""
    pa, pb = params_list(), params_list()
    a, b = build("AdamMemory", "fused", pa, monkeypatch), build("AdamMemory", "fused", pb, monkeypatch)
    for s in range(4):
        if s == 2:
            a.param_groups[0]["foreach"] = True
            b.param_groups[0]["foreach"] = True
        grads(pa, s)
        grads(pb, s)
        uncached(b)
        a.step()
        b.step()
        (part,) = a._plans[id(a.param_groups[0])][1]
        assert (part.fused is None) == (s >= 2)
        same(a, pa, b, pb)


def test_plan_follows_a_parameter_dtype_change(monkeypatch):
    """``p.data = p.data.double()`` keeps the parameter's identity: the plan is rebuilt, and
    float64 has no fused step (``impl="triton"`` says so, as when built for float64)."""
    ps = params_list()
    opt = build("AdamMemory", "fused", ps, monkeypatch)
    grads(ps, 0)
    opt.step()
    assert opt._plans[id(opt.param_groups[0])][1][0].fused is not None
    for p in ps:
        p.data = p.data.double()
        for k, v in opt.state[p].items():
            if k != "step":
                opt.state[p][k] = v.double()
    grads(ps, 1)
    with pytest.raises(RuntimeError, match="no fused step"):
        opt.step()


@pytest.mark.parametrize("name", ["MomentumMemory", "AdamMemory"])
def test_nonfinite_skip_with_cached_plans_takes_the_counters_back(name, monkeypatch):
    ps = params_list()
    opt = build(name, "fused", ps, monkeypatch)
    for s in range(2):
        grads(ps, s)
        opt.step()
    before = [p.detach().clone() for p in ps]
    grads(ps, 2)
    ps[3].grad.fill_(float("inf"))
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(p, q) for p, q in zip(ps, before))
    assert all(int(opt.state[p]["step"]) == 2 for p in ps)
    grads(ps, 3)
    opt.step()
    assert all(int(opt.state[p]["step"]) == 3 for p in ps)


# ------------------------------------------------------------------ the CPU non-finite check
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_nonfinite_flag_by_sums(dtype):
    big = torch.finfo(dtype).max / 2
    for n in (10, 1 << 16):  # small tensors (a norm each) and large ones (a sum each)
        ok = [torch.randn(n).to(dtype), torch.full((n,), big, dtype=dtype)]  # overflows: "maybe", then no
        assert float(nonfinite_flag(ok)) == 0.0
        assert float(nonfinite_flag(ok + [torch.empty(0, dtype=dtype)])) == 0.0  # an empty tensor has no max-norm
        for bad in (float("nan"), float("inf"), -float("inf")):
            t = torch.randn(n).to(dtype)
            t[3] = bad
            assert float(nonfinite_flag(ok + [t])) == 1.0, bad
            assert float(nonfinite_flag([t, torch.randn(10 if n > 10 else 1 << 16).to(dtype)])) == 1.0, bad
        mixed = torch.zeros(n, dtype=dtype)
        mixed[0], mixed[-1] = float("inf"), -float("inf")  # +Inf - Inf: a NaN sum
        assert float(nonfinite_flag([mixed])) == 1.0
