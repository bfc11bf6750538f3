"""Fused steps: Triton kernel (interpreter on CPU) == reference == the chain's foreach path.

Tiny, odd-sized parameter lists: a matrix, a conv filter, vectors, a scalar, a transposed
(non-contiguous) parameter; float32 and bfloat16 parameters, and float32 state for bfloat16.
"""

import importlib

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the 'dev' extra brings it)")

import deepopt  # noqa: E402
import deepopt.levels.fused as K  # noqa: E402
from deepopt.kernels.launch import interpreting  # noqa: E402


def _interpreting() -> bool:
    """Whether this process runs Triton's interpreter: asked for (``TRITON_INTERPRET=1``) and in
    effect (Triton's standard library is built for one mode at the first ``import triton``)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return interpreting() and isinstance(tl.sum, InterpretedFunction)


MODE_OK = _interpreting()
pytestmark = pytest.mark.skipif(not MODE_OK, reason="Triton is not in interpreter mode in this process (CUDA "
                                "present, or imported earlier); test_fresh_process.py runs this file in a new one")

CASES = {
    "momentum": (deepopt.MomentumMemory, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "momentum_nesterov": (deepopt.MomentumMemory, dict(lr=0.1, momentum=0.9, nesterov=True)),
    "momentum_zero": (deepopt.MomentumMemory, dict(lr=0.1, momentum=0.0, dampening=0.5)),
    "adam": (deepopt.AdamMemory, dict(lr=0.01, weight_decay=0.1)),
    "adam_accumulate": (deepopt.AdamMemory, dict(lr=0.01, form="accumulate")),
    "muon": (deepopt.MuonMemory, dict(lr=0.02, weight_decay=0.1)),
    "precond": (deepopt.PreconditionedMomentum, dict(lr=0.01, weight_decay=0.1)),
    "precond_slow": (deepopt.PreconditionedMomentum, dict(lr=0.01, precond_period=3, nesterov=True)),
    "delta": (deepopt.DeltaMomentum, dict(lr=0.05, delta=0.5, weight_decay=0.01)),
    # matmuls in bf16 whatever the CPU (terms narrower than float32 buffers, wider than bf16 ones' never)
    "delta_bf16_terms": (deepopt.DeltaMomentum, dict(lr=0.05, delta=0.5, forget_dtype=torch.bfloat16, nesterov=True)),
    # float32 matmuls: with bf16 parameters and state the terms are wider than the buffers
    "delta_f32_terms": (deepopt.DeltaMomentum, dict(lr=0.05, delta=0.5, forget_dtype=torch.float32)),
    "m3": (deepopt.M3, dict(lr=0.01, frequency=2, weight_decay=0.1)),
    "m3_literal": (deepopt.M3, dict(lr=0.001, frequency=3, form="literal")),
    "deep": (deepopt.DeepMomentum, dict(lr=0.05, inner_lr=0.5, weight_decay=0.01)),
    "deep_sign": (deepopt.DeepMomentum, dict(lr=0.05, sigma="sign")),
    "deep_ns": (deepopt.DeepMomentum, dict(lr=0.05, sigma="ns", inner_lr=0.2)),
    "deep_rms": (deepopt.DeepMomentum, dict(lr=0.05, sigma="rms", inner_lr=0.5, weight_decay=0.01)),
    "deep_pre": (deepopt.DeepMomentum, dict(lr=0.01, inner_lr=0.5, precondition=True, weight_decay=0.01)),
    "deep_pre_rms": (deepopt.DeepMomentum, dict(lr=0.01, sigma="rms", inner_lr=0.5, precondition=True, beta2=0.9)),
    "deep_factored": (deepopt.DeepMomentum, dict(lr=0.01, inner_lr=0.5, precondition="factored", normalize=False,
                                                 weight_decay=0.01)),
    "deep_factored_norm": (deepopt.DeepMomentum, dict(lr=0.01, sigma="rms", inner_lr=0.5, precondition="factored",
                                                      beta2=0.9)),
    "deep_factored_ns": (deepopt.DeepMomentum, dict(lr=0.01, sigma="ns", inner_lr=0.5, precondition="factored",
                                                    normalize=False)),
    "deep_unnormalized": (deepopt.DeepMomentum, dict(lr=0.01, sigma="sign", inner_lr=0.5, normalize=False)),
    "deep_pre_unnormalized": (deepopt.DeepMomentum, dict(lr=0.01, inner_lr=0.5, precondition=True, normalize=False,
                                                         weight_decay=0.01)),
}
STEPS = 4
REAL = K.fused_step_for


def make_params(dtype, device="cpu", scale=1):
    g = torch.Generator().manual_seed(0)
    shapes = [(5 * scale, 7 * scale), (3, 2, 3), (7,), (), (130 * scale,)]
    ps = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    ps.append(torch.randn((6, 4), generator=g).to(device, dtype).t())  # a non-contiguous matrix
    return [torch.nn.Parameter(p) for p in ps]


def grads_for(params, step):
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for p in params:
        gr = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        out.append(gr.contiguous())  # a contiguous gradient for the transposed parameter too
    return out


def run(name, impl, dtype=torch.float32, state_dtype=None, monkeypatch=None, device="cpu", scale=1,
        compiled=False):
    """``STEPS`` steps of ``CASES[name]`` with ``impl``; ``compiled``: through ``torch.compile(opt.step)``
    (dynamo's eager backend)."""
    cls, kw = CASES[name]
    params = make_params(dtype, device, scale)
    group = {"params": params}
    if state_dtype is not None:
        group["state_dtype"] = state_dtype
    if impl == "foreach":
        opt = cls([group], impl="foreach", **kw)
    else:
        monkeypatch.setattr(K, "fused_step_for", lambda chain, group: REAL(chain, group, impl=impl))
        opt = cls([group], impl="triton", **kw)
    step = torch.compile(opt.step, backend="eager") if compiled else opt.step
    for s in range(STEPS):
        for p, g in zip(params, grads_for(params, s)):
            p.grad = g
        step()
    return params, opt


def close(a, b, tol):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def compare(pa, oa, pb, ob, tol):
    for x, y in zip(pa, pb):
        close(x, y, tol)
    for x, y in zip(pa, pb):
        sa, sb = oa.state[x], ob.state[y]
        assert sorted(sa) == sorted(sb)
        for k in sa:
            close(sa[k], sb[k], tol)


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_equals_reference_and_foreach_fp32(name, monkeypatch):
    pk, ok = run(name, "triton", monkeypatch=monkeypatch)
    pr, orf = run(name, "reference", monkeypatch=monkeypatch)
    compare(pk, ok, pr, orf, 1e-5)
    pf, of = run(name, "foreach")
    # Newton-Schulz runs in bf16 on both sides; a rounding flip there moves a step by ~1e-2 lr
    compare(pk, ok, pf, of, 2e-3 if "muon" in name or "m3" in name or "ns" in name else 1e-4)


@pytest.mark.parametrize("name", ["momentum", "adam", "precond_slow", "m3", "deep", "deep_pre", "deep_factored",
                                  "delta", "delta_f32_terms"])
@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_kernel_equals_reference_bf16(name, state_dtype, monkeypatch):
    pk, ok = run(name, "triton", torch.bfloat16, state_dtype, monkeypatch)
    pr, orf = run(name, "reference", torch.bfloat16, state_dtype, monkeypatch)
    compare(pk, ok, pr, orf, 2e-2)
    for p in pk:
        for k, v in ok.state[p].items():
            if k != "step":  # the factored statistics are float32 whatever the parameters
                assert v.dtype == (torch.float32 if k.startswith("factored.") else state_dtype or torch.bfloat16), k



@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_read_the_nonfinite_flag_and_store_nothing(name, monkeypatch):
    """A NaN gradient: the kernels get the device flag (no host read before the step), or make it
    in their first pass (deep momentum's sum of squares, delta momentum's reduction), store
    nothing, and the shell counts the skip and takes the step counters back."""
    params, opt = run(name, "triton", monkeypatch=monkeypatch)
    taken, real = [], opt._kernels_take_flag
    made, real_made = [], opt._kernels_make_flag
    monkeypatch.setattr(opt, "_kernels_take_flag", lambda gbg: taken.append(real(gbg)) or taken[-1])
    monkeypatch.setattr(opt, "_kernels_make_flag", lambda gbg: made.append(real_made(gbg)) or made[-1])
    before = [p.detach().clone() for p in params]
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    for p, g in zip(params, grads_for(params, STEPS)):
        p.grad = g
    params[0].grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        opt.step()
    # (an unnormalized memory without factored statistics has no first pass: the shell checks)
    makes = (name.startswith("deep") and "ns" not in name and "unnormalized" not in name) or name.startswith("delta")
    assert made == [makes] and taken == ([] if makes else [True])  # the kernels, not a host check, skip it
    assert opt.skipped_steps == 1
    for p, q in zip(params, before):
        assert torch.equal(p, q)
    for i, p in enumerate(params):
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[i][k]), (name, k)
    params[0].grad[0, 0] = 0.0
    opt.step()  # and the next finite step runs
    assert opt.skipped_steps == 1 and not all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("name", ["deep", "deep_factored", "delta"])
