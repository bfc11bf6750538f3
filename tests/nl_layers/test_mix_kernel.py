"""The fused decay-mix kernels (nl_layers.ops.fast_weights.mix_kernel) against the torch reference.

1. Kernels forced (``DecayMixKernel`` at 16-wide tiles, so L = 17..70 spans 2..5 blocks; on CPU in
   Triton's interpreter, set by conftest) == the float64 torch reference ``_DecayMix``: mix and
   dc through a random upstream g (lower-triangular and full), N in {1, 3}, L in {1, 2, 5, 17,
   40, 70}, realistic log gates (log a in [-0.2, 0], log m in [-2, 0]) and extreme ones (log a = 0,
   log m near -30), float32 (1e-5 relative to the largest entry) and float64 (1e-12).
2. The dispatcher: torch on CPU by default, the kernels with impl="triton", errors for a bad impl
   or a CPU tensor outside the interpreter.
3. GPU: N = 256, L = 256 at the default tiles, float32 and float64 kernels against float64.
"""

import importlib

import pytest
import torch

from nl_layers.ops.fast_weights.scan import _DecayMix, decay_mix

from ..example_imports import run_examples

mix_kernel = pytest.importorskip("nl_layers.ops.fast_weights.mix_kernel")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the interpreter (conftest)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _prefixes(n, length, gates, dtype, device=DEVICE):
    if gates == "realistic":
        la, lm = -0.2 * torch.rand(n, length, dtype=torch.float64), -2 * torch.rand(n, length, dtype=torch.float64)
    else:  # no decay, momentum that forgets at once: D^m ~ identity, D^a all ones
        la, lm = torch.zeros(n, length, dtype=torch.float64), -30 + torch.rand(n, length, dtype=torch.float64)
    return torch.stack([la, lm]).cumsum(-1).to(device=device, dtype=dtype)


def _rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def _check(c, block=None, tol=None):
    """Kernel mix and dc (lower and full g) against the float64 reference at the same c."""
    tol = tol or TOL[c.dtype]
    ref_c = c.detach().double().requires_grad_()
    ref = _DecayMix.apply(ref_c)[0]
    kc = c.detach().clone().requires_grad_()
    mix = mix_kernel.DecayMixKernel.apply(kc, block)
    assert mix.dtype == c.dtype and mix.shape == ref.shape
    assert _rel(mix, ref) < tol
    assert torch.equal(mix.triu(1), torch.zeros_like(mix))  # exact zeros above the diagonal
    g = torch.randn(ref.shape, dtype=torch.float64, device=c.device)
    for upstream in (g.tril(), g):  # only the lower triangle matters, to both
        want = torch.autograd.grad(ref, ref_c, upstream, retain_graph=True)[0]
        got = torch.autograd.grad(mix, kc, upstream.to(c.dtype), retain_graph=True)[0]
        assert got.dtype == c.dtype
        if c.shape[-1] == 1:
            assert torch.equal(got, torch.zeros_like(got))
        else:
            assert _rel(got, want) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gates", ["realistic", "extreme"])
@pytest.mark.parametrize("length", [1, 2, 5, 17, 40, 70])
def test_kernel_equals_reference(length, gates, dtype):
    for n in (1, 3):
        _check(_prefixes(n, length, gates, dtype), block=16)


def test_kernel_on_a_strided_upstream_gradient():
    c = _prefixes(2, 20, "realistic", torch.float32).requires_grad_()
    g = torch.randn(2, 20, 20, device=DEVICE).transpose(-1, -2)  # not contiguous
    got = torch.autograd.grad(mix_kernel.DecayMixKernel.apply(c, 16), c, g)[0]
    want = torch.autograd.grad(_DecayMix.apply(c)[0], c, g)[0]
    assert _rel(got, want.double()) < 1e-5


def test_dispatch_takes_torch_on_cpu_by_default_and_the_kernel_when_asked():
    c = _prefixes(2, 9, "realistic", torch.float32, device="cpu").requires_grad_()
    assert type(decay_mix(c).grad_fn).__name__ == "_DecayMixBackward"
    assert type(decay_mix(c, impl="torch").grad_fn).__name__ == "_DecayMixBackward"
    got = decay_mix(c, impl="triton")  # the interpreter on CPU (conftest)
    assert type(got.grad_fn).__name__ == "DecayMixKernelBackward"
    assert _rel(got, decay_mix(c).double()) < 1e-5


def test_dispatch_errors(monkeypatch):
    c = _prefixes(1, 4, "realistic", torch.float32, device="cpu")
    with pytest.raises(ValueError, match="impl"):
        decay_mix(c, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        decay_mix(c, impl="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_at_training_size_on_gpu(dtype):
    c = _prefixes(256, 256, "realistic", dtype, device="cuda")
    assert type(decay_mix(c.requires_grad_()).grad_fn).__name__ == "DecayMixKernelBackward"  # auto on CUDA
    _check(c.detach(), tol=5e-5 if dtype == torch.float32 else 1e-11)


@pytest.mark.parametrize("name", ["nl_layers.ops.fast_weights.mix_kernel", "nl_layers.ops.fast_weights.scan"])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = run_examples(module, extraglobs={"torch": torch})
    assert result.failed == 0 and result.attempted > 0
