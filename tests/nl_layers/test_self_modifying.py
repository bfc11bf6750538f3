"""SelfModifyingTitans: parallel (both engines) == token-by-token reference == streamed; the update rule;
the inner step is bounded; compiles."""

import pytest
import torch

import nl_layers
from nl_layers.memory.mlp import ResidualMLPMemory
from nl_layers.ops.fast_weights import step_bound

from .helpers import assert_grads_close, assert_need_state_false_matches, max_diff


def _layer(chunk=8, anchor=4, grad_impl="analytic", detach_values=True):
    torch.manual_seed(0)
    return nl_layers.SelfModifyingTitans(
        16, heads=2, chunk_size=chunk, anchor_size=anchor, max_lr=0.5, detach_values=detach_values, grad_impl=grad_impl,
    ).double()


def _assert_states_close(s, s_ref, tol=1e-12):
    for m in s.weights:
        for n in s.weights[m]:
            for tree, tree_ref in ((s.weights, s_ref.weights), (s.momentum, s_ref.momentum), (s.anchor, s_ref.anchor)):
                assert max_diff(tree[m][n], tree_ref[m][n]) < tol, (m, n)


@pytest.mark.parametrize(
    "chunk, anchor, grad_impl, detach_values",
    [(8, None, "analytic", True), (8, 4, "analytic", True), (4, 7, "analytic", True), (8, 1, "analytic", True),
     (4, 4, "func", False)],
)
def test_parallel_equals_recurrent(chunk, anchor, grad_impl, detach_values):
    layer = _layer(chunk, anchor, grad_impl, detach_values)
    _, state = layer(torch.randn(2, 6, 16, dtype=torch.float64))
    x = torch.randn(2, 23, 16, dtype=torch.float64, requires_grad=True)
    y, s = layer(x, state)
    y_ref, s_ref = layer(x, state, mode="recurrent")
    assert max_diff(y, y_ref) < 1e-12
    _assert_states_close(s, s_ref)
    assert_grads_close(layer, x, y, y_ref)


@pytest.mark.parametrize("form", ["tokens", "chunks"])
@pytest.mark.parametrize("chunk, anchor", [(8, None), (4, 7)])
def test_both_read_forms_equal_the_reference(chunk, anchor, form):
    layer = _layer(chunk, anchor)
    for engine in layer.engines.values():
        engine.form = form
    _, state = layer(torch.randn(2, 6, 16, dtype=torch.float64))
    x = torch.randn(2, 23, 16, dtype=torch.float64, requires_grad=True)
    for start in (None, state):  # fresh: the initial weights enter as one matrix for all copies
        y, s = layer(x, start)
        y_ref, s_ref = layer(x, start, mode="recurrent")
        assert max_diff(y, y_ref) < 1e-12
        _assert_states_close(s, s_ref)
        assert_grads_close(layer, x, y, y_ref)


def test_func_and_analytic_engines_agree():
    func, analytic = _layer(8, 4, grad_impl="func"), _layer(8, 4, grad_impl="analytic")
    analytic.load_state_dict(func.state_dict())
    x = torch.randn(2, 21, 16, dtype=torch.float64, requires_grad=True)
    y_f, y_a = func(x)[0], analytic(x)[0]
    assert max_diff(y_f, y_a) < 1e-12
    assert_grads_close(func, x, y_f, y_a, module_b=analytic)


@pytest.mark.parametrize("anchor", [None, 4])
def test_results_do_not_depend_on_the_chunk_size(anchor):
    x = torch.randn(2, 29, 16, dtype=torch.float64)
    y, s = _layer(64, anchor)(x)
    for chunk in (1, 3, 8):
        y_c, s_c = _layer(chunk, anchor)(x)
        assert max_diff(y_c, y) < 1e-12
        _assert_states_close(s_c, s)


@pytest.mark.parametrize("anchor", [None, 4])
@pytest.mark.parametrize("splits", [[3, 10, 16], [8, 8, 13], [1, 1, 27]])
def test_streamed_equals_whole(splits, anchor):
    layer = _layer(8, anchor)
    x = torch.randn(2, 29, 16, dtype=torch.float64)
    y, s = layer(x)
    parts, state = [], None
    for piece in torch.split(x, splits, dim=1):
        out, state = layer(piece, state)
        parts.append(out)
    assert max_diff(torch.cat(parts, 1), y) < 1e-12 and state.position == 29
    _assert_states_close(state, s)


def test_component_memories_self_modify_only_with_anchors():
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    _, s = _layer(anchor=None)(x)
    assert all(max_diff(s.weights[m][n], s.anchor[m][n]) == 0 for m in ("key", "value", "lr", "decay") for n in s.weights[m])
    _, s = _layer(anchor=4)(x)
    assert max_diff(s.anchor["key"]["w_out"], _layer().memories["key"].w_out) > 1e-6


