"""Symmetric products (Newton-Schulz's m x m products, delta momentum's G^T G): the Triton kernel that
computes the upper triangle of tiles and mirrors it, against torch.baddbmm (the interpreter on a CPU,
compiled on CUDA), and the iterations built on it against the standard form."""

import pytest
import torch

from deepopt.kernels.launch import interpreting
from deepopt.levels.orthogonal.batched import (_use_symmetric, gram_newton_schulz, newton_schulz_batched,
                                               ns_flops)
from deepopt.levels.orthogonal.symmetric import flop_fraction, symmetric_baddbmm, uses_kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _kernel_runs_here():
    if DEVICE == "cpu" and not interpreting():
        pytest.skip("the kernel runs on CUDA or in Triton's interpreter (TRITON_INTERPRET=1)")


def reference(left, right, alpha=1.0, beta=0.0, add=None):
    return symmetric_baddbmm(left.float(), right.float(), alpha=alpha, beta=beta,
                             add=None if add is None else add.float(), impl="reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(16, 16), (40, 90), (33, 7), (130, 64)])
def test_kernel_equals_baddbmm(dtype, m, k):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2 if dtype == torch.float16 else 6e-2
    x = torch.randn(3, m, k, device=DEVICE, generator=g).to(dtype)
    xt = torch.randn(3, k, m, device=DEVICE, generator=g).to(dtype).mT  # a transposed view (tall inputs)
    a = (x.float() @ x.float().mT / k).to(dtype)
    b = (2.0 * a.float() + 3.0 * a.float() @ a.float()).to(dtype)  # a polynomial in a: b a is symmetric
    nan = torch.full((3, m, m), float("nan"), device=DEVICE, dtype=dtype)
    cases = [((x, x), {}), ((x, x), dict(alpha=0.5)), ((xt, xt), {}), ((x, x), dict(add=nan, beta=0.0)),
             ((b, a.mT), dict(alpha=1.5, beta=-0.7, add=a))]
    for (left, right), kw in cases:
        out = symmetric_baddbmm(left, right, impl="triton", **kw)
        ref = reference(left, right, **kw)
        assert out.dtype == dtype and out.shape == (3, m, m) and out.is_contiguous()
        scale = ref.abs().amax().clamp(min=1.0)
        assert float((out.float() - ref).abs().amax() / scale) < tol, (kw, dtype, m, k)


def test_kernel_mirrors_its_tiles():
    """Every tile below the diagonal is the stored transpose of its mirror (bit for bit)."""
    x = torch.randn(2, 70, 24, device=DEVICE)
    out = symmetric_baddbmm(x, x, impl="triton")
    lower = torch.tril(torch.ones(70, 70, dtype=torch.bool, device=DEVICE), diagonal=-64)  # off the diagonal tiles
    assert torch.equal(out[:, lower], out.mT[:, lower])


def test_large_batches_go_in_parts_and_empty_inputs_work(monkeypatch):
    from deepopt.levels.orthogonal import symmetric

    monkeypatch.setattr(symmetric, "MAX_BATCH", 2)  # CUDA's grid limit is 65535 matrices a launch
    x = torch.randn(5, 20, 12, device=DEVICE)
    a = x @ x.mT
    out = symmetric_baddbmm(x, x, alpha=0.5, beta=2.0, add=a, impl="triton")
    torch.testing.assert_close(out, 2.0 * a + 0.5 * x @ x.mT, rtol=1e-5, atol=1e-5)
    assert symmetric_baddbmm(x[:0], x[:0], impl="triton").shape == (0, 20, 20)
    z = torch.zeros(2, 8, 0, device=DEVICE)
    assert torch.equal(symmetric_baddbmm(z, z, impl="triton"), torch.zeros(2, 8, 8, device=DEVICE))


def test_bad_arguments():
    x = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="left and right"):
        symmetric_baddbmm(x, torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="add must be"):
        symmetric_baddbmm(x, x, add=torch.randn(2, 8, 7), beta=1.0)
    with pytest.raises(ValueError, match="impl"):
        symmetric_baddbmm(x, x, impl="fast")
    assert uses_kernel(x, "triton") and not uses_kernel(x, "reference")


