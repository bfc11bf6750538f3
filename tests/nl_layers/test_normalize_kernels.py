"""Row-wise L2 normalisation: the Triton kernels (forced: compiled on a CUDA machine, the interpreter
on a CPU one) against the torch paths, and the layers' normalising nodes with the kernels forced on
against autograd through F.normalize (gradcheck in float64)."""

import pytest
import torch
import torch.nn.functional as F

from nl_layers.ops import normalize_kernels as nk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the forced kernels run
EPS = 1e-6


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEVICE)


def _tol(dtype):
    return {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(7,), (37, 5), (2, 5, 3, 7), (2, 2, 2, 3, 5), (3, 1), (4, 0)])
def test_kernels_match_torch(shape, dtype):
    """Values, norms and the backward; a zero row (clamped norm: no y y^T term), over three leading
    dims (a copy), rows not a multiple of a program's block, width 1 and 0."""
    u = _rand(*shape, dtype=dtype)
    if u.dim() > 1 and u.shape[-1]:
        u[(0,) * (u.dim() - 1)] = 0.0
    g = _rand(*shape, dtype=dtype, seed=1)
    y, n = nk.normalize_rows(u, EPS, impl="triton")
    yr, nr = nk.normalize_rows(u, EPS, impl="torch")
    assert y.dtype == n.dtype == dtype and n.shape == nr.shape == (*shape[:-1], 1)
    tol = _tol(dtype)
    torch.testing.assert_close(y, yr, rtol=tol, atol=tol)
    torch.testing.assert_close(n, nr, rtol=tol, atol=tol)
    du = nk.normalize_rows_backward(g, yr, nr, EPS, impl="triton")
    torch.testing.assert_close(du, nk.normalize_rows_backward(g, yr, nr, EPS, impl="torch"), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_inputs_and_outputs(dtype):
    """(B, T, H, d) rows into a head-major (B, H, T, d) buffer and back, as the layers call them; an
    ``out`` without a unit last stride (written through a copy)."""
    u = _rand(2, 6, 3, 5, dtype=dtype)
    buf = torch.full((2, 3, 6, 5), float("nan"), dtype=dtype, device=DEVICE)
    y, n = nk.normalize_rows(u, EPS, out=buf.transpose(1, 2), impl="triton")
    assert y.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf.transpose(1, 2), F.normalize(u, dim=-1, eps=EPS))
    g = _rand(2, 3, 6, 5, dtype=dtype, seed=2).transpose(1, 2)
    du = torch.empty(2, 6, 3, 5, dtype=dtype, device=DEVICE)
    nk.normalize_rows_backward(g, y, n, EPS, out=du, impl="triton")
    leaf = u.clone().requires_grad_()
    torch.testing.assert_close(du, torch.autograd.grad(F.normalize(leaf, dim=-1, eps=EPS), leaf, g)[0])
    odd = torch.empty(5, 2, 6, 3, dtype=dtype, device=DEVICE).permute(1, 2, 3, 0)  # last stride 36
    nk.normalize_rows(u, EPS, out=odd, impl="triton")
    torch.testing.assert_close(odd, F.normalize(u, dim=-1, eps=EPS))


def test_bad_impl():
    u = torch.ones(2, 3)
    with pytest.raises(ValueError, match="impl"):
        nk.normalize_rows(u, EPS, impl="cuda")
    with pytest.raises(ValueError, match="impl"):
        nk.normalize_rows_backward(u, u, u[:, :1], EPS, impl="cuda")


@pytest.fixture
def kernels_forced(monkeypatch):
    """The layers' "auto" dispatch takes the kernels for any tensors (the interpreter on CPU)."""
    monkeypatch.setattr(nk, "kernel_ok", lambda *ts: True)


def test_l2_normalize_with_the_kernels(kernels_forced):
    from nl_layers._modules import l2_normalize

    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, device=DEVICE)
    x[0, 1, 2] = 0.0
    x.requires_grad_()
    torch.testing.assert_close(l2_normalize(x), F.normalize(x, dim=-1, eps=EPS))
    g = torch.randn_like(x)
    torch.testing.assert_close(torch.autograd.grad(l2_normalize(x), x, g)[0],
                               torch.autograd.grad(F.normalize(x, dim=-1, eps=EPS), x, g)[0])
    assert torch.autograd.gradcheck(l2_normalize, (torch.randn(3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True),))


def test_normalized_heads_with_the_kernels(kernels_forced):
    from nl_layers._modules import normalized_heads

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w_q = torch.randn(6, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def ref(x, w_q):
        u = torch.cat([x, x @ w_q.t()], -1).view(2, 3, 2, 2, 3)
        y = F.normalize(u, dim=-1, eps=EPS).permute(2, 0, 3, 1, 4)  # (2, B, H, T, d)
        return y[0].reshape(4, 3, 3), y[1].reshape(4, 3, 3)

    ours, want = normalized_heads(x, w_q, 2), ref(x, w_q)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda x, w: normalized_heads(x, w, 2), (x, w_q))


def test_pair_normalize_with_the_kernels(kernels_forced):
    from nl_layers.self_modifying import _PairNormalize

    y = torch.randn(4, 3, 5, dtype=torch.float64, device=DEVICE)
    y[3, 1] = 0.0
    y.requires_grad_()
    k, v = _PairNormalize.apply(y, EPS)[:2]
    torch.testing.assert_close(torch.cat([k, v]), F.normalize(y, dim=-1, eps=EPS))
    assert torch.autograd.gradcheck(lambda t: _PairNormalize.apply(t, EPS)[:2], (y,))


@pytest.mark.gpu
def test_auto_takes_the_kernels_on_cuda(monkeypatch):
    """On CUDA float32 "auto" runs the kernels (the torch path raises if called) and agrees with it."""
    u = torch.randn(64, 96, device="cuda")
    want = nk.normalize_rows_torch(u, EPS)
    g = torch.randn_like(u)
    want_du = nk.normalize_rows_backward_torch(g, *want, EPS)

    def fail(*a, **k):
        raise AssertionError("torch path taken")

    monkeypatch.setattr(nk, "normalize_rows_torch", fail)
    monkeypatch.setattr(nk, "normalize_rows_backward_torch", fail)
    y, n = nk.normalize_rows(u, EPS)
    torch.testing.assert_close(y, want[0])
    torch.testing.assert_close(nk.normalize_rows_backward(g, y, n, EPS), want_du)
