"""The hebbian memory as segments side by side equals the whole-sequence memory (outputs, final
state, every gradient): exact in float64 on the token-by-token reference, and through fla's kernels
on a GPU against the same kernels on the whole sequence."""

import pytest
import torch
import torch.nn.functional as F

from nl_layers.memory.linear import linear_memory_chunked
from nl_layers.ops.linear_memory import segments
from nl_layers.ops.linear_memory.naive import recurrent


def reference_op(q, k, v, g, m0):
    """The token-by-token hebbian memory in the (B, T, H, D) layout, the step folded into v."""
    t = lambda x: None if x is None else x.transpose(1, 2)  # noqa: E731
    ones = torch.ones(q.shape[0], q.shape[2], q.shape[1], dtype=q.dtype)
    y, m = recurrent(t(q), t(k), t(v), ones, t(g), m0, delta=False)
    return y.transpose(1, 2), m


def inputs(decay: bool, start: bool, b=2, t=45, h=2, dk=3, dv=4):
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    xs = [rand(b, t, h, dk), rand(b, t, h, dk), rand(b, t, h, dv),
          F.logsigmoid(rand(b, t, h) + 2) if decay else None, rand(b, h, dv, dk) if start else None]
    return [x.requires_grad_() if x is not None else None for x in xs]


@pytest.mark.parametrize("decay", [True, False])
@pytest.mark.parametrize("start", [True, False])
@pytest.mark.parametrize("cuts, multiple", [(4, 8), (3, 1), (5, 16)])  # padded tails (45 tokens) and none
def test_segments_equal_the_whole_sequence_float64(decay, start, cuts, multiple):
    xs = inputs(decay, start)
    live = [x for x in xs if x is not None]
    y, m = segments.segmented(reference_op, *xs, segments=cuts, multiple=multiple)
    y_ref, m_ref = reference_op(*xs)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m, m_ref, rtol=1e-10, atol=1e-10)
    wy, wm = torch.randn_like(y), torch.randn_like(m)
    grads = torch.autograd.grad((y * wy).sum() + (m * wm).sum(), live)
    grads_ref = torch.autograd.grad((y_ref * wy).sum() + (m_ref * wm).sum(), live)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_segment_count_fills_the_sms_with_long_enough_segments(monkeypatch):
    assert segments.segment_count(1, 65536, 8, torch.device("cpu")) == 1
    monkeypatch.setattr(segments, "_sm_count", lambda device: 132)
    cuda0 = torch.device("cuda", 0)
    assert segments.segment_count(1, 65536, 8, cuda0) == 32   # 256 programs of 2K tokens
    assert segments.segment_count(1, 16384, 2, cuda0) == 8    # capped by the 2K segment length
    assert segments.segment_count(16, 4096, 8, cuda0) == 2    # 128 pairs: one cut reaches 2 per SM
    assert segments.segment_count(64, 1024, 8, cuda0) == 1    # a short sequence is never cut
    assert segments.segment_count(40, 65536, 8, cuda0) == 1   # 320 pairs: two per SM already


@pytest.mark.gpu
@pytest.mark.parametrize("decay", [True, False])
def test_fla_segments_equal_the_whole_sequence_on_cuda(decay, monkeypatch):
    """Batch 1, 16K tokens, 2 heads: the fla path cuts each sequence into 8 segments; against the
    same fla kernels on the whole sequence (segmenting switched off), bf16, fla's error measure."""
    pytest.importorskip("fla", reason="flash-linear-attention is not installed (pip install -e '.[kernels]')")
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    b, h, t, d = 1, 2, 16384, 64
    assert segments.segment_count(b, t, h, torch.device("cuda")) > 1
    q, k = F.normalize(rand(b, h, t, d), dim=-1), F.normalize(rand(b, h, t, d), dim=-1)
    xs = [q, k, rand(b, h, t, d), torch.sigmoid(rand(b, h, t)), F.logsigmoid(rand(b, h, t) + 3), rand(b, h, d, d)]
    xs = [x.to(torch.bfloat16).requires_grad_() for x in xs]
    if not decay:
        xs[4] = None

    def run():
        q, k, v, lr, log_decay, m0 = xs
        y, m = linear_memory_chunked(q, k, v, rule="hebbian", lr=lr, log_decay=log_decay, initial_state=m0,
                                     impl="fla")
        w = torch.Generator(device="cuda").manual_seed(1)
        loss = (y.float() * torch.randn(y.shape, generator=w, device="cuda")).sum() + (
            m.float() * torch.randn(m.shape, generator=w, device="cuda")).sum()
        return [y, m, *torch.autograd.grad(loss, [x for x in xs if x is not None])]

    cut = run()
    monkeypatch.setattr(segments, "segment_count", lambda *a: 1)
    whole = run()
    for a, ref in zip(cut, whole):
        err = float((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
        assert err < 1e-2, err
