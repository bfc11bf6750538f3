"""Our torch replacement of fla's gated backward step ``chunk_bwd_dqkwg`` (nl_layers.ops.linear_memory.fla_gated).

1. Without fla (runs in CI): ``dqkwg`` is the vector-Jacobian product of the chunk map it documents
   (outputs and chunk-end state of each chunk from its start state; delta rule: values u - S w),
   taken by autograd in float64 on a chunk-by-chunk loop: T = 150 (a partial last chunk), B = 2.
2. With fla importable, on CPU (Triton's interpreter, set by conftest): ``dqkwg`` equals fla's own
   Triton kernel ``chunk_bwd_kernel_dqkwg`` on the same inputs, float32 and float16. The kernel is
   launched directly with one config: fla's launcher autotunes, which needs a GPU.
3. The version pin: another fla version or missing internals -> a reason, and the torch path.
4. fla's kernel at blocks of 32 (``dqkwg_tiled``, the step the Functions take where it checks out):
   equal to ``dqkwg`` in the interpreter; on a GPU, the once-per-shape check's verdict holds at a
   training size.

The whole autograd Function (fla's forward and backward kernels around our step) runs only on a
GPU or in the interpreter with temporary patches; it is tested in test_linear_memory_fla.py (gpu).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from nl_layers.ops.linear_memory import fla as ops_fla
from nl_layers.ops.linear_memory import fla_gated
from nl_layers.ops.linear_memory.fla_gated import CHUNK, dqkwg


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _cumulative_gates(b, t, h, shift, dtype=torch.float64):
    """Chunk-local cumulative natural log-gates c (B, T, H), restarting every CHUNK tokens."""
    log_a = F.logsigmoid(torch.randn(b, t, h, dtype=dtype) + shift)
    return torch.cat([part.cumsum(1) for part in log_a.split(CHUNK, dim=1)], 1)


def _inputs(b, t, h, dk, dv, delta, dtype=torch.float64, shift=2.0):
    n = -(-t // CHUNK)
    x = dict(
        q=torch.randn(b, t, h, dk, dtype=dtype), k=F.normalize(torch.randn(b, t, h, dk, dtype=dtype), dim=-1),
        v=torch.randn(b, t, h, dv, dtype=dtype), do=torch.randn(b, t, h, dv, dtype=dtype),
        h=torch.randn(b, n, h, dv, dk, dtype=dtype), dh=torch.randn(b, n, h, dv, dk, dtype=dtype),
    )
    x["w"] = torch.randn(b, t, h, dk, dtype=dtype) if delta else None
    x["dv"] = torch.randn(b, t, h, dv, dtype=dtype) if delta else None
    return x, _cumulative_gates(b, t, h, shift)


def _vjp_reference(x, c, scale):
    """Gradients of q, k, w, c through each chunk's outputs and end state, by autograd (float64)."""
    q, k, c = (t.detach().double().requires_grad_() for t in (x["q"], x["k"], c))
    w = x["w"].detach().double().requires_grad_() if x["w"] is not None else None
    total = 0.0
    for i, start in enumerate(range(0, q.shape[1], CHUNK)):
        sl = slice(start, start + CHUNK)
        qi, ki, vi, ci, doi = q[:, sl], k[:, sl], x["v"][:, sl].double(), c[:, sl], x["do"][:, sl].double()
        s, ds = x["h"][:, i].double(), x["dh"][:, i].double()  # (B, H, V, K)
        length = qi.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()[None, :, :, None]  # (1, t, r, 1)
        decay = torch.where(causal, ci[:, :, None] - ci[:, None, :], float("-inf")).exp()  # (B, t, r, H)
        att = torch.einsum("bthk,brhk->btrh", qi, ki) * decay
        o_state = ci.exp()[..., None] * torch.einsum("bthk,bhvk->bthv", qi, s)
        o = scale * (o_state + torch.einsum("btrh,brhv->bthv", att, vi))
        to_end = (ci[:, -1:] - ci).exp()  # e_L / e_r, (B, r, H)
        s_end = ci[:, -1].exp()[..., None, None] * s + torch.einsum("brh,brhv,brhk->bhvk", to_end, vi, ki)
        total = total + (o * doi).sum() + (s_end * ds).sum()
        if w is not None:  # delta rule: the written values are u - S w, with gradient dv
            total = total - (torch.einsum("brhk,bhvk->brhv", w[:, sl], s) * x["dv"][:, sl].double()).sum()
    leaves = [q, k] + ([w] if w is not None else []) + [c]
    grads = torch.autograd.grad(total, leaves)
    return grads[0], grads[1], (grads[2] if w is not None else None), grads[-1]


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "gla"])
@pytest.mark.parametrize("t, shift", [(150, 2.0), (64, -2.0), (20, 0.0)])
def test_dqkwg_is_the_vjp_of_the_chunk_map(delta, t, shift):
    x, c = _inputs(2, t, 2, 16, 8, delta, shift=shift)
    ref = _vjp_reference(x, c, scale=0.7)
    ours = dqkwg(x["q"], x["k"], x["v"], x["do"], x["h"], x["dh"], c / math.log(2), w=x["w"], dv=x["dv"], scale=0.7)
    for name, a, r in zip(["dq", "dk", "dw", "dg"], ours, ref):
        if r is None:
            assert a is None, name
            continue
        assert a.shape == r.shape and a.is_contiguous(), name  # fla's kernels read our dw, dg by raw strides
        assert _rel(a, r) < 1e-5, f"{name}: relative error {_rel(a, r):.2e}"


