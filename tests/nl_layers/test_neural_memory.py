"""NeuralMemory (Titans): chunked == token-by-token reference == streamed; the linear special case is the delta rule."""

import pytest
import torch

import nl_layers
from nl_layers.memory.linear import linear_memory_recurrent

from .helpers import assert_grads_close, max_diff


def _memory(chunk, memory="mlp", grad_impl="func", **kw):
    torch.manual_seed(0)
    mem = nl_layers.NeuralMemory(24, heads=2, chunk_size=chunk, memory=memory, max_lr=0.5, grad_impl=grad_impl, **kw).double()
    if memory == "linear":  # start from a nonzero memory so that the read-out is not trivially zero
        torch.nn.init.normal_(mem.memory.weight, std=0.2)
    return mem


@pytest.mark.parametrize("grad_impl", ["func", "analytic"])
@pytest.mark.parametrize("memory", ["mlp", "linear"])
@pytest.mark.parametrize("chunk, length", [(1, 23), (16, 63)])
def test_chunked_equals_recurrent_outputs_states_and_gradients(chunk, length, memory, grad_impl):
    """chunk 1 is the token-by-token Titans memory; T = 63 with chunk 16 ends in a partial chunk."""
    mem = _memory(chunk, memory, grad_impl)
    x = torch.randn(2, length, 24, dtype=torch.float64, requires_grad=True)
    y, s = mem(x)
    y_ref, s_ref = mem(x, mode="recurrent")
    assert max_diff(y, y_ref) < 1e-12
    for tree, tree_ref in ((s.weights, s_ref.weights), (s.momentum, s_ref.momentum), (s.anchor, s_ref.anchor)):
        for n in tree:
            assert max_diff(tree[n], tree_ref[n]) < 1e-12
    assert_grads_close(mem, x, y, y_ref)


def test_func_and_analytic_engines_agree():
    func, analytic = _memory(8, grad_impl="func"), _memory(8, grad_impl="analytic")
    analytic.load_state_dict(func.state_dict())
    x = torch.randn(2, 30, 24, dtype=torch.float64, requires_grad=True)
    y_f, y_a = func(x)[0], analytic(x)[0]
    assert max_diff(y_f, y_a) < 1e-12
    assert_grads_close(func, x, y_f, y_a, module_b=analytic)


@pytest.mark.parametrize("splits", [[7, 9, 47], [16, 16, 31], [1, 62]])
def test_streamed_equals_whole_sequence(splits):
    mem = _memory(16, grad_impl="analytic")
    x = torch.randn(2, 63, 24, dtype=torch.float64)
    y, s = mem(x)
    parts, state = [], None
    for piece in torch.split(x, splits, dim=1):
        out, state = mem(piece, state)
        parts.append(out)
    assert max_diff(torch.cat(parts, 1), y) < 1e-12
    assert state.position == 63 and max_diff(state.weights["w_in"], s.weights["w_in"]) < 1e-12


def test_initial_weights_and_gates_are_learned():
    """Outputs are differentiable w.r.t. every outer parameter, the memory's initial weights included."""
    mem = _memory(4)
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    y, _ = mem(x)
    grads = torch.autograd.grad(y.square().sum(), list(mem.parameters()))
    for (name, _), g in zip(mem.named_parameters(), grads):
        assert g.abs().sum() > 0, name


def _linear_titans(forget: bool, w0_std: float):
    mem = nl_layers.NeuralMemory(12, heads=2, chunk_size=1, memory="linear", momentum=False, forget=forget, max_lr=0.9).double()
    torch.nn.init.normal_(mem.memory.weight, std=w0_std)
    with torch.no_grad():
        mem.out.weight.copy_(torch.eye(12))  # read the heads' outputs directly
    return mem


@pytest.mark.parametrize("forget, w0_std", [(True, 0.0), (False, 0.3)])
def test_linear_memory_without_momentum_is_the_delta_rule(forget, w0_std):
    """M(k) = W k, no momentum, chunk 1: W_t = (1 - alpha_t) W_{t-1} - theta_t (W_{t-1} k_t - v_t) k_t^T
    and y_t = W_t q_t. With a_t = 1 - alpha_t this is LinearMemory's delta rule (Gated DeltaNet:
    W_t = a_t W_{t-1} - b_t (a_t W_{t-1} k_t - v_t) k_t^T) with b_t = theta_t / a_t and v_t -> a_t v_t.
    (Forgetting pulls toward the initial weight W_0, so with forgetting W_0 = 0 is the literal rule.)"""
    mem = _linear_titans(forget, w0_std)
    x = torch.randn(2, 20, 12, dtype=torch.float64)
    y, state = mem(x)
    q, k, v, lr, log_m, log_a, _ = mem._prepare(x, mem.initial_state(2, x))
    assert log_m is None
    heads = lambda t: t.reshape(2, 2, 20, *t.shape[2:])  # noqa: E731  (B*H, T, ...) -> (B, H, T, ...)
    a = heads(log_a).exp() if forget else torch.ones_like(heads(lr))
    y_lin, m_lin = linear_memory_recurrent(
        heads(q), heads(k), a[..., None] * heads(v), rule="delta", lr=heads(lr) / a,
        log_decay=heads(log_a) if forget else None, initial_state=mem.memory.weight.expand(2, 2, 6, 6),
    )
    assert max_diff(state.weights["weight"], m_lin) < 1e-12
    assert max_diff(y, y_lin.transpose(1, 2).reshape(2, 20, 12)) < 1e-12


def test_state_detach_cuts_the_graph():
    mem = _memory(4)
    _, s = mem(torch.randn(1, 6, 24, dtype=torch.float64))
    d = s.detach()
    assert all(not t.requires_grad for t in d.weights.values()) and d.position == 6


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="chunk_size"):
        nl_layers.NeuralMemory(16, chunk_size=0)
    with pytest.raises(ValueError, match="memory"):
        nl_layers.NeuralMemory(16, memory="transformer")
    with pytest.raises(ValueError, match="grad_impl"):
        nl_layers.NeuralMemory(16, grad_impl="jit")
    with pytest.raises(ValueError, match="analytic"):
        nl_layers.NeuralMemory(16, heads=2, memory=torch.nn.Linear(8, 8), grad_impl="analytic")
    assert type(nl_layers.NeuralMemory(16, heads=2).engine).__name__ == "AnalyticEngine"  # auto
    assert type(nl_layers.NeuralMemory(16, heads=2, memory=torch.nn.Linear(8, 8)).engine).__name__ == "FuncEngine"
    mem = nl_layers.NeuralMemory(16, heads=2)
    with pytest.raises(ValueError, match="shape"):
        mem(torch.randn(4, 16))
    x = torch.randn(1, 4, 16)
    x[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        mem(x)


def test_custom_memory_module_with_func_engine():
    """Any module mapping head_dim -> head_dim can be the memory (torch.func path)."""
    net = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 6))
    mem = nl_layers.NeuralMemory(12, heads=2, chunk_size=4, memory=net).double()
    x = torch.randn(1, 10, 12, dtype=torch.float64)
    y, _ = mem(x)
    y_ref, _ = mem(x, mode="recurrent")
    assert max_diff(y, y_ref) < 1e-12
