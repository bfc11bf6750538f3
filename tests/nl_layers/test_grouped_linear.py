"""grouped_linear (weight gradients split along the rows) == the plain batched product, and the
positional-only Function base under eager, torch.func and compile."""

import pytest
import torch

from nl_layers._modules import l2_normalize
from nl_layers.ops.fast_weights import grouped_linear as gl


@pytest.mark.parametrize("rows", [1, 7, 12, 40])
@pytest.mark.parametrize("shared", [False, True])
def test_grouped_linear_matches_bmm(monkeypatch, rows, shared):
    monkeypatch.setattr(gl, "ROWS_PER_SLICE", 4)  # slices engage at these small sizes (12 rows: 3 slices)
    torch.manual_seed(0)
    g, d, o = 3, 5, 6
    base = torch.randn(rows, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(g, o, d, dtype=torch.float64, requires_grad=True)
    x_of = (lambda b: b.expand(g, -1, -1)) if shared else (lambda b: b.unsqueeze(0).repeat(g, 1, 1) * torch.arange(1, g + 1.0, dtype=b.dtype)[:, None, None])
    gy = torch.randn(g, rows, o, dtype=torch.float64)
    outs = []
    for f in (gl.grouped_linear, lambda x, w: x @ w.transpose(1, 2)):
        y = f(x_of(base), w)
        outs.append((y, *torch.autograd.grad(y, (base, w), gy)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_slices_divide_the_rows():
    assert gl.slices(100) == 1 and gl.slices(8192 * 4) == 16 and gl.slices(3 * 2048 + 6) == 3 and gl.slices(3 * 2048 + 1) == 1
    assert all(m % gl.slices(m) == 0 for m in range(1, 20000, 97))


def test_grouped_linear_under_autocast_keeps_input_dtypes():
    x = torch.randn(2, 8, 4, requires_grad=True)
    w = torch.randn(2, 3, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gl.grouped_linear(x, w)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == w.grad.dtype == torch.float32


def test_function_base_under_func_grad_and_compile():
    x = torch.randn(3, 5, dtype=torch.float64)
    ref = torch.func.grad(lambda z: (z / z.norm(dim=-1, keepdim=True)).pow(3).sum())(x)
    torch.testing.assert_close(torch.func.grad(lambda z: l2_normalize(z).pow(3).sum())(x), ref)
    xr = x.clone().requires_grad_()
    torch.compile(lambda z: l2_normalize(z).pow(3).sum(), fullgraph=True, backend="eager")(xr).backward()
    torch.testing.assert_close(xr.grad, ref)


def test_an_added_term_joins_the_product_with_its_gradient():
    """grouped_linear(x, w, add) and apply_weight(w, x, add) (one weight, or one per copy) equal
    add + x W^T, with the gradients of x, w and add."""
    torch.manual_seed(0)
    x, add = torch.randn(3, 7, 5, dtype=torch.float64), torch.randn(3, 7, 6, dtype=torch.float64)
    for f, w in ((gl.grouped_linear, torch.randn(3, 6, 5, dtype=torch.float64)),
                 (lambda x, w, a: gl.apply_weight(w, x, a), torch.randn(3, 6, 5, dtype=torch.float64)),
                 (lambda x, w, a: gl.apply_weight(w, x, a), torch.randn(6, 5, dtype=torch.float64))):
        leaves = [t.clone().requires_grad_() for t in (x, w, add)]
        y, ref = f(*leaves), leaves[2] + leaves[0] @ leaves[1].transpose(-1, -2)
        gy = torch.randn_like(ref)
        torch.testing.assert_close(y, ref)
        for a, b in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, leaves, gy)):
            torch.testing.assert_close(a, b)
