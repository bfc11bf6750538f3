"""SelfModifyingTitans: chunked (both engines) == token-by-token reference == streamed; the update rule itself."""

import pytest
import torch

import nl_layers
from nl_layers.memory.mlp import ResidualMLPMemory

from .helpers import assert_grads_close, max_diff


def _layer(chunk, component_chunk, grad_impl="analytic", detach_values=True):
    torch.manual_seed(0)
    return nl_layers.SelfModifyingTitans(
        16, heads=2, chunk_size=chunk, component_chunk_size=component_chunk, max_lr=0.5,
        detach_values=detach_values, grad_impl=grad_impl,
    ).double()


@pytest.mark.parametrize("chunk, component_chunk, length", [(1, 1, 13), (8, 4, 29), (4, 16, 29)])
def test_chunked_equals_recurrent(chunk, component_chunk, length):
    layer = _layer(chunk, component_chunk)
    x = torch.randn(2, length, 16, dtype=torch.float64, requires_grad=True)
    y, s = layer(x)
    y_ref, s_ref = layer(x, mode="recurrent")
    assert max_diff(y, y_ref) < 1e-12
    for m in s.weights:
        for n in s.weights[m]:
            assert max_diff(s.weights[m][n], s_ref.weights[m][n]) < 1e-12, (m, n)
            assert max_diff(s.momentum[m][n], s_ref.momentum[m][n]) < 1e-12, (m, n)
            assert max_diff(s.anchor[m][n], s_ref.anchor[m][n]) < 1e-12, (m, n)
    assert_grads_close(layer, x, y, y_ref)


@pytest.mark.parametrize("detach_values", [True, False])
def test_func_engine_equals_reference(detach_values):
    layer = _layer(4, 2, grad_impl="func", detach_values=detach_values)
    x = torch.randn(1, 11, 16, dtype=torch.float64, requires_grad=True)
    y, y_ref = layer(x)[0], layer(x, mode="recurrent")[0]
    assert max_diff(y, y_ref) < 1e-12
    assert_grads_close(layer, x, y, y_ref)


def test_func_and_analytic_engines_agree():
    func, analytic = _layer(8, 4, grad_impl="func"), _layer(8, 4, grad_impl="analytic")
    analytic.load_state_dict(func.state_dict())
    x = torch.randn(2, 21, 16, dtype=torch.float64, requires_grad=True)
    y_f, y_a = func(x)[0], analytic(x)[0]
    assert max_diff(y_f, y_a) < 1e-12
    assert_grads_close(func, x, y_f, y_a, module_b=analytic)


@pytest.mark.parametrize("splits", [[3, 10, 16], [8, 8, 13], [1, 1, 27]])
def test_streamed_equals_whole(splits):
    layer = _layer(8, 4)
    x = torch.randn(2, 29, 16, dtype=torch.float64)
    y, _ = layer(x)
    parts, state = [], None
    for piece in torch.split(x, splits, dim=1):
        out, state = layer(piece, state)
        parts.append(out)
    assert max_diff(torch.cat(parts, 1), y) < 1e-12 and state.position == 29


def test_one_step_of_the_update_rule():
    """First token, no momentum yet: W_1 = W_0 + S_1 with S_1 = -eta (grad 1/2||M(k) - M(v)||^2 + [W_out a a^T on the output layer])."""
    layer = _layer(1, 1)
    x = torch.randn(1, 1, 16, dtype=torch.float64)
    _, s = layer(x)
    mem = layer.memories["memory"]
    w0 = dict(mem.named_parameters())
    xh = torch.nn.functional.normalize(x[0, 0, :8], dim=-1)  # head 0
    outs = {m: layer.memories[m](xh) for m in ("key", "value", "lr", "decay")}
    k, v = torch.nn.functional.normalize(outs["key"], dim=-1), torch.nn.functional.normalize(outs["value"], dim=-1)
    eta = layer.max_lr * torch.sigmoid(layer.lr_head(outs["lr"]))[0]
    params = {n: p.detach().clone().requires_grad_() for n, p in w0.items()}
    target = mem(v).detach()
    loss = 0.5 * (torch.func.functional_call(mem, params, (k,)) - target).pow(2).sum()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    a = mem.layer_inputs(w0, k)["w_out"]
    grads["w_out"] = grads["w_out"] + torch.outer(w0["w_out"] @ a, a)
    for n in w0:
        want = w0[n] - eta * grads[n]
        assert max_diff(s.weights["memory"][n][0, 0], want) < 1e-12, n


def test_long_sequence_stays_finite_and_bounded():
    layer = nl_layers.SelfModifyingTitans(32, heads=4, chunk_size=16)
    y, s = layer(torch.randn(2, 512, 32) * 3)
    assert torch.isfinite(y).all()
    assert all(w.abs().max() < 50 for d in s.weights.values() for w in d.values())


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="component_chunk_size"):
        nl_layers.SelfModifyingTitans(16, heads=2, component_chunk_size=0)
    with pytest.raises(ValueError, match="momentum"):
        nl_layers.SelfModifyingTitans(16, heads=2, momentum=1.0)
    with pytest.raises(ValueError, match="grad_impl='func'"):
        nl_layers.SelfModifyingTitans(16, heads=2, detach_values=False, grad_impl="analytic")
    assert nl_layers.SelfModifyingTitans(16, heads=2, detach_values=False).engines["key"].__class__.__name__ == "FuncEngine"
    with pytest.raises(ValueError, match="divisible"):
        nl_layers.SelfModifyingTitans(16, heads=3)
    layer = nl_layers.SelfModifyingTitans(16, heads=2)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(2, 3, 8))
    x = torch.randn(1, 3, 16)
    x[0, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer(x)
    assert isinstance(layer.memories["key"], ResidualMLPMemory)
