"""nl_layers.ops.linear_memory.fla_split: the delta rules with each sequence cut into segments side by side.

1. Without fla or a GPU: how many segments are chosen, where the split is taken, the layout helpers.
2. With fla installed, on CPU through Triton's interpreter (float32): the split equals fla's unsplit
   computation (our Function around fla's kernels, ``fla_gated``) in the output, the final memory and
   the gradients of q, k, v, the log-decays, beta and M_0, at awkward T (a padded last segment),
   batch > 1, with and without an initial memory. On CUDA in bfloat16 the same comparison runs through
   the layer in tests/benchmarks/test_long_context_bench.py (gpu).
"""

import builtins
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from nl_layers.ops.linear_memory import fla as ops_fla
from nl_layers.ops.linear_memory import fla_gated, fla_split


@pytest.mark.parametrize("batch, length, heads, expected", [
    (64, 1024, 8, 1), (16, 4096, 8, 1), (4, 16384, 8, 1), (1, 65536, 8, 16), (1, 65536, 2, 32), (1, 4095, 8, 1),
    (1, 8192, 8, 4), (2, 65536, 16, 1), (2, 65536, 8, 8), (1, 65536, 16, 8), (1, 65536, 32, 1),
])
def test_segment_count_splits_few_pairs_to_half_the_sms_with_segments_of_at_least_2k(monkeypatch, batch, length, heads, expected):
    monkeypatch.setattr(fla_split, "sm_count", lambda device: 132)
    assert fla_split.segment_count(batch, length, heads, torch.device("cuda")) == expected


def test_no_split_off_cuda():
    assert fla_split.segment_count(1, 1 << 20, 1, torch.device("cpu")) == 1
    assert not fla_split.device_ok(torch.device("cpu"))


def test_one_segment_is_refused():
    x = torch.zeros(1, 8, 1, 4)
    with pytest.raises(ValueError, match="segments must be >= 2"):
        fla_split.gated_delta_rule(x, x, x, x[..., 0], x[..., 0], None, segments=1)


def test_the_segments_override_is_scoped_and_checked():
    assert ops_fla._SEGMENTS is None
    with ops_fla.segments(4):
        assert ops_fla._SEGMENTS == 4
        with ops_fla.segments(1):
            assert ops_fla._SEGMENTS == 1
        assert ops_fla._SEGMENTS == 4
    assert ops_fla._SEGMENTS is None
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="segments"):
            with ops_fla.segments(bad):
                pass


@pytest.mark.parametrize("t, segments", [(300, 3), (512, 4), (100, 2)])
def test_cut_and_join_round_trip_with_a_padded_tail(t, segments):
    x = torch.randn(2, t, 3, 5)
    length = fla_split._segment_length(t, segments)
    assert length % fla_split.CHUNK == 0 and length * segments >= t > length * (segments - 1) - fla_split.CHUNK
    cut = fla_split._cut(x, segments, length)
    assert cut.shape == (2 * segments, length, 3, 5) and cut.is_contiguous()
    assert torch.equal(fla_split._join(cut, 2, t), x)
    assert not cut.reshape(2, -1, 3, 5)[:, t:].any()  # the padding writes nothing


# --- against the unsplit computation, in Triton's interpreter --------------------------------------


class _Int(int):
    def to(self, *args, **kwargs):
        return self


def _range(*args):
    return (_Int(i) for i in builtins.range(*args))


@pytest.fixture
def interpreted_fla(monkeypatch):
    pytest.importorskip("fla", reason="flash-linear-attention is not installed (pip install -e '.[kernels]')")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("compares on CPU through Triton's interpreter; on CUDA through the gpu test of the layer")
    if fla_split.unavailable() is not None:
        pytest.skip(fla_split.unavailable())
    import triton.runtime.autotuner as autotuner

    fla_split._internals()  # imports every module used
    # the interpreter cannot benchmark configs, and hands plain ints to loop counters that fla casts
    monkeypatch.setattr(autotuner.Autotuner, "prune_configs", lambda self, kwargs, *args: self.configs[:1])
    for name, module in list(sys.modules.items()):
        if name.startswith("fla.ops"):
            monkeypatch.setattr(module, "range", _range, raising=False)