def test_first_pass_checks_the_gradients(name, bad, mixed, monkeypatch):
    """DeepMomentum's sum-of-squares kernel and DeltaMomentum's reduction are the step's
    non-finite check: a NaN or +-Inf in the last entry of the last tensor skips the step with
    nothing stored (coupled weight decay: the raw gradient is checked); with two launch families
    (float32 and bfloat16 parameters in one group) the pass cannot see every gradient before the
    first store, so the usual check runs first."""
    from deepopt.kernels.launch import FusedStep

    monkeypatch.setattr(K, "fused_step_for", lambda chain, group: REAL(chain, group, impl="triton"))
    params = make_params(torch.float32)
    if mixed:
        params[1] = torch.nn.Parameter(params[1].detach().to(torch.bfloat16))
    cls, kw = CASES[name]
    opt = cls(params, impl="triton", **kw)
    covered = []
    real = FusedStep.flag_covered
    monkeypatch.setattr(FusedStep, "flag_covered", lambda self, *a: covered.append(real(self, *a)) or covered[-1])
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()
    assert covered == [not mixed]
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    for p, g in zip(params, grads_for(params, 1)):
        p.grad = g
    params[-1].grad.view(-1)[-1] = bad
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        opt.step()
    assert opt.skipped_steps == 1
    for p, q, st in zip(params, before, state):
        assert torch.equal(p, q) and all(torch.equal(v, st[k]) for k, v in opt.state[p].items())