def test_dqkwg_ignores_autocast_and_checks_shapes():
    x, c = _inputs(1, 70, 1, 8, 8, True, dtype=torch.float32)
    args = (x["q"], x["k"], x["v"], x["do"], x["h"], x["dh"], c.float() / math.log(2))
    plain = dqkwg(*args, w=x["w"], dv=x["dv"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = dqkwg(*args, w=x["w"], dv=x["dv"])
    assert all(torch.equal(a, b) for a, b in zip(plain, cast))
    with pytest.raises(ValueError, match="both w and dv"):
        dqkwg(*args, w=x["w"])
    with pytest.raises(ValueError, match="NT"):
        dqkwg(*args[:4], args[4][:, :1], args[5][:, :1], args[6])


def test_no_cpu_device_takes_the_replacement():
    assert not ops_fla.gated_backward_miscompiled(torch.device("cpu"))


# --- against fla's own kernel (fla installed; CPU through Triton's interpreter) -------------------


@pytest.fixture
def fla_kernel():
    pytest.importorskip("fla", reason="flash-linear-attention is not installed (pip install -e '.[kernels]')")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("compares on CPU through Triton's interpreter (on Hopper + Triton < 3.7.1 the kernel is the bug)")
    if fla_gated.unavailable() is not None:
        pytest.skip(fla_gated.unavailable())
    from fla.ops.common.chunk_o import chunk_bwd_kernel_dqkwg

    return chunk_bwd_kernel_dqkwg.fn.fn  # under fla's heuristics and autotuner: the kernel itself


def _fla_dqkwg(kernel, x, g, scale, bk=16, bv=16):
    """fla's ``chunk_bwd_dqkwg`` launch (fla/ops/common/chunk_o.py) with one fixed config."""
    b, t, h, dk = x["q"].shape
    dv = x["v"].shape[-1]
    nk, n = -(-dk // bk), -(-t // CHUNK)
    dq, dk_ = torch.empty_like(x["q"]), torch.empty_like(x["k"])
    dw = torch.empty_like(x["w"]) if x["w"] is not None else None
    dg = torch.empty(nk, b, t, h, dtype=torch.float32)
    kernel[(nk * n, b * h)](
        q=x["q"], k=x["k"], v=x["v"], g=g, g_gamma=None, h=x["h"], do=x["do"], dh=x["dh"], dq=dq, dk=dk_, dw=dw,
        dv=x["dv"], dg=dg, cu_seqlens=None, chunk_indices=None, scale=scale, B=b, T=t, H=h, HV=h, K=dk, V=dv,
        BT=CHUNK, BK=bk, BV=bv, USE_G=True, USE_G_GAMMA=False, USE_DW=dw is not None, STATE_V_FIRST=True,
        IS_VARLEN=False, num_warps=4, num_stages=2,
    )
    return dq, dk_, dw, dg.sum(0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's exp2 overflows where fla masks after
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "gla"])
def test_dqkwg_equals_fla_kernel(fla_kernel, dtype, tol, delta):
    x, c = _inputs(2, 100, 2, 32, 16, delta, dtype=torch.float32)  # T = 100: a partial chunk; K = 2 blocks of 16
    x = {name: None if t is None else t.to(dtype) for name, t in x.items()}
    g = (c / math.log(2)).float().contiguous()  # fla keeps g in float32, base 2
    ref = _fla_dqkwg(fla_kernel, x, g, scale=0.5)
    ours = dqkwg(x["q"], x["k"], x["v"], x["do"], x["h"], x["dh"], g, w=x["w"], dv=x["dv"], scale=0.5)
    for name, a, r in zip(["dq", "dk", "dw", "dg"], ours, ref):
        if r is None:
            assert a is None, name
            continue
        assert _rel(a, r) < tol, f"{name}: relative error {_rel(a, r):.2e}"


def test_other_fla_versions_are_refused_with_a_reason(monkeypatch):
    fla = pytest.importorskip("fla", reason="flash-linear-attention is not installed")
    monkeypatch.setattr(fla, "__version__", "9.9.9")
    fla_gated.unavailable.cache_clear()
    try:
        reason = fla_gated.unavailable()
    finally:
        fla_gated.unavailable.cache_clear()
    assert "9.9.9" in reason and fla_gated.TESTED_FLA_VERSION in reason


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "gla"])
def test_tiled_kernel_equals_torch_step_in_interpreter(fla_kernel, monkeypatch, delta):
    import triton.runtime.autotuner as autotuner

    monkeypatch.setattr(autotuner.Autotuner, "prune_configs", lambda self, kwargs, *args: self.configs[:1])
    x, c = _inputs(2, 100, 2, 64, 64, delta, dtype=torch.float32)
    g = (c / math.log(2)).float().contiguous()
    ours = fla_gated.dqkwg_tiled(x["q"], x["k"], x["v"], x["do"], x["h"], x["dh"], g, w=x["w"], dv=x["dv"], scale=0.5)
    ref = dqkwg(x["q"], x["k"], x["v"], x["do"], x["h"], x["dh"], g, w=x["w"], dv=x["dv"], scale=0.5)
    for name, a, r in zip(["dq", "dk", "dw", "dg"], ours, ref):
        assert (a is None) == (r is None), name
        if r is not None:
            assert _rel(a, r) < 1e-5, f"{name}: relative error {_rel(a, r):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "gla"])