def _rel(a, b):
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's exp2 overflows where fla masks after
@pytest.mark.parametrize("batch, t, segments, with_m0", [(2, 300, 3, True), (1, 512, 4, False)],
                         ids=["B2-T300-S3-m0", "B1-T512-S4"])
def test_the_split_equals_the_unsplit_computation(interpreted_fla, batch, t, segments, with_m0):
    gen = torch.Generator().manual_seed(0)
    heads, dk, dv = 2, 32, 32

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    q, k = (F.normalize(rand(batch, t, heads, dk), dim=-1).requires_grad_() for _ in range(2))
    v = rand(batch, t, heads, dv).requires_grad_()
    g = (-torch.rand(batch, t, heads, generator=gen) * 0.1).requires_grad_()
    beta = torch.rand(batch, t, heads, generator=gen).requires_grad_()
    m0 = rand(batch, heads, dv, dk).requires_grad_() if with_m0 else None
    wy, wm = rand(batch, t, heads, dv), rand(batch, heads, dv, dk)
    inputs = [x for x in (q, k, v, g, beta, m0) if x is not None]

    def run(fn):
        y, m = fn()
        grads = torch.autograd.grad((y * wy).sum() + (m * wm).sum(), inputs)
        return (y, m) + grads

    ref = run(lambda: fla_gated._GatedDeltaRule.apply(q, k, v, g, beta, m0))
    out = run(lambda: fla_split.gated_delta_rule(q, k, v, g, beta, m0, segments=segments))
    names = ["y", "M_T", "dq", "dk", "dv", "dlog_decay", "dbeta", "dM_0"]
    for name, a, r in zip(names, out, ref):
        assert a.shape == r.shape, name
        assert _rel(a, r) < 1e-5, f"{name}: relative error {_rel(a, r):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("with_m0", [True, False], ids=["m0", "no-m0"])
def test_the_split_equals_the_unsplit_computation_on_cuda(with_m0):
    """bfloat16 at 1 x 8192 (4 segments of 2K) and 2 x 5000 (3 segments, a padded tail)."""
    pytest.importorskip("fla", reason="flash-linear-attention is not installed (pip install -e '.[kernels]')")
    if fla_split.unavailable() is not None or not fla_split.device_ok(torch.device("cuda")):
        pytest.skip(fla_split.unavailable() or "needs compute capability >= 8.0")
    for batch, t, segments in [(1, 8192, 4), (2, 5000, 3)]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        heads, dk, dv = 4, 64, 64

        def rand(*shape):
            return torch.randn(*shape, generator=gen, device="cuda")

        q, k = (F.normalize(rand(batch, t, heads, dk), dim=-1).bfloat16().requires_grad_() for _ in range(2))
        v = rand(batch, t, heads, dv).bfloat16().requires_grad_()
        g = (-torch.rand(batch, t, heads, generator=gen, device="cuda") * 0.05).requires_grad_()
        beta = torch.rand(batch, t, heads, generator=gen, device="cuda").requires_grad_()
        m0 = (0.1 * rand(batch, heads, dv, dk)).requires_grad_() if with_m0 else None
        wy, wm = rand(batch, t, heads, dv), rand(batch, heads, dv, dk)
        inputs = [x for x in (q, k, v, g, beta, m0) if x is not None]

        def run(fn):
            y, m = fn()
            grads = torch.autograd.grad((y.float() * wy).sum() + (m.float() * wm).sum(), inputs)
            return (y, m) + grads

        ref = run(lambda: fla_gated.gated_delta_rule(q, k, v, g, beta, m0))
        out = run(lambda: fla_split.gated_delta_rule(q, k, v, g, beta, m0, segments=segments))
        for name, a, r in zip(["y", "M_T", "dq", "dk", "dv", "dlog_decay", "dbeta", "dM_0"], out, ref):
            err = _rel(a.float(), r.float())
            assert err < 2e-2, f"{name} at {batch} x {t}: relative error {err:.2e}"