def test_bf16_stores_round_to_nearest_even(monkeypatch):
    """The interpreter truncates float32 -> bfloat16, so there (only) ``_cast`` rounds with bit
    operations (``RNE_BY_BITS``); stores equal torch's round-to-nearest-even exactly, ties included."""
    from deepopt.kernels import triton_lib
    from deepopt.kernels.launch import FusedStep, apply_rows

    assert triton_lib.RNE_BY_BITS.value is True
    g = torch.Generator().manual_seed(0)
    bits = torch.randn(4096, generator=g).view(torch.int32)
    bits[:2048] = (bits[:2048] & ~0xFFFF) | 0x8000  # exact ties (both parities of the kept bits)
    bits[2048:2560] = (bits[2048:2560] & ~0xFFFF) | 0x7FFF  # just below a tie
    o = bits.view(torch.float32)
    p = torch.zeros(4096, dtype=torch.bfloat16)
    expect = o.to(torch.bfloat16)  # p = 1 * 0 - (-1) o: the kernel stores o rounded

    class Apply(FusedStep):
        covers = classmethod(lambda cls, chain: False)
        run = None

    apply_rows(Apply(None, "triton"), [0], [p], [o], [-1.0], 1.0, kernel=True)
    assert torch.equal(p, expect)


@pytest.mark.parametrize("name", ["momentum", "adam", "precond_slow", "delta", "deep", "deep_pre"])
def test_kernels_with_counters_at_different_steps(name, monkeypatch):
    """A parameter without a gradient at some steps falls behind the others: per-row step
    scalars (first write, bias corrections) then differ between rows; kernel == reference."""
    out = {}
    for impl in ("triton", "reference"):
        cls, kw = CASES[name]
        params = make_params(torch.float32)
        monkeypatch.setattr(K, "fused_step_for", lambda chain, group, impl=impl: REAL(chain, group, impl=impl))
        opt = cls(params, impl="triton", **kw)
        for s in range(STEPS):
            for i, (p, g) in enumerate(zip(params, grads_for(params, s))):
                p.grad = None if (i == 1 and s < 2) or (i == 4 and s == 1) else g
            opt.step()
        out[impl] = (params, opt)
    assert sorted({int(s["step"]) for s in out["triton"][1].state.values()}) == [2, 3, 4]
    compare(*out["triton"], *out["reference"], 1e-5)


@pytest.mark.parametrize("name", ["adam", "muon", "m3", "delta", "deep"])
def test_compiled_step_runs_the_kernels_as_in_eager_mode(name, monkeypatch):
    """``torch.compile(opt.step)``: the fused call runs between graphs, as in eager mode (the kernels
    write through tables of addresses, which dynamo's analysis of Triton kernels cannot follow), so
    the compiled step equals the eager one bit for bit. Traced, these interpreted kernels failed
    outright; compiled ones on an H100 gave DeepMomentum, DeltaMomentum and M3 steps off by > 3e-2."""
    launch_module = importlib.import_module("deepopt.kernels.launch")
    launches, real = [], launch_module.launch
    monkeypatch.setattr(launch_module, "launch", lambda *a, **k: launches.append(1) or real(*a, **k))
    torch._dynamo.reset()
    pe, oe = run(name, "triton", monkeypatch=monkeypatch)
    eager_launches = len(launches)
    pc, oc = run(name, "triton", monkeypatch=monkeypatch, compiled=True)
    assert eager_launches > 0 and len(launches) == 2 * eager_launches  # the kernels ran, once a step
    compare(pc, oc, pe, oe, 0.0)