def test_tiled_step_verdict_holds_at_training_size_on_cuda(delta):
    """The small once-per-shape check predicts the kernel at B=2, T=1000, H=4, K=V=64 in bfloat16."""
    pytest.importorskip("fla", reason="flash-linear-attention is not installed (pip install -e '.[kernels]')")
    if fla_gated.unavailable() is not None:
        pytest.skip(fla_gated.unavailable())
    torch.manual_seed(0)
    x, c = _inputs(2, 1000, 4, 64, 64, delta, dtype=torch.float32)
    x = {name: None if t is None else t.cuda().to(torch.bfloat16) for name, t in x.items()}
    x["h"], x["dh"] = x["h"].float(), x["dh"].float()
    g = (c / math.log(2)).float().cuda().contiguous()
    ok = fla_gated.tiled_step_ok(x["q"], x["v"], x["h"], x["dh"], x["w"])
    ours = fla_gated.dqkwg_tiled(x["q"], x["k"], x["v"], x["do"], x["h"], x["dh"], g, w=x["w"], dv=x["dv"])
    ref = dqkwg(x["q"], x["k"], x["v"], x["do"], x["h"], x["dh"], g, w=x["w"], dv=x["dv"])
    errors = {n: _rel(a, r) for n, a, r in zip(["dq", "dk", "dw", "dg"], ours, ref) if r is not None}
    agree = all(err < fla_gated._TILED_TOL for err in errors.values())
    print(f"tiled step ok={ok} on {torch.cuda.get_device_name()}: {errors}")
    assert ok == agree, f"check said {ok}, training size: {errors}"
