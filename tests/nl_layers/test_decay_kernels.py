"""The decay-mix passes: Triton kernels (forced: compiled on a CUDA machine, the interpreter on a CPU
one) against the torch path, and decay_mix (the kernels inside its autograd Function) against
autograd through the decay products."""

import pytest
import torch

from nl_layers.ops.fast_weights import decay_kernels
from nl_layers.ops.fast_weights.cross import decay_products
from nl_layers.ops.fast_weights.decay_kernels import decay_rowcol, decay_tiles
from nl_layers.ops.fast_weights.scan import decay_mix

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the forced kernels run
LENGTHS = (1, 5, 71, 130)  # one tile, a partial tile, several tiles with a short last one


def prefixes(k, n, length, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = (-torch.rand(k, n, length, generator=gen, dtype=dtype)).cumsum(-1)
    w = torch.rand(k, n, length, generator=gen, dtype=dtype) + 0.5
    return c.to(DEVICE), w.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", LENGTHS)
def test_tiles_match_torch(length, dtype):
    c, w = prefixes(2, 3, length, dtype)
    want = decay_tiles(c, w, impl="torch")
    got = decay_tiles(c, w, impl="triton")
    assert got.shape == (2, 3, length, length) and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-13, atol=0)  # the GPU's exp
    assert bool((got.triu(1) == 0).all())  # exactly zero above the diagonal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", LENGTHS)
def test_rowcol_matches_torch(length, dtype):
    c, w = prefixes(2, 3, length, dtype)
    x = torch.randn(2, 3, length, length, dtype=dtype, device=DEVICE)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(decay_rowcol(x, c, w, impl="triton"), decay_rowcol(x, c, w, impl="torch")):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_rowcol_ignores_entries_above_the_diagonal():
    """The kernel does not read X above the diagonal (where E is zero): Inf there changes nothing."""
    c, w = prefixes(1, 2, 40, torch.float32)
    x = torch.randn(1, 2, 40, 40, device=DEVICE)
    dirty = x + torch.full((40, 40), float("inf"), device=DEVICE).triu(1)
    for a, b in zip(decay_rowcol(dirty, c, w, impl="triton"), decay_rowcol(x, c, w, impl="torch")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_impl():
    c, w = prefixes(1, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="impl"):
        decay_tiles(c, w, impl="cuda")


def reference_mix(c, w):
    """D^a D^m diag(w) by autograd through the decay products (the prefixes' differences exponentiated)."""
    la, lm = torch.diff(c, dim=-1, prepend=torch.zeros_like(c[..., :1])).unbind(0)
    return decay_products(la)[0] @ decay_products(lm)[0] * w[:, None, :]


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("length", [5, 71])
def test_decay_mix_values_and_gradients(monkeypatch, kernels, length):
    """decay_mix (the kernels forced on, or the torch path) against autograd, float64: the mix and the
    gradients with respect to the prefixes and the column weights."""
    if kernels:
        monkeypatch.setattr(decay_kernels, "kernel_ok", lambda *ts: True)
    c, w = prefixes(2, 3, length, torch.float64, seed=1)
    w = w[0]
    probe = torch.randn(3, length, length, dtype=torch.float64, device=DEVICE)
    grads = []
    for fn in (decay_mix, reference_mix):
        cc, ww = c.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(cc, ww)
        grads.append((out.detach(), *torch.autograd.grad((out * probe).sum(), (cc, ww))))
    for name, a, b in zip(("mix", "dc", "dw"), *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_decay_mix_gradcheck():
    c, w = (t.cpu() for t in prefixes(2, 2, 6, torch.float64, seed=2))
    assert torch.autograd.gradcheck(decay_mix, (c.requires_grad_(), w[0].clone().requires_grad_()))


def test_decay_mix_without_weights():
    c = prefixes(2, 2, 9, torch.float64)[0].cpu()
    torch.testing.assert_close(decay_mix(c), reference_mix(c, torch.ones_like(c[0])))


@pytest.mark.gpu
def test_lm_size_gpu():
    """The kernels at a language model's size (N = 128 copies, L = 256), float32 on CUDA, against
    the torch path in float64: mix and gradients."""
    c, w = (t.cpu() for t in prefixes(2, 128, 256, torch.float64, seed=3))
    c, w = c * 0.05, w[0]  # decays near a language model's (mix entries spread over the whole row)
    probe = torch.randn(128, 256, 256, dtype=torch.float64)
    results = []
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
        cc = c.to(device, dtype).requires_grad_()
        ww = w.to(device, dtype).requires_grad_()
        out = decay_mix(cc, ww)
        grads = torch.autograd.grad((out * probe.to(device, dtype)).sum(), (cc, ww))
        results.append([t.detach().double().cpu() for t in (out, *grads)])
    for name, a, b in zip(("mix", "dc", "dw"), *results):
        scale = a.abs().max().clamp_min(1.0)
        assert ((b - a).abs().max() / scale).item() < 1e-4, name