def test_launch_config_follows_the_narrowest_element():
    """32 bytes per thread: 8 fp32 elements (1024 x 4 warps) or 16 bf16 ones (512 x 1 warp); a
    bf16 parameter with fp32 state takes the bf16 configuration."""
    from deepopt.kernels.launch import CONFIGS, launch_config
    from deepopt.kernels.tables import RowSet

    f32, b16 = torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16)
    assert launch_config(RowSet([[f32, f32.clone()]])) == CONFIGS[4] == (1024, 4)
    assert launch_config(RowSet([[b16, b16.clone()]])) == CONFIGS[2] == (512, 1)
    assert launch_config(RowSet([[b16, f32]])) == CONFIGS[2]
    for block, warps in CONFIGS.values():
        assert block // (32 * warps) * {1024: 4, 512: 2}[block] == 32  # bytes per thread


@pytest.mark.parametrize("name", ["deep", "deep_factored"])
def test_deep_inner_kernel_walks_blocks_of_several_slices(name, monkeypatch):
    """A matrix of 3,500 elements spans two of the inner kernel's blocks (2,048 elements here, slices
    of 256, the last one partial): the sums over the blocks' slices still equal the reference's.
    Factored: its 70 columns wrap many times in a block and a 1,300-element vector spans several
    (each element's matrix row and column found from the block's start)."""
    from deepopt.levels.deep import fused

    monkeypatch.setattr(fused, "INNER_SLICE", (2048, 256))
    pk, ok = run(name, "triton", monkeypatch=monkeypatch, scale=10)
    pr, orf = run(name, "reference", monkeypatch=monkeypatch, scale=10)
    compare(pk, ok, pr, orf, 1e-5)


def test_factored_rows_as_wide_as_a_block_or_wider(monkeypatch):
    """Rows of at least a block's columns take the one-comparison path of the factored read (a block
    wraps into the next matrix row at most once): matrices of 256 and 300 columns in the read kernel's
    256-element blocks and one of 2,100 columns in the inner kernel's 2,048-element blocks, against
    the reference."""
    from deepopt.levels.deep import fused

    monkeypatch.setattr(fused, "INNER_SLICE", (2048, 256))
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in ((3, 256), (3, 300), (2, 2100))]
    grads = [[torch.randn(x.shape, generator=g) for x in init] for _ in range(3)]
    out = []
    for impl in ("triton", "reference"):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        monkeypatch.setattr(K, "fused_step_for", lambda chain, group: REAL(chain, group, impl=impl))
        opt = deepopt.DeepMomentum(ps, impl="triton", lr=0.01, inner_lr=0.5, precondition="factored",
                                   normalize=False)
        for gs in grads:
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()
        out.append((ps, opt))
    compare(*out[0], *out[1], 1e-5)


ALIGNED_SHAPES = [(16, 32), (32, 16), (48,)]


def run_aligned(impl, monkeypatch, shapes=ALIGNED_SHAPES, device="cpu", dtype=torch.float32, bad_at=None):
    """The factored memory over matrices whose column counts are multiples of 16 (its tiled pass
    then loads vectors); ``bad_at``: the step whose last gradient entry is NaN (a step follows it: on
    CUDA the flag reaches the host during the next step)."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in shapes]
    monkeypatch.setattr(K, "fused_step_for", lambda chain, group: REAL(chain, group, impl=impl))
    opt = deepopt.DeepMomentum(ps, impl="triton", lr=0.01, inner_lr=0.5, precondition="factored", normalize=False)
    for s in range(STEPS):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
        if s == bad_at:
            ps[-1].grad.view(-1)[-1] = float("nan")
        opt.step()
    return ps, opt


def test_factored_tiled_pass_on_aligned_rows(monkeypatch):
    """Column counts that are multiples of 16 make the tile tables aligned (the tiled pass's vector
    loads), others not; the step equals the reference there, and a NaN in the last entry is flagged."""
    from deepopt.kernels.tables import RowSet

    assert RowSet([[torch.zeros(16, 32)], [torch.zeros(48)]]).tile_tables([32, 48], 8, 16).aligned
    assert not RowSet([[torch.zeros(16, 24)]]).tile_tables([24], 8, 16).aligned
    compare(*run_aligned("triton", monkeypatch), *run_aligned("reference", monkeypatch), 1e-5)
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        assert run_aligned("triton", monkeypatch, bad_at=STEPS - 2)[1].skipped_steps == 1
