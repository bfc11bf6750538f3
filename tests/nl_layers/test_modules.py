"""nl_layers._modules: the hand-written backwards of l2_normalize and squared_norm equal autograd's."""

import pytest
import torch
import torch.nn.functional as F

from nl_layers._modules import factored_grad_sq_norm, l2_normalize, squared_norm

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


def _reference_grad_sq_norm(pairs):
    """The expression factored_grad_sq_norm replaces (as AnalyticEngine.segment had it)."""
    return sum(squared_norm(left) * squared_norm(right) for left, right in pairs)


@pytest.mark.parametrize("widths", [[(6, 6)], [(6, 9), (9, 6)], [(3, 5), (5, 3), (4, 4)]])
def test_factored_grad_sq_norm_equals_the_sum_of_products_values_and_gradients(widths):
    torch.manual_seed(0)
    pairs = [(torch.randn(2, 7, a, dtype=torch.float64), torch.randn(2, 7, b, dtype=torch.float64)) for a, b in widths]
    pairs[0][0][1, 3] = 0.0  # a zero factor
    leaves = [x.requires_grad_() for pair in pairs for x in pair]
    g, g_ref = factored_grad_sq_norm(pairs), _reference_grad_sq_norm(pairs)
    assert g.shape == g_ref.shape == (2, 7) and max_diff(g, g_ref) < 1e-12 * g_ref.abs().max()
    w = torch.randn(2, 7, dtype=torch.float64)
    grads = torch.autograd.grad((g * w).sum(), leaves)
    grads_ref = torch.autograd.grad((g_ref * w).sum(), leaves)
    for a, b in zip(grads, grads_ref):
        assert max_diff(a, b) < 1e-12 * b.abs().max()

    def flat(*xs):
        return factored_grad_sq_norm(list(zip(xs[0::2], xs[1::2])))

    small = [torch.randn(2, 3, a, dtype=torch.float64, requires_grad=True) for pair in widths for a in pair]
    assert torch.autograd.gradcheck(flat, tuple(small))


def test_factored_grad_sq_norm_partial_gradients_and_broadcast_fallback():
    left = torch.randn(3, 4, 5, requires_grad=True)
    right = torch.randn(3, 4, 6)  # no gradient wanted
    (gl,) = torch.autograd.grad(factored_grad_sq_norm([(left, right)]).sum(), left)
    (gl_ref,) = torch.autograd.grad(_reference_grad_sq_norm([(left, right)]).sum(), left)
    assert max_diff(gl, gl_ref) < 1e-5 * gl_ref.abs().max()
    shared = torch.randn(4, 6)  # broadcast over the leading 3: the reference expression
    assert max_diff(factored_grad_sq_norm([(left, shared)]), _reference_grad_sq_norm([(left, shared)])) == 0


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


@pytest.mark.parametrize("pick", ["factor", "extras", "both"])
def test_factored_grad_sq_norm_residuals_equal_the_sum_of_squared_norms(pick):
    """With ``residuals`` the node also gives sum ||e||^2 (e a factor, reusing its norm, or an extra
    tensor): values and gradients as the separate expressions, through either output or both."""
    torch.manual_seed(1)
    pairs = [(torch.randn(2, 7, a, dtype=torch.float64), torch.randn(2, 7, b, dtype=torch.float64)) for a, b in [(6, 9), (9, 6)]]
    extra = [torch.randn(2, 7, 9, dtype=torch.float64), torch.randn(2, 7, 9, dtype=torch.float64)]
    leaves = [x.requires_grad_() for pair in pairs for x in pair] + [e.requires_grad_() for e in extra]
    residuals = {"factor": [pairs[1][0]], "extras": extra, "both": [extra[0], pairs[0][1]]}[pick]
    g, rho = factored_grad_sq_norm(pairs, residuals)
    g_ref, rho_ref = _reference_grad_sq_norm(pairs), sum(squared_norm(e) for e in residuals)
    assert max_diff(g, g_ref) < 1e-12 * g_ref.abs().max() and max_diff(rho, rho_ref) < 1e-12 * rho_ref.abs().max()
    w, u = torch.randn(2, 7, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)
    for loss, loss_ref in [((g * w + rho * u).sum(), (g_ref * w + rho_ref * u).sum()), ((rho * u).sum(), (rho_ref * u).sum())]:
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=True)
        grads_ref = torch.autograd.grad(loss_ref, leaves, allow_unused=True, retain_graph=True)
        for a, b in zip(grads, grads_ref):
            assert (a is None and b is None) or max_diff(a, b) < 1e-12 * (1 + b.abs().max())
