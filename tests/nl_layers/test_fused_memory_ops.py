"""Hand-written autograd Functions of the residual MLP memory == the plain expressions they replace
(gradcheck in float64), including their torch.compile and autocast paths."""

import pytest
import torch
import torch.nn.functional as F

from nl_layers.memory import mlp
from nl_layers.ops.fast_weights import grouped_linear as gl

f64 = dict(dtype=torch.float64)


def _shared_read_ref(x, w_in, w_out):
    xe = x.expand(w_in.shape[0], -1, -1)
    return xe + F.silu(xe @ w_in.transpose(1, 2)) @ w_out.transpose(1, 2)


@pytest.mark.parametrize("groups", [1, 3])
def test_shared_silu_read_equals_the_grouped_compose(monkeypatch, groups):
    monkeypatch.setattr(gl, "ROWS_PER_SLICE", 4)  # the weight gradients in row slices (12 rows: 3)
    torch.manual_seed(0)
    x = torch.randn(12, 5, **f64, requires_grad=True)
    w_in = torch.randn(groups, 7, 5, **f64, requires_grad=True)
    w_out = torch.randn(groups, 5, 7, **f64, requires_grad=True)
    torch.testing.assert_close(mlp.shared_silu_read(x, w_in, w_out), _shared_read_ref(x, w_in, w_out))
    assert torch.autograd.gradcheck(mlp.shared_silu_read, (x, w_in, w_out))
    gy = torch.randn(groups, 12, 5, **f64)
    ours = torch.autograd.grad(mlp.shared_silu_read(x, w_in, w_out), (x, w_in, w_out), gy)
    ref = torch.autograd.grad(_shared_read_ref(x, w_in, w_out), (x, w_in, w_out), gy)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_shared_silu_read_compiled_and_under_autocast():
    torch.manual_seed(0)
    leaves = [torch.randn(8, 4, **f64), torch.randn(2, 6, 4, **f64), torch.randn(2, 4, 6, **f64)]
    ref = torch.autograd.grad(_shared_read_ref(*[t.requires_grad_() for t in leaves]).square().sum(), leaves)
    leaves = [t.detach().requires_grad_() for t in leaves]
    out = torch.compile(lambda *a: mlp.shared_silu_read(*a).square().sum(), fullgraph=True, backend="eager")(*leaves)
    for a, b in zip(torch.autograd.grad(out, leaves), ref):
        torch.testing.assert_close(a, b)
    x, w_in, w_out = (t.detach().float().requires_grad_() for t in leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp.shared_silu_read(x, w_in, w_out)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == w_in.grad.dtype == w_out.grad.dtype == torch.float32
