"""Causal depthwise convolution: the Triton kernels (forced: compiled on a CUDA machine, the interpreter
on a CPU one) and the torch path against the old cat + conv1d expression (on the CPU), for y, the new
cache and the gradients of x, weight, cache."""

import pytest
import torch
import torch.nn.functional as F

from nl_layers._modules import CausalDepthwiseConv1d
from nl_layers.ops import causal_conv
from nl_layers.ops.causal_conv import causal_conv1d

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the forced kernels run


def reference(x, w, cache):
    """The module's former forward: zeros (no cache) + cat, conv1d on the transposed input."""
    b, _, c = x.shape
    width = w.shape[-1]
    cache = x.new_zeros(b, width - 1, c) if cache is None else cache
    full = torch.cat([cache, x], dim=1)
    y = F.conv1d(full.transpose(1, 2), w, groups=c).transpose(1, 2)
    return y, full[:, full.shape[1] - (width - 1):]


def run(fn, x, w, cache):
    """Outputs and gradients of a fixed random loss on y and the new cache."""
    leaves = [v.detach().requires_grad_() for v in (x, w) + (() if cache is None else (cache,))]
    y, new = fn(leaves[0], leaves[1], leaves[2] if cache is not None else None)
    gen = torch.Generator().manual_seed(1)
    probe = lambda t: torch.randn(t.shape, generator=gen, dtype=x.dtype).to(t.device, t.dtype)  # noqa: E731
    loss = (y * probe(y)).sum() + (new * probe(new)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [y.detach(), new.detach(), *grads]


def inputs(b, t, c, width, with_cache, dtype):
    x = torch.randn(b, t, c, dtype=dtype)
    w = torch.randn(c, 1, width, dtype=dtype)
    return x, w, (torch.randn(b, width - 1, c, dtype=dtype) if with_cache else None)


def check(x, w, cache, impl, tol):
    """``impl`` on DEVICE against the reference on the CPU (same values)."""
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    want = run(reference, cpu(x), cpu(w), cpu(cache))
    got = run(lambda *a: causal_conv1d(*a, impl=impl), on(x), on(w), on(cache))
    for name, a, b in zip(("y", "cache", "dx", "dw", "dcache"), want, got):
        assert a.shape == b.shape, name
        torch.testing.assert_close(b.cpu(), a, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_cache", [False, True])
@pytest.mark.parametrize("width", [1, 2, 4])
def test_triton_matches_reference(width, with_cache, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for t in (1, 2, 3, 7, 33):
        for c in (5, 24):
            check(*inputs(2, t, c, width, with_cache, dtype), impl="triton", tol=tol)


@pytest.mark.parametrize("with_cache", [False, True])
@pytest.mark.parametrize("width", [4, 6])
def test_triton_several_programs(monkeypatch, width, with_cache):
    """Several row programs in the backward (dw summed over their partials), several steps of one
    program (a short last one), channel blocks; width 6 takes the taps j >= 4 branch."""
    monkeypatch.setattr(causal_conv, "BWD_ROWS", 2 * causal_conv.BWD_BT)
    check(*inputs(2, 2 * causal_conv.BWD_BT + 9, 130, width, with_cache, torch.float32), impl="triton", tol=1e-5)


def test_triton_strided_input():
    """x a column slice of a wider tensor (as after a fused projection's split): read in place."""
    wide = torch.randn(2, 9, 20, device=DEVICE)
    x = wide[..., 3:15]
    assert not x.is_contiguous()
    check(x, torch.randn(12, 1, 4), torch.randn(2, 3, 12), impl="triton", tol=1e-5)
    x = torch.randn(2, 12, 9, device=DEVICE).transpose(1, 2)  # channel stride 9: copied first
    check(x, torch.randn(12, 1, 4), None, impl="triton", tol=1e-5)


@pytest.mark.parametrize("with_cache", [False, True])
@pytest.mark.parametrize("width", [1, 4])
def test_torch_path_matches_reference(width, with_cache):
    for t in (1, 2, 7):
        x, w, cache = inputs(2, t, 6, width, with_cache, torch.float32)
        want, got = run(reference, x, w, cache), run(causal_conv1d, x, w, cache)
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_module_dispatch_and_streaming():
    """The module on CPU takes the torch path; streaming in two calls equals one call."""
    conv = CausalDepthwiseConv1d(6, 4)
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(2, 9, 6)
    y, cache = conv(x)
    y1, c1 = conv(x[:, :5])
    y2, c2 = conv(x[:, 5:], c1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(c2, cache)
    conv_k = CausalDepthwiseConv1d(6, 4, impl="triton").to(DEVICE)
    conv_k.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv_k(x.to(DEVICE))[0].cpu(), y)
    with pytest.raises(ValueError):
        CausalDepthwiseConv1d(6, 4, impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_cache", [False, True])
def test_lm_size_gpu(dtype, with_cache):
    x, w, cache = inputs(32, 256, 1152, 4, with_cache, dtype)
    x, w = x.cuda(), w.float().cuda()
    cache = None if cache is None else cache.cuda()
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False  # a float32 reference
    try:
        want = run(lambda x, w, c: reference(x.float(), w, None if c is None else c.float()), x, w, cache)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    got = run(lambda *a: causal_conv1d(*a, impl="auto"), x, w, cache)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("y", "cache", "dx", "dw", "dcache"), want, got):
        scale = a.abs().max().clamp_min(1.0)  # dw sums 8192 products: relative to its size
        assert ((b.float() - a).abs().max() / scale).item() < tol, name


def test_triton_autocast_dtypes():
    """Under autocast y comes in the autocast dtype and the cache in the input's, as on the torch path."""
    x, w, cache = (t.to(DEVICE) for t in inputs(2, 5, 6, 4, True, torch.float32))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        want = causal_conv1d(x, w, cache, impl="torch")
        got = causal_conv1d(x, w, cache, impl="triton")
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.bfloat16, torch.float32]
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1], want[1])