@pytest.mark.parametrize("tall", [False, True])
@pytest.mark.parametrize("cols", [48, 160])
def test_iterations_on_symmetric_products_equal_the_standard_form(tall, cols):
    """float32 products (IEEE): the standard and Gram forms on symmetric products against the standard
    form on full products."""
    torch.manual_seed(1)
    x = torch.randn(3, 48, cols, device=DEVICE)
    x = x.mT.contiguous() if tall else x
    ref = newton_schulz_batched(x.double(), method="standard").float()
    std = newton_schulz_batched(x, method="standard", symmetric=True)
    gram = gram_newton_schulz(x, symmetric=True)
    torch.testing.assert_close(std, ref, rtol=0, atol=2e-4)
    torch.testing.assert_close(gram, ref, rtol=0, atol=2e-4)
    assert std.shape == gram.shape == x.shape and gram.is_contiguous()


@pytest.mark.gpu
def test_symmetric_products_keep_the_16_bit_rounding_error():
    """In bf16 (standard form) and float16 (Gram form) the kernel rounds like the full product: the
    error against float64 stays within 10% of the full products' (compiled only: Triton's interpreter
    rounds float32 to bfloat16 towards zero)."""
    torch.manual_seed(2)
    x = torch.randn(4, 64, 256, dtype=torch.float64)
    ref = newton_schulz_batched(x, method="standard")
    x16 = x.bfloat16().to(DEVICE)

    def err(o):
        return float((o.double().cpu() - ref).norm() / ref.norm())

    for form in (lambda s: newton_schulz_batched(x16, method="standard", symmetric=s),
                 lambda s: gram_newton_schulz(x16, symmetric=s)):
        assert err(form(True)) <= 1.1 * err(form(False))


def test_dispatch_and_flops():
    assert _use_symmetric("auto", "cuda") and _use_symmetric("gram", "cuda") and _use_symmetric("auto")
    assert not _use_symmetric("standard", "cuda") and not _use_symmetric("auto", "cpu")
    m = 2048
    f = flop_fraction(m)
    assert f == (m + 1) / (2 * m)
    assert ns_flops(m, m, method="standard") == 5 * 6 * m**3
    assert ns_flops(m, m, method="auto") == 5 * (2 * m**3 * (1 + f) + 2 * m**3 * f)
    assert ns_flops(m, 4 * m, method="auto") == 8 * m**3 * (1 + f) * 2 + 28 * m**3 * f


def test_kernel_compiles_for_sm90_in_every_configuration(monkeypatch):
    """The launches of the interpreter run (bfloat16 and float32, with and without ``add``), compiled for
    sm90 as on a GPU: bfloat16 products on tensor cores (``F32_DOT`` off) at each autotuner tile
    (float16 differs only in the pointers' dtype), float32 at the interpreter's tile."""
    if not interpreting():
        pytest.skip("records launches through Triton's interpreter (a CPU run)")
    from deepopt.levels.orthogonal.triton_kernels import CONFIGS

    from ..triton_compile import compile_failures, record

    def calls():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 40, 24).to(dtype)
            a = symmetric_baddbmm(x, x, impl="triton")
            symmetric_baddbmm(a, a.mT, alpha=2.0, beta=-1.0, add=a, impl="triton")

    launches = record(monkeypatch, calls)
    assert sorted(k["sig"]["L"] for k in launches) == ["*bf16", "*bf16", "*fp32", "*fp32"]
    gpu = [k for k in launches if k["sig"]["L"] == "*fp32"]
    for k in launches:
        if k["sig"]["L"] == "*bf16":
            gpu += [dict(k, consts=dict(k["consts"], **cfg.kwargs, F32_DOT=False)) for cfg in CONFIGS]
    failed = compile_failures(gpu)
    assert not failed, "\n".join(failed)