def test_one_step_of_the_update_rule():
    """First token: W_1 = W_0 + S_1, S_1 = -c g with g = grad 1/2||M(k) - M(v)||^2 + [W_out a a^T on the output
    layer], c = eta s / (1 + eta ||g||^2 / ||r||^2), r = (M(k) - M(v), W_out a), s = min(1, 1 / ||r||)."""
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
    err = torch.func.functional_call(mem, params, (k,)) - target
    grads = dict(zip(params, torch.autograd.grad(0.5 * err.pow(2).sum(), list(params.values()))))
    a = mem.layer_inputs(w0, k)["w_out"]
    grads["w_out"] = grads["w_out"] + torch.outer(w0["w_out"] @ a, a)
    r_sq = err.pow(2).sum() + (w0["w_out"] @ a).pow(2).sum()
    g_sq = sum(g.pow(2).sum() for g in grads.values())
    c = eta / (1 + eta * g_sq / r_sq) * torch.clamp(r_sq.rsqrt(), max=1.0)
    for n in w0:
        assert max_diff(s.weights["memory"][n][0, 0], w0[n] - c * grads[n]) < 1e-12, n


def test_every_step_is_bounded_for_adversarial_inputs():
    """||S_t - beta S_{t-1}|| (one token's step) <= sqrt(max_lr) * error_clip / 2 for every memory,
    with inputs of size 1e4 and initial weights of size 10."""
    torch.manual_seed(0)
    layer = nl_layers.SelfModifyingTitans(16, heads=2, anchor_size=1, max_lr=10.0)
    with torch.no_grad():
        for mem in layer.memories.values():
            for p in mem.parameters():
                p.copy_(10 * torch.randn_like(p))
        layer.lr_head.bias.fill_(30.0)
    x = 1e4 * torch.randn(2, 16, 16)
    beta = torch.sigmoid(layer.momentum_logit).detach()
    bound, state, largest = step_bound(10.0, layer.error_clip), None, 0.0
    with torch.no_grad():
        for t in range(x.shape[1]):
            _, new = layer(x[:, t : t + 1], state)
            for j, m in enumerate(new.momentum):
                prev = {n: 0 * s for n, s in new.momentum[m].items()} if state is None else state.momentum[m]
                step = sum((s - beta[j] * prev[n]).flatten(2).square().sum(-1) for n, s in new.momentum[m].items()).sqrt()
                largest = max(largest, float(step.max()))
            state = new
    assert 0 < largest <= bound * (1 + 1e-5)


def test_defaults_train_stably_with_a_large_outer_learning_rate():
    torch.manual_seed(0)
    layer = nl_layers.SelfModifyingTitans(32)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    x, target = torch.randn(4, 64, 32), torch.randn(4, 64, 32)
    for _ in range(8):
        y, state = layer(x)
        loss = (y - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(w).all() for d in state.weights.values() for w in d.values())


def test_long_sequence_stays_finite_and_bounded():
    layer = nl_layers.SelfModifyingTitans(32, heads=4, anchor_size=16)
    with torch.no_grad():
        y, s = layer(torch.randn(2, 512, 32) * 3)
    assert torch.isfinite(y).all()
    assert all(w.abs().max() < 50 for d in s.weights.values() for w in d.values())


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    torch.manual_seed(0)
    layer = nl_layers.SelfModifyingTitans(16, heads=2, chunk_size=4)
    x = torch.randn(2, 13, 16)
    y, s = torch.compile(layer, fullgraph=True, backend="eager")(x)
    y_ref, s_ref = layer(x)
    assert max_diff(y, y_ref) < 1e-6 and max_diff(s.weights["memory"]["w_in"], s_ref.weights["memory"]["w_in"]) < 1e-6


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="anchor_size"):
        nl_layers.SelfModifyingTitans(16, heads=2, anchor_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        nl_layers.SelfModifyingTitans(16, heads=2, chunk_size=0)
    with pytest.raises(ValueError, match="error_clip"):
        nl_layers.SelfModifyingTitans(16, heads=2, error_clip=-1.0)
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


@pytest.mark.parametrize("anchor_size", [None, 4, 7])
@pytest.mark.parametrize("given", [False, True])
def test_need_state_false_gives_the_same_output_and_gradients(anchor_size, given):
    """need_state=False returns (y, None) with the same y and gradients as the full forward (the last
    segment's end states and component writes skipped)."""
    torch.manual_seed(0)
    layer = nl_layers.SelfModifyingTitans(16, heads=2, chunk_size=4, anchor_size=anchor_size).double()
    assert_need_state_false_matches(layer, given)
