"""The fused token-form read (nl_layers/ops/fast_weights/read_kernel.py) against the torch expression:
outputs and every gradient, in Triton's interpreter on the CPU (forced) and at LM size on a GPU."""

import importlib

import pytest
import torch

from nl_layers.ops.fast_weights import read_kernel
from nl_layers.ops.fast_weights.read_kernel import (
    rank1_read_tokens,
    rank1_read_tokens_reference,
    rank1_read_tokens_triton,
)

from ..example_imports import run_examples

triton = pytest.importorskip("triton")


def _inputs(n, length, i, o, with_out, device="cpu", dtype=torch.float32):
    """Lower-triangular mixing (as TokenPlan gives) and random factors, all requiring gradients."""
    mixing = torch.randn(n, length, length, device=device).tril()
    left = torch.randn(n, length, o, device=device, dtype=dtype)
    right, x = (torch.randn(n, length, i, device=device, dtype=dtype) / i**0.5 for _ in range(2))
    out = torch.randn(n, length, o, device=device, dtype=dtype) if with_out else None
    ins = [mixing, left, right, x] + ([out] if with_out else [])
    return [t.requires_grad_() for t in ins]


def _value_and_grads(fn, ins, g):
    y = fn(*ins[:4], ins[4] if len(ins) > 4 else None)
    return [y] + list(torch.autograd.grad(y, ins, g))


def _compare(ins, blocks=None, rtol=1e-4, precise=None):
    """Kernel vs the reference (float64 by default): y, then the gradients of mixing, left, right, x(, out)."""
    y = rank1_read_tokens_triton(*ins[:4], ins[4] if len(ins) > 4 else None, blocks=blocks)
    g = torch.randn_like(y)
    got = [y] + list(torch.autograd.grad(y, ins, g))
    ref_ins = [t.detach().double().requires_grad_() for t in ins] if precise is None else precise
    want = _value_and_grads(rank1_read_tokens_reference, ref_ins, g.double())
    below = torch.ones_like(ins[0], dtype=torch.bool).tril()
    assert (got[1][~below] == 0).all(), "dmixing must be zero above the diagonal"
    got[1], want[1] = got[1][below], want[1][below]
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == ins[k - 1 if k else 3].dtype
        scale = b.abs().max().item() + 1e-12
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * scale, msg=lambda m, k=k: f"output {k}: {m}")


CASES = [  # (n, L, i, o, with_out, blocks)
    (2, 1, 3, 8, False, (16, 16)),
    (3, 5, 12, 3, True, None),
    (2, 17, 8, 12, False, (16, 16)),
    (2, 17, 3, 3, True, (32, 16)),
    (2, 40, 12, 8, True, (16, 16)),
    (3, 40, 3, 12, False, (16, 32)),
]


@pytest.mark.parametrize("n, length, i, o, with_out, blocks", CASES)
def test_kernel_matches_reference_interpreted(n, length, i, o, with_out, blocks):
    _compare(_inputs(n, length, i, o, with_out), blocks=blocks)


def test_kernel_strided_inputs_interpreted():
    """Non-contiguous views (a transposed x, an expanded out) go through the strides."""
    mixing, left, right = _inputs(2, 17, 8, 12, False)[:3]
    x = torch.randn(2, 8, 17).transpose(1, 2).requires_grad_()
    out = torch.randn(1, 17, 12).requires_grad_()
    ins = [mixing, left, right, x, out.expand(2, 17, 12)]
    y = rank1_read_tokens_triton(*ins, blocks=(16, 16))
    ref = rank1_read_tokens_reference(*ins)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    dk = torch.autograd.grad(y.square().sum(), [x, out])
    dr = torch.autograd.grad(ref.square().sum(), [x, out])
    for a, b in zip(dk, dr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_kernel_autocast_half_interpreted():
    """Under autocast the factors run in the autocast dtype (mixing stays float32); gradients come
    back to the float32 leaves. float16: the interpreter's bfloat16 tl.dot is not usable (it returns
    garbage for any bfloat16 operands in triton 3.9), so bfloat16 is checked on the GPU only."""
    ins = _inputs(2, 40, 12, 8, True)
    with torch.autocast("cpu", dtype=torch.float16):
        y = rank1_read_tokens(*ins, impl="triton")
    assert y.dtype == torch.float16
    g = torch.randn_like(y, dtype=torch.float32)
    got = [y] + list(torch.autograd.grad(y, ins, g.half()))
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    want = _value_and_grads(rank1_read_tokens_reference, ref_ins, g.double())
    for k, (a, b) in enumerate(zip(got, want)):
        assert k == 0 or a.dtype == torch.float32
        a, b = (a.tril(), b.tril()) if k == 1 else (a, b)
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err < 5e-3, f"output {k}: relative error {err}"


def test_dispatch_cpu_takes_torch_path(monkeypatch):
    """On CPU tensors "auto" never launches a kernel; "triton" does; bad impl names are refused."""
    calls = []
    monkeypatch.setattr(read_kernel, "rank1_read_tokens_triton", lambda *a, **k: calls.append(1))
    ins = _inputs(2, 5, 3, 4, True)
    y = rank1_read_tokens(*ins)
    assert not calls
    torch.testing.assert_close(y, rank1_read_tokens_reference(*ins))
    rank1_read_tokens(*ins, impl="triton")
    assert calls == [1]
    with pytest.raises(ValueError):
        rank1_read_tokens(*ins, impl="cuda")
    scan = importlib.import_module("nl_layers.ops.fast_weights.scan")
    assert scan.rank1_read_tokens is rank1_read_tokens  # engines' import keeps working


def test_docstring_example():
    result = run_examples(read_kernel, extraglobs={"torch": torch})
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_lm_size_gpu(dtype, monkeypatch):
    """LM size (N = 32 x 4 heads, L = 256, i = 96, o = 192): fp32 with TF32 off (tight), bf16 (loose)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ins = _inputs(128, 256, 96, 192, True, device="cuda", dtype=dtype)
    assert rank1_read_tokens(*ins).shape == (128, 256, 192)
    _compare(ins, rtol=1e-4 if dtype == torch.float32 else 3e-2)
    # "auto" on CUDA runs the kernel: the same values as the forced one
    torch.testing.assert_close(rank1_read_tokens(*ins), rank1_read_tokens_triton(*ins), rtol=0, atol=0)
