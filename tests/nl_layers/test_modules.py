"""nl_layers._modules: the hand-written backwards of l2_normalize and squared_norm equal autograd's."""

import pytest
import torch
import torch.nn.functional as F

from nl_layers._modules import l2_normalize, squared_norm

from .helpers import max_diff


def _rows():
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    x[0, 1] = 0.0  # a zero row: the norm is clamped to eps
    x[1, 2] = 1e-8  # a tiny row: clamped too
    return x


@pytest.mark.parametrize("eps", [1e-6, 1e-12])
def test_l2_normalize_equals_f_normalize_values_and_gradients(eps):
    x = _rows().requires_grad_()
    y = l2_normalize(x, eps)
    ref = F.normalize(x, dim=-1, eps=eps)
    assert max_diff(y, ref) < 1e-15
    w = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    (h,) = torch.autograd.grad((ref * w).sum(), x)
    assert max_diff(g, h) < 1e-9 * float(h.abs().max())
    assert torch.autograd.gradcheck(lambda t: l2_normalize(t, eps), (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),))


def test_l2_normalize_of_a_noncontiguous_view_and_under_compile():
    x = torch.randn(5, 7, 4).transpose(0, 1)
    assert max_diff(l2_normalize(x), F.normalize(x, dim=-1, eps=1e-6)) < 1e-6
    x = torch.randn(3, 8, requires_grad=True)
    compiled = torch.compile(lambda t: l2_normalize(t).square().sum(), fullgraph=True, backend="aot_eager")
    (g,) = torch.autograd.grad(compiled(x), x)
    (h,) = torch.autograd.grad(F.normalize(x, dim=-1, eps=1e-6).square().sum(), x)
    assert max_diff(g, h) < 1e-6


def test_squared_norm_equals_the_sum_of_squares_with_gradients():
    x = _rows().requires_grad_()
    assert max_diff(squared_norm(x), x.square().sum(-1)) < 1e-13
    assert torch.autograd.gradcheck(squared_norm, (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),))
    assert torch.autograd.gradgradcheck(squared_norm, (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),))


def test_silu_and_slope_equals_autograd_values_and_gradients():
    from nl_layers.memory.mlp import silu_and_slope

    z = (torch.randn(7, 9, dtype=torch.float64) * 4).requires_grad_()
    h, slope = silu_and_slope(z)
    s = torch.sigmoid(z)
    h_ref, slope_ref = z * s, s * (1 + z * (1 - s))  # the autograd form
    assert max_diff(h, h_ref) < 1e-15 and max_diff(slope, slope_ref) < 1e-15
    w1, w2 = torch.randn_like(h), torch.randn_like(h)
    (g,) = torch.autograd.grad((h * w1 + slope * w2).sum(), z, retain_graph=True)
    (g_ref,) = torch.autograd.grad((h_ref * w1 + slope_ref * w2).sum(), z, retain_graph=True)
    assert max_diff(g, g_ref) < 1e-13
    (g_one,) = torch.autograd.grad(slope.sum(), z)  # one output unused
    assert max_diff(g_one, torch.autograd.grad(slope_ref.sum(), z)[0]) < 1e-13
    assert torch.autograd.gradcheck(silu_and_slope, (torch.randn(4, 3, dtype=torch.float64, requires_grad=True),))
