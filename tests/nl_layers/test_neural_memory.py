"""NeuralMemory (Titans): parallel == token-by-token reference == streamed, for every anchor period;
the linear special case is Longhorn's delta rule; the inner step is bounded; compiles; flat in T."""

import statistics
import time

import pytest
import torch

import nl_layers
from nl_layers.memory.linear import linear_memory_recurrent
from nl_layers.ops.fast_weights import step_bound

from .helpers import assert_grads_close, assert_need_state_false_matches, max_diff


def _memory(chunk=16, memory="mlp", grad_impl="analytic", **kw):
    torch.manual_seed(0)
    if memory == "custom":
        memory = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 12))
    mem = nl_layers.NeuralMemory(24, heads=2, chunk_size=chunk, memory=memory, max_lr=0.5, grad_impl=grad_impl, **kw).double()
    if memory == "linear":  # start from a nonzero memory so that the read-out is not trivially zero
        torch.nn.init.normal_(mem.memory.weight, std=0.2)
    return mem


def _assert_states_close(s, s_ref, tol=1e-12):
    for tree, tree_ref in ((s.weights, s_ref.weights), (s.momentum, s_ref.momentum), (s.anchor, s_ref.anchor)):
        for n in tree:
            assert max_diff(tree[n], tree_ref[n]) < tol, n


@pytest.mark.parametrize(
    "anchor, memory, grad_impl, kw",
    [
        (None, "mlp", "analytic", {}),
        (16, "mlp", "analytic", {}),
        (40, "mlp", "analytic", dict(momentum=False)),
        (16, "mlp", "analytic", dict(forget=False, error_clip=None)),
        (None, "linear", "analytic", dict(momentum=False, forget=False)),
        (16, "linear", "analytic", {}),
        (16, "custom", "func", {}),
        (None, "custom", "func", dict(momentum=False)),
    ],
)
def test_parallel_equals_recurrent_outputs_states_and_gradients(anchor, memory, grad_impl, kw):
    """T = 63 with chunk 16 ends in a partial chunk; a state from 21 earlier tokens is carried in."""
    mem = _memory(16, memory, grad_impl, anchor_size=anchor, **kw)
    _, state = mem(torch.randn(2, 21, 24, dtype=torch.float64))
    x = torch.randn(2, 63, 24, dtype=torch.float64, requires_grad=True)
    y, s = mem(x, state)
    y_ref, s_ref = mem(x, state, mode="recurrent")
    assert max_diff(y, y_ref) < 1e-12
    _assert_states_close(s, s_ref)
    assert_grads_close(mem, x, y, y_ref)


@pytest.mark.parametrize("form", ["tokens", "chunks"])
@pytest.mark.parametrize("anchor, memory, kw", [(None, "mlp", {}), (16, "mlp", dict(momentum=False)), (24, "linear", {})])
def test_both_read_forms_equal_the_reference(form, anchor, memory, kw):
    """The analytic engine read through the L x L token matrix or through the chunk start states."""
    mem = _memory(16, memory, anchor_size=anchor, **kw)
    mem.engine.form = form
    _, state = mem(torch.randn(2, 21, 24, dtype=torch.float64))
    x = torch.randn(2, 63, 24, dtype=torch.float64, requires_grad=True)
    for start in (None, state):
        y, s = mem(x, start)
        y_ref, s_ref = mem(x, start, mode="recurrent")
        assert max_diff(y, y_ref) < 1e-12
        _assert_states_close(s, s_ref)
        assert_grads_close(mem, x, y, y_ref)


def test_auto_form_takes_the_token_matrix_for_short_segments_only():
    engine = nl_layers.NeuralMemory(384, heads=4).engine  # a language model's layer: 96 x 192 matrices, chunks of 64
    sizes = [96 * 192, 192 * 96]
    assert engine.form == "auto" and engine.use_tokens(256, 64, True, sizes)
    assert not engine.use_tokens(1024, 64, True, sizes)  # 16 chunks: L^2 > n K x 18432
    assert not engine.use_tokens(256, 64, True, [16 * 16])  # small matrices: the chunk states are smaller
    engine.form = "chunks"
    assert not engine.use_tokens(256, 64, True, sizes)
    with pytest.raises(ValueError, match="form"):
        type(engine)(nl_layers.ResidualMLPMemory(4, 8), form="dense")


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu", "tanh"])
def test_every_activation_of_the_mlp_memory_equals_the_reference(activation):
    """The closed-form factors (act and its slope) against plain autograd, fresh and carried state."""
    torch.manual_seed(0)
    memory = nl_layers.ResidualMLPMemory(12, 20, activation=activation)
    mem = nl_layers.NeuralMemory(24, heads=2, chunk_size=8, memory=memory, max_lr=0.5).double()
    x = torch.randn(2, 29, 24, dtype=torch.float64, requires_grad=True)
    y, state = mem(x)
    y_ref, s_ref = mem(x, mode="recurrent")
    assert max_diff(y, y_ref) < 1e-12
    _assert_states_close(state, s_ref)
    assert_grads_close(mem, x, y, y_ref)


