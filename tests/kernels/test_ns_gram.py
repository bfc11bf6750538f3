"""The Gram form of Newton-Schulz against torch's own bf16 iteration on the same inputs (benign and
ill-conditioned), its float64 agreement with the standard form, and the ns_method dispatch."""

import pytest
import torch

import deepopt
from benchmarks.ns_accuracy import FAMILIES, exact, inputs, main, metrics, torch_ns
from deepopt.levels.orthogonal import NS_COEFFICIENTS
from deepopt.levels.orthogonal.batched import (_use_gram, gram_newton_schulz, newton_schulz_batched,
                                               newton_schulz_many, ns_flops, orthogonalize_one)


@pytest.mark.parametrize("shape", [(128, 512), (512, 128), (96, 96)])
def test_gram_form_is_more_accurate_than_torch_on_every_family(shape):
    for name, x in inputs(*shape, seed=1).items():
        o64 = exact(x)
        ref, ex = metrics(torch_ns(x), x, o64), metrics(o64, x, o64)
        ours = metrics(newton_schulz_many([x], method="gram")[0], x, o64)
        # rounding error (the like-with-like measure): at most half of torch's (measured 5-10x less)
        assert ours["dev"] <= 0.5 * ref["dev"], (shape, name, ours, ref)
        # orthogonality on the orthogonalized directions: the exact iteration's, at least as closely as torch's
        assert abs(ours["band"] - ex["band"]) <= abs(ref["band"] - ex["band"]) + 2e-3, (shape, name, ours, ref, ex)
        # raw orthogonality error: torch's within 1% (lower than torch's only through noise in null directions)
        assert ours["orth"] <= ref["orth"] * 1.01, (shape, name, ours, ref)


@pytest.mark.parametrize("tall", [False, True])
@pytest.mark.parametrize("steps", [1, 3, 5, 7])
def test_gram_form_equals_the_standard_form_in_float64(tall, steps):
    x = torch.randn(3, 24, 80, dtype=torch.float64)
    x = x.mT.contiguous() if tall else x
    g = gram_newton_schulz(x, NS_COEFFICIENTS, steps)
    s = newton_schulz_batched(x, NS_COEFFICIENTS, steps, method="standard")
    assert g.shape == x.shape and g.is_contiguous()
    torch.testing.assert_close(g, s, rtol=0, atol=1e-12)


def test_gram_form_keeps_the_dtype_and_handles_zero_and_tiny_inputs():
    x = torch.randn(2, 16, 64).bfloat16()
    assert gram_newton_schulz(x).dtype == torch.bfloat16
    z = gram_newton_schulz(torch.zeros(1, 8, 32).bfloat16())
    assert torch.equal(z, torch.zeros_like(z))
    unit = torch.randn(1, 16, 64)
    for scale in (2.0**-20, 2.0**40):  # outside float16's range before the normalization (powers of 2: exact)
        o = gram_newton_schulz((unit * scale).bfloat16()).float()
        torch.testing.assert_close(o, gram_newton_schulz(unit.bfloat16()).float(), rtol=0, atol=0)


def test_flops():
    m = 2048
    assert ns_flops(m, 4 * m) == 5 * (4 * m * m * 4 * m + 2 * m**3)
    f = (m + 1) / (2 * m)  # symmetric products: the upper triangle
    assert ns_flops(m, 4 * m, method="gram") == 8 * m * m * 4 * m * (1 + f) / 2 + 28 * m**3 * f
    assert ns_flops(m, 4 * m, method="gram") / ns_flops(m, 4 * m) == pytest.approx(38 / 90, rel=1e-3)
    assert ns_flops(m, m, method="auto") / ns_flops(m, m) == pytest.approx(2 / 3, rel=1e-3)  # square: standard form


@pytest.fixture(params=[True, False], ids=["native_bf16", "avx2"])
def native_bf16(request, monkeypatch):
    """Both kinds of CPU: with native bf16 matmuls (AVX512-BF16/AMX) and without (AVX2)."""
    from deepopt.levels import precision

    monkeypatch.setattr(precision, "_cpu_capabilities", lambda: {"avx512_bf16": request.param})
    return request.param


def test_auto_takes_the_gram_form_on_cuda_wide_matrices_only(native_bf16):
    assert _use_gram(64, 128, "auto", "cuda") and not _use_gram(64, 127, "auto", "cuda")
    assert not _use_gram(64, 256, "auto", "cpu") and _use_gram(64, 64, "gram", "cpu")
    assert not _use_gram(64, 256, "standard", "cuda")
    x = torch.randn(16, 64)
    # on the CPU auto is torch's iteration, in bf16 exactly where bf16 is native, in float32 elsewhere
    ref = torch_ns(x) if native_bf16 else orthogonalize_one(x, dtype=torch.float32, method="standard")
    assert torch.equal(orthogonalize_one(x, method="auto"), ref)
    assert torch.equal(newton_schulz_many([x], method="auto")[0], ref)
    assert torch.equal(orthogonalize_one(x, method="standard"), torch_ns(x))  # standard: torch's on every CPU
    assert not torch.equal(orthogonalize_one(x, method="gram"), torch_ns(x))


@pytest.mark.parametrize("name", ["MuonMemory", "M3"])
@pytest.mark.parametrize("impl", ["foreach", "reference"])
def test_optimizers_default_to_auto_and_gram_is_selectable(name, impl, native_bf16):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    g = torch.randn(16, 64)
    g = g.sign() * (1 + g.abs())  # |g| >= 1: M3's division by sqrt(V) amplifies no entry
    outs = {}
    for method in (None, "standard", "gram", "float32"):
        p = torch.nn.Parameter(w.clone())
        kw = {} if method is None else {"ns_dtype": torch.float32} if method == "float32" else {"ns_method": method}
        opt = deepopt.OPTIMIZERS[name]([p], lr=0.1, impl=impl, **kw)
        assert opt.param_groups[0]["ns_method"] == {None: "auto", "float32": "auto"}.get(method, method)
        p.grad = g.clone()
        opt.step()
        outs[method] = p.detach().clone()
    # CPU: auto is the standard form, in bf16 where it is native, else in float32
    assert torch.equal(outs[None], outs["standard" if native_bf16 else "float32"])
    step_std, step_gram = outs["standard"] - w, outs["gram"] - w
    rel = (step_gram - step_std).norm() / step_std.norm()
    assert 0 < rel < 0.05  # the same step up to rounding (bf16's ~1.5%)
    with pytest.raises(ValueError, match="ns_method"):
        deepopt.OPTIMIZERS[name]([torch.nn.Parameter(w.clone())], ns_method="fast")


def test_old_checkpoints_keep_the_standard_form():
    p = torch.nn.Parameter(torch.randn(4, 8))
    opt = deepopt.MuonMemory([p])
    sd = opt.state_dict()
    del sd["param_groups"][0]["ns_method"]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["ns_method"] == "standard"


def test_accuracy_script_smoke(capsys):
    out = main(["--device", "cpu", "--shapes", "32x64", "--families", "gauss,rankdef"])
    assert {r["family"] for r in out["accuracy"]} == {"gauss", "rankdef"} and out["times"] == []
    assert "rankdef" in capsys.readouterr().out
    assert set(FAMILIES) == set(inputs(8, 16))
