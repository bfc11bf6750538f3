"""The token-form read's backward pass: the Triton kernel (forced: compiled on a CUDA machine, the
interpreter on a CPU one) against the torch path, and rank1_read_tokens with its hand-written
backward against autograd through the plain expression."""

import pytest
import torch

from nl_layers.ops.fast_weights import read_kernels
from nl_layers.ops.fast_weights.read_kernels import read_grads
from nl_layers.ops.fast_weights.scan import rank1_read_tokens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the forced kernel runs


def causal(n, length, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, length, length, generator=gen, dtype=dtype).tril()
    return m.to(DEVICE)


@pytest.mark.parametrize("with_acc", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 5, 71, 130])
def test_kernel_matches_torch(length, dtype, with_acc):
    g, s = (torch.randn(3, length, length, dtype=dtype, device=DEVICE) for _ in range(2))
    m = causal(3, length, dtype).to(dtype)
    acc = causal(3, length, dtype, seed=5).to(dtype) if with_acc else None
    want = read_grads(g, m, s, impl="torch", acc=acc)
    if with_acc and dtype == torch.float32:  # the torch path itself: dM = G * S + acc below the diagonal
        torch.testing.assert_close(want[1], (g * s + acc).tril())
    for a, b in zip(read_grads(g, m, s, impl="triton", acc=acc), want):
        assert a.dtype == dtype
        # bfloat16: the interpreter's cast truncates; with acc: torch's addcmul may fuse the multiply-add
        tol = 1e-2 if dtype != torch.float32 else 1e-6 if with_acc else 0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        assert bool((a.triu(1) == 0).all())


def test_bad_impl():
    g = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="impl"):
        read_grads(g, g, g, impl="cuda")


def reference_read(mixing, left, right, x, out, weight=None):
    if weight is not None:
        out = x @ weight.transpose(-1, -2) + (0 if out is None else out)
    weighted = mixing * (x @ right.transpose(-1, -2))
    return weighted @ left if out is None else torch.baddbmm(out, weighted, left)


@pytest.mark.parametrize("weight", [None, "shared", "per_copy"])
@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("length", [7, 70])
def test_read_matches_autograd(monkeypatch, length, with_out, weight):
    """Values and the gradients of all inputs (mixing's on and below the diagonal), float32, kernel
    forced on; with a base weight (one for all copies or one per copy) inside the read too."""
    monkeypatch.setattr(read_kernels, "kernel_ok", lambda *ts: True)
    gen = torch.Generator().manual_seed(1)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    inputs = [causal(2, length, torch.float32, seed=2), make(2, length, 6), make(2, length, 5), make(2, length, 5),
              make(2, length, 6) if with_out else None, {None: None, "shared": make(6, 5), "per_copy": make(2, 6, 5)}[weight]]
    probe = make(2, length, 6)
    results = []
    for fn in (rank1_read_tokens, reference_read):
        leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
        y = fn(*leaves[:5], weight=leaves[5]) if fn is rank1_read_tokens else fn(*leaves)
        grads = torch.autograd.grad((y * probe).sum(), [t for t in leaves if t is not None])
        results.append([y.detach(), *grads])
    got, want = results
    assert bool((got[1].triu(1) == 0).all())  # no gradient above the diagonal, where mixing is taken as zero
    want[1] = want[1].tril()
    names = ("y", "mixing", "left", "right", "x") + (("out",) if with_out else ()) + (("weight",) if weight else ())
    assert len(got) == len(want) == len(names)
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_cpu_takes_the_plain_expression():
    """Off CUDA the read is the plain autograd expression (no kernel), also for an acausal mixing."""
    full = torch.randn(1, 4, 4, requires_grad=True)
    left, right, x = torch.randn(1, 4, 3), torch.randn(1, 4, 2), torch.randn(1, 4, 2)
    if DEVICE == "cpu":
        rank1_read_tokens(full, left, right, x).sum().backward()
        assert bool((full.grad.triu(1) != 0).any())


def test_titans_layer_with_both_kernels(monkeypatch):
    """NeuralMemory (token form) with the decay-mix and read kernels forced on equals the torch
    path: output and every parameter's gradient, float32."""
    import nl_layers
    from nl_layers.ops.fast_weights import decay_kernels

    torch.manual_seed(0)
    layer = nl_layers.NeuralMemory(16, heads=2, chunk_size=8).to(DEVICE)
    x = torch.randn(2, 21, 16, device=DEVICE)
    probe = torch.randn(2, 21, 16, device=DEVICE)

    def run():
        y, _ = layer(x)
        return [y.detach(), *torch.autograd.grad((y * probe).sum(), list(layer.parameters()))]

    monkeypatch.setattr(read_kernels, "kernel_ok", lambda *ts: False)
    monkeypatch.setattr(decay_kernels, "kernel_ok", lambda *ts: False)
    want = run()
    monkeypatch.setattr(read_kernels, "kernel_ok", lambda *ts: True)
    monkeypatch.setattr(decay_kernels, "kernel_ok", lambda *ts: True)
    got = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _CudaLike:
    """Stands in for a CUDA tensor in the dispatch checks (is_cuda, dtype), on a CPU machine."""

    is_cuda, dtype = True, torch.float32


def test_triton_kernels_switch_turns_auto_dispatch_off():
    """nl_layers.triton_kernels(False): every "auto" dispatch of the layers' own kernels takes the torch path."""
    import nl_layers
    from nl_layers.ops import causal_conv
    from nl_layers.ops.fast_weights import decay_kernels

    t = _CudaLike()
    if read_kernels.triton is None:
        pytest.skip("triton is not installed")
    assert read_kernels.kernel_ok(t, t) and decay_kernels.kernel_ok(t, t)
    with nl_layers.triton_kernels(False):
        assert not nl_layers.triton_kernels_enabled()
        assert not read_kernels.kernel_ok(t, t) and not decay_kernels.kernel_ok(t, t)
        assert not causal_conv._kernel_ok(t)
    assert nl_layers.triton_kernels_enabled()