@pytest.mark.parametrize("anchor", [None, 16])
def test_results_do_not_depend_on_the_chunk_size(anchor):
    x = torch.randn(2, 37, 24, dtype=torch.float64)
    y, s = _memory(64, anchor_size=anchor)(x)
    for chunk in (1, 5, 16, 37):
        y_c, s_c = _memory(chunk, anchor_size=anchor)(x)
        assert max_diff(y_c, y) < 1e-12
        _assert_states_close(s_c, s)


def test_anchor_size_changes_the_memory():
    x = torch.randn(2, 40, 24, dtype=torch.float64)
    assert max_diff(_memory(anchor_size=None)(x)[0], _memory(anchor_size=8)(x)[0]) > 1e-3


def test_func_and_analytic_engines_agree():
    func, analytic = _memory(8, grad_impl="func", anchor_size=12), _memory(8, grad_impl="analytic", anchor_size=12)
    analytic.load_state_dict(func.state_dict())
    x = torch.randn(2, 30, 24, dtype=torch.float64, requires_grad=True)
    y_f, y_a = func(x)[0], analytic(x)[0]
    assert max_diff(y_f, y_a) < 1e-12
    assert_grads_close(func, x, y_f, y_a, module_b=analytic)


@pytest.mark.parametrize("anchor", [None, 16])
@pytest.mark.parametrize("splits", [[7, 9, 47], [16, 16, 31], [1, 62]])
def test_streamed_equals_whole_sequence(splits, anchor):
    mem = _memory(16, anchor_size=anchor)
    x = torch.randn(2, 63, 24, dtype=torch.float64)
    y, s = mem(x)
    parts, state = [], None
    for piece in torch.split(x, splits, dim=1):
        out, state = mem(piece, state)
        parts.append(out)
    assert max_diff(torch.cat(parts, 1), y) < 1e-12
    assert state.position == 63
    _assert_states_close(state, s)


def test_initial_weights_and_gates_are_learned():
    """Outputs are differentiable w.r.t. every outer parameter, the memory's initial weights included."""
    mem = _memory(4, anchor_size=4)
    y, _ = mem(torch.randn(2, 12, 24, dtype=torch.float64))
    grads = torch.autograd.grad(y.square().sum(), list(mem.parameters()))
    for (name, _), g in zip(mem.named_parameters(), grads):
        assert g.abs().sum() > 0, name


@pytest.mark.parametrize("forget, w0_std", [(True, 0.0), (False, 0.3)])
def test_linear_memory_without_momentum_is_longhorns_delta_rule(forget, w0_std):
    """M(k) = W k, no momentum, no error clip, anchor 1: W_t = (1 - alpha_t) W_{t-1} - c_t (W_{t-1} k_t - v_t) k_t^T
    with c_t = theta_t / (1 + theta_t ||k_t||^2), y_t = W_t q_t: Longhorn's step. With a_t = 1 - alpha_t it is
    LinearMemory's delta rule (Gated DeltaNet: W_t = a_t W_{t-1} - b_t (a_t W_{t-1} k_t - v_t) k_t^T) with
    b_t = c_t / a_t and v_t -> a_t v_t. (Forgetting pulls toward W_0, so with forgetting W_0 = 0 is the literal rule.)"""
    mem = nl_layers.NeuralMemory(
        12, heads=2, anchor_size=1, memory="linear", momentum=False, forget=forget, max_lr=0.9, error_clip=None
    ).double()
    torch.nn.init.normal_(mem.memory.weight, std=w0_std)
    with torch.no_grad():
        mem.out.weight.copy_(torch.eye(12))  # read the heads' outputs directly
    x = torch.randn(2, 20, 12, dtype=torch.float64)
    y, state = mem(x)
    q, k, v, lr, log_m, log_a, _ = mem._prepare(x, mem.initial_state(2, x).conv)
    heads = lambda t: t.reshape(2, 2, 20, *t.shape[2:])  # noqa: E731  (B*H, T, ...) -> (B, H, T, ...)
    a = heads(log_a).exp() if forget else torch.ones_like(heads(lr))
    c = heads(lr) / (1 + heads(lr) * heads(k).square().sum(-1))
    y_lin, m_lin = linear_memory_recurrent(
        heads(q), heads(k), a[..., None] * heads(v), rule="delta", lr=c / a,
        log_decay=heads(log_a) if forget else None, initial_state=mem.memory.weight.expand(2, 2, 6, 6),
    )
    assert max_diff(state.weights["weight"], m_lin) < 1e-12
    assert max_diff(y, y_lin.transpose(1, 2).reshape(2, 20, 12)) < 1e-12


