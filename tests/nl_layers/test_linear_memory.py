"""LinearMemory: recurrent reference == chunked parallel form == streamed, outputs and gradients."""

import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F

import nl_layers
from nl_layers.memory.linear import RULES, linear_memory_chunked, linear_memory_recurrent

from .helpers import HostData, assert_grads_close, grads_of, max_diff

from ..example_imports import run_examples

B, H, T, DK, DV = 2, 3, 63, 6, 5


def _inputs(t=T, dk=DK, dv=DV, requires_grad=False):
    q = F.normalize(torch.randn(B, H, t, dk, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, H, t, dk, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, t, dv, dtype=torch.float64)
    lr = torch.rand(B, H, t, dtype=torch.float64)
    log_decay = F.logsigmoid(torch.randn(B, H, t, dtype=torch.float64) + 2)
    m0 = torch.randn(B, H, dv, dk, dtype=torch.float64)
    tensors = [q, k, v, lr, log_decay, m0]
    return [x.requires_grad_(requires_grad) for x in tensors]


NAMES = ["q", "k", "v", "lr", "log_decay", "initial_state"]
# (T, chunk, dk, dv): a ragged tail, one token, exactly one chunk, chunk 1, chunk > T, wide heads dv != dk
SIZES = [(63, 16, 6, 5), (1, 16, 6, 5), (16, 16, 6, 5), (63, 1, 6, 5), (63, 64, 5, 7), (40, 16, 60, 33)]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("t, chunk, dk, dv", SIZES)
def test_chunked_equals_recurrent_outputs_state_and_every_gradient(rule, t, chunk, dk, dv):
    inputs = _inputs(t, dk, dv, requires_grad=True)
    q, k, v, lr, log_decay, m0 = inputs
    kw = dict(rule=rule, lr=lr, log_decay=log_decay, initial_state=m0)
    y_ref, m_ref = linear_memory_recurrent(q, k, v, **kw)
    y, m = linear_memory_chunked(q, k, v, chunk_size=chunk, impl="torch", **kw)
    assert max_diff(y, y_ref) < 1e-12 and max_diff(m, m_ref) < 1e-12
    out, out_ref = torch.cat([y.flatten(), m.flatten()]), torch.cat([y_ref.flatten(), m_ref.flatten()])
    for name, a, b in zip(NAMES, grads_of(out, inputs), grads_of(out_ref, inputs)):
        assert a is not None and max_diff(a, b) < 1e-10, name


@pytest.mark.parametrize("group", [4, 64])  # 63 chunks: grouped in two levels, and in one closed form
def test_hebbian_chunk_states_grouped_or_closed(group, monkeypatch):
    """The hebbian rule's chunk-start states (a scalar decay per chunk) through the cross-chunk scan,
    whichever form it takes: outputs, state and every gradient equal the recurrence's."""
    from nl_layers.ops.fast_weights import cross

    monkeypatch.setattr(cross, "GROUP", group)
    inputs = _inputs(63, requires_grad=True)
    q, k, v, lr, log_decay, m0 = inputs
    kw = dict(rule="hebbian", lr=lr, log_decay=log_decay, initial_state=m0)
    y_ref, m_ref = linear_memory_recurrent(q, k, v, **kw)
    y, m = linear_memory_chunked(q, k, v, chunk_size=1, impl="torch", **kw)
    assert max_diff(y, y_ref) < 1e-12 and max_diff(m, m_ref) < 1e-12
    out, out_ref = torch.cat([y.flatten(), m.flatten()]), torch.cat([y_ref.flatten(), m_ref.flatten()])
    for name, a, b in zip(NAMES, grads_of(out, inputs), grads_of(out_ref, inputs)):
        assert a is not None and max_diff(a, b) < 1e-10, name


@pytest.mark.parametrize("rule", RULES)
def test_chunked_equals_recurrent_constant_lr_no_decay(rule):
    q, k, v, *_ = _inputs()
    y_ref, m_ref = linear_memory_recurrent(q, k, v, rule=rule, lr=0.7)
    y, m = linear_memory_chunked(q, k, v, rule=rule, lr=0.7, chunk_size=16)
    assert max_diff(y, y_ref) < 1e-12 and max_diff(m, m_ref) < 1e-12


@pytest.mark.parametrize("rule", RULES)
def test_time_first_layout_equals_head_first(rule):
    q, k, v, lr, log_decay, m0 = _inputs()
    tr = lambda x: x.transpose(1, 2)  # noqa: E731
    y, m = linear_memory_chunked(q, k, v, rule=rule, lr=lr, log_decay=log_decay, initial_state=m0, chunk_size=16)
    kw = dict(rule=rule, lr=tr(lr), log_decay=tr(log_decay), initial_state=m0, layout="bthd")
    y_tf, m_tf = linear_memory_chunked(tr(q), tr(k), tr(v), chunk_size=16, **kw)
    y_rec, m_rec = linear_memory_recurrent(tr(q), tr(k), tr(v), **kw)
    assert y_tf.shape == (B, T, H, DV) and y_rec.shape == (B, T, H, DV)
    assert max_diff(tr(y_tf), y) < 1e-12 and max_diff(m_tf, m) < 1e-12
    assert max_diff(tr(y_rec), y) < 1e-12 and max_diff(m_rec, m) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_float32_and_cast_back(dtype):
    q, k, v, lr, log_decay, m0 = (x.to(dtype) for x in _inputs())
    y, m = linear_memory_chunked(q, k, v, lr=lr, log_decay=log_decay, initial_state=m0, chunk_size=16)
    up = [x.double() for x in (q, k, v, lr, log_decay, m0)]
    y_ref, m_ref = linear_memory_recurrent(*up[:3], lr=up[3], log_decay=up[4], initial_state=up[5])
    assert y.dtype == dtype and m.dtype == dtype
    assert max_diff(y.double(), y_ref) < 2e-2 * y_ref.abs().max()
    assert max_diff(m.double(), m_ref) < 2e-2 * m_ref.abs().max()


def test_autocast_does_not_lower_the_chunked_precision():
    q, k, v, lr, log_decay, m0 = (x.float() for x in _inputs())
    kw = dict(lr=lr, log_decay=log_decay, initial_state=m0, chunk_size=16)
    y, m = linear_memory_chunked(q, k, v, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac, m_ac = linear_memory_chunked(q, k, v, **kw)
    assert y_ac.dtype == torch.float32 and max_diff(y_ac, y) < 1e-5 and max_diff(m_ac, m) < 1e-5


def test_rules_match_their_definitions():
    """One step from a random M: hebbian adds b v k^T; delta decays, then steps on the decayed memory
    (Gated DeltaNet); dgd takes the step c = b / (1 + b ||k||^2)."""
    k = F.normalize(torch.randn(1, 1, 1, 4, dtype=torch.float64), dim=-1) * 2
    v, q = torch.randn(1, 1, 1, 3, dtype=torch.float64), torch.randn(1, 1, 1, 4, dtype=torch.float64)
    m0 = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    kk, vv, M = k[0, 0, 0], v[0, 0, 0], m0[0, 0]
    b, a = 0.3, 0.9
    c = b / (1 + b * kk @ kk)
    log_a = torch.full((1, 1, 1), a, dtype=torch.float64).log()
    expected = {
        "hebbian": a * M + b * torch.outer(vv, kk),
        "delta": a * M - b * torch.outer(a * M @ kk - vv, kk),
        "dgd": a * M - c * torch.outer(a * M @ kk - vv, kk),
    }
    for rule, want in expected.items():
        for op in (linear_memory_recurrent, linear_memory_chunked):
            y, m = op(q, k, v, rule=rule, lr=b, log_decay=log_a, initial_state=m0)
            assert max_diff(m[0, 0], want) < 1e-12, (rule, op.__name__)
            assert max_diff(y[0, 0, 0], want @ q[0, 0, 0]) < 1e-12, (rule, op.__name__)


def test_dgd_step_is_the_proximal_minimiser():
    """Longhorn with decay: M_t = argmin_M 1/2||M k - v||^2 + 1/(2 b)||M - a M_{t-1}||^2."""
    k, v = torch.randn(1, 1, 1, 4, dtype=torch.float64), torch.randn(1, 1, 1, 3, dtype=torch.float64)
    m0, b, a = torch.randn(1, 1, 3, 4, dtype=torch.float64), 0.8, 0.7
    log_a = torch.full((1, 1, 1), a, dtype=torch.float64).log()
    _, m = linear_memory_recurrent(k, k, v, rule="dgd", lr=b, log_decay=log_a, initial_state=m0)
    m = m[0, 0].clone().requires_grad_()
    obj = 0.5 * (m @ k[0, 0, 0] - v[0, 0, 0]).pow(2).sum() + (m - a * m0[0, 0]).pow(2).sum() / (2 * b)
    (g,) = torch.autograd.grad(obj, m)
    assert g.abs().max() < 1e-12


@pytest.mark.parametrize("rule", RULES)
def test_layer_streamed_equals_whole_and_recurrent(rule):
    layer = nl_layers.LinearMemory(24, heads=3, rule=rule, chunk_size=16).double()
    x = torch.randn(2, 63, 24, dtype=torch.float64, requires_grad=True)
    y, state = layer(x)
    y_rec, state_rec = layer(x, mode="recurrent")
    assert max_diff(y, y_rec) < 1e-12 and max_diff(state.memory, state_rec.memory) < 1e-12
    parts, s = [], None
    for piece in torch.split(x, [5, 30, 1, 27], dim=1):
        out, s = layer(piece, s)
        parts.append(out)
    assert max_diff(torch.cat(parts, 1), y) < 1e-12 and max_diff(s.memory, state.memory) < 1e-12
    assert_grads_close(layer, x, y, y_rec)
    assert_grads_close(layer, x, torch.cat(parts, 1), y)


def test_host_data_sees_a_tensor_built_from_a_python_number():
    with HostData() as made:
        torch.where(torch.ones(3, dtype=torch.bool), torch.zeros(3), torch.tensor(float("-inf")))
    assert len(made) == 1 and "torch.tensor" in made[0]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("chunk, t, gated", [(64, 32, True), (8, 300, True), (8, 20, False)])
def test_layer_builds_no_tensor_from_host_data_forward_or_backward(rule, chunk, t, gated):
    """What a CUDA graph captures (the recall suite's graphed loss) must not copy from the host: a
    torch.tensor(-inf, device=...) in the chunked form made hebbian/delta/dgd fall back to eager on GPUs."""
    layer = nl_layers.LinearMemory(32, heads=2, rule=rule, chunk_size=chunk, data_dependent_lr=gated, decay=gated)
    x = torch.randn(2, t, 32, requires_grad=True)
    state = layer(torch.randn(2, 5, 32))[1]
    with HostData() as made:
        y, s = layer(x, state)
        torch.autograd.grad((y.square().sum() + s.memory.sum()), [x, *layer.parameters()])
    assert made == []


def test_layer_under_autocast_runs_in_bfloat16_close_to_float32():
    layer = nl_layers.LinearMemory(32, heads=2, rule="delta", chunk_size=16)
    x = torch.randn(2, 50, 32)
    y, state = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac, state_ac = layer(x)
    assert y_ac.dtype == torch.bfloat16 and state_ac.memory.dtype == torch.bfloat16
    assert max_diff(y_ac.float(), y) < 0.05 * y.abs().max()


def test_layer_options_and_chunk_one():
    layer = nl_layers.LinearMemory(16, heads=2, rule="hebbian", data_dependent_lr=False, decay=False, lr=0.5, chunk_size=1).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    assert max_diff(layer(x)[0], layer(x, mode="recurrent")[0]) < 1e-12
    assert layer.to_lr is None and layer.to_decay is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=-3), "chunk_size"),
        (dict(rule="oja"), "rule"),
        (dict(heads=5), "divisible"),
        (dict(lr=0.0), "lr"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nl_layers.LinearMemory(16, **kwargs)


def test_bad_inputs():
    layer = nl_layers.LinearMemory(16, heads=2)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(3, 16))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(2, 5, 15))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 5, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="time steps"):
        layer(torch.randn(2, 0, 16))
    x = torch.randn(2, 5, 16)
    x[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer(x)
    with pytest.raises(ValueError, match="mode"):
        layer(torch.randn(2, 5, 16), mode="parallel")
    q = torch.randn(1, 1, 4, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_memory_chunked(q, q, q, chunk_size=0)
    with pytest.raises(ValueError, match="lr"):
        linear_memory_chunked(q, q, q, lr=torch.ones(1, 1, 5))
    with pytest.raises(ValueError, match="initial_state"):
        linear_memory_recurrent(q, q, q, initial_state=torch.zeros(1, 1, 4, 4))
    with pytest.raises(TypeError, match="one dtype"):
        linear_memory_chunked(q, q, q.double())
    with pytest.raises(ValueError, match="impl"):
        linear_memory_chunked(q, q, q, impl="triton")
    with pytest.raises(ValueError, match="layout"):
        linear_memory_recurrent(q, q, q, layout="tbhd")
    with pytest.raises(ValueError, match="log_decay"):
        linear_memory_chunked(q, q, q, log_decay=torch.zeros(1, 4, 1), layout="bhtd")


def test_fla_impl_on_cpu_names_the_fix():
    q = torch.randn(1, 1, 4, 3, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"kernels|CUDA|cuda"):
        linear_memory_chunked(q, q, q, impl="fla")
    layer = nl_layers.LinearMemory(16, heads=2, impl="fla")
    with pytest.raises(RuntimeError, match="impl"):
        layer(torch.randn(1, 5, 16))


def test_nan_propagates_only_in_its_row_when_checks_are_off():
    """Documented behaviour with set_finite_checks(False): NaN reaches the outputs of its own batch row only."""
    layer = nl_layers.LinearMemory(16, heads=2, chunk_size=4)
    x = torch.randn(2, 9, 16)
    x[1, 6] = float("nan")
    nl_layers.set_finite_checks(False)
    try:
        y, _ = layer(x)
    finally:
        nl_layers.set_finite_checks(True)
    assert torch.isfinite(y[0]).all()
    assert torch.isnan(y[1, 6:]).all()


OPS_MODULES = ["nl_layers.ops.linear_memory"] + [
    f"nl_layers.ops.linear_memory.{name}" for name in ("naive", "chunked", "fla", "fla_gated", "rules", "validate")
]


@pytest.mark.parametrize("name", OPS_MODULES)
def test_ops_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = run_examples(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