@pytest.mark.parametrize("memory, max_lr, tight", [("mlp", 10.0, False), ("linear", 1.0, True)])
def test_every_step_is_bounded_for_adversarial_inputs(memory, max_lr, tight):
    """||W_t - W_{t-1}|| <= sqrt(max_lr) * error_clip / 2 (no momentum or forgetting: that is one step),
    with inputs of size 1e4 and initial weights of size 30. The linear memory with theta ~ 1 (curvature
    ||k||^2 = 1, residuals beyond the clip) attains the bound."""
    torch.manual_seed(0)
    mem = nl_layers.NeuralMemory(16, heads=2, anchor_size=1, memory=memory, momentum=False, forget=False, max_lr=max_lr)
    with torch.no_grad():
        for p in mem.memory.parameters():
            p.copy_(30 * torch.randn_like(p))
        mem.to_lr.bias.fill_(30.0)  # theta = max_lr
    x = 1e4 * torch.randn(2, 24, 16)
    bound, state, largest = step_bound(max_lr, mem.error_clip), None, 0.0
    with torch.no_grad():
        for t in range(x.shape[1]):
            before = state.weights if state is not None else {n: p.expand(2, 2, *p.shape) for n, p in mem.memory.named_parameters()}
            _, state = mem(x[:, t : t + 1], state)
            step = sum((state.weights[n] - before[n]).flatten(2).square().sum(-1) for n in before).sqrt()
            largest = max(largest, float(step.max()))
    assert largest <= bound * (1 + 1e-5)
    assert largest > 0.99 * bound if tight else largest > 0


def test_defaults_train_stably_with_a_large_outer_learning_rate():
    torch.manual_seed(0)
    mem = nl_layers.NeuralMemory(32)
    head = torch.nn.Linear(32, 32)
    opt = torch.optim.AdamW([*mem.parameters(), *head.parameters()], lr=0.1)
    x, target = torch.randn(4, 64, 32), torch.randn(4, 64, 32)
    for _ in range(12):
        y, state = mem(x)
        loss = (head(y) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        # 64 tokens from a fresh state: ||W_T - W_0|| <= T (T + 1) / 2 * sqrt(max_lr) tau / 2
        w0 = dict(mem.memory.named_parameters())
        moved = sum((state.weights[n] - w0[n]).flatten(2).square().sum(-1) for n in w0).sqrt()
        assert moved.max() <= 64 * 65 / 2 * step_bound(mem.max_lr, mem.error_clip)


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    torch.manual_seed(0)
    mem = nl_layers.NeuralMemory(16, heads=2, chunk_size=4)
    x = torch.randn(2, 13, 16)
    y, s = torch.compile(mem, fullgraph=True, backend="eager")(x)
    y_ref, s_ref = mem(x)
    assert max_diff(y, y_ref) < 1e-6 and max_diff(s.weights["w_in"], s_ref.weights["w_in"]) < 1e-6


def test_tokens_per_second_are_flat_in_sequence_length():
    """Fixed tokens per call: T = 1024 runs within 2x the time of T = 128 (no loop over chunks)."""
    torch.manual_seed(0)
    mem = nl_layers.NeuralMemory(32, heads=2)
    xs = {t: torch.randn(2048 // t, t, 32, requires_grad=True) for t in (128, 1024)}

    def run(t):
        start = time.perf_counter()
        mem(xs[t])[0].square().sum().backward()
        return time.perf_counter() - start

    times = {128: [], 1024: []}
    for t in (128, 1024):
        run(t)
    for _ in range(5):
        for t in (128, 1024):
            times[t].append(run(t))
    ratio = statistics.median(times[1024]) / statistics.median(times[128])
    assert ratio < 2.0, f"T=1024 takes {ratio:.2f}x the time of T=128"


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="chunk_size"):
        nl_layers.NeuralMemory(16, chunk_size=0)
    with pytest.raises(ValueError, match="anchor_size"):
        nl_layers.NeuralMemory(16, anchor_size=0)
    with pytest.raises(ValueError, match="error_clip"):
        nl_layers.NeuralMemory(16, error_clip=0.0)
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


def test_state_detach_cuts_the_graph():
    mem = _memory(4)
    _, s = mem(torch.randn(1, 6, 24, dtype=torch.float64))
    d = s.detach()
    assert all(not t.requires_grad for t in d.weights.values()) and d.position == 6


@pytest.mark.parametrize("grad_impl", ["analytic", "func"])
@pytest.mark.parametrize("anchor_size", [None, 4, 7])
@pytest.mark.parametrize("given", [False, True])
def test_need_state_false_gives_the_same_output_and_gradients(grad_impl, anchor_size, given):
    """need_state=False returns (y, None) with the same y and gradients as the full forward."""
    torch.manual_seed(0)
    mem = nl_layers.NeuralMemory(16, heads=2, chunk_size=4, anchor_size=anchor_size, grad_impl=grad_impl).double()
    assert_need_state_false_matches(mem, given)
