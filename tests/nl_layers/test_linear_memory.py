"""LinearMemory: recurrent reference == chunked parallel form == streamed, outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F

import nl_layers
from nl_layers.memory.linear import RULES, linear_memory_chunked, linear_memory_recurrent

from .helpers import assert_grads_close, grads_of, max_diff

B, H, T, DK, DV = 2, 3, 63, 6, 5


def _inputs(requires_grad=False):
    q = F.normalize(torch.randn(B, H, T, DK, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, H, T, DK, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, T, DV, dtype=torch.float64)
    lr = torch.rand(B, H, T, dtype=torch.float64)
    log_decay = F.logsigmoid(torch.randn(B, H, T, dtype=torch.float64) + 2)
    m0 = torch.randn(B, H, DV, DK, dtype=torch.float64)
    tensors = [q, k, v, lr, log_decay, m0]
    return [t.requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_chunked_equals_recurrent(rule, chunk):
    q, k, v, lr, log_decay, m0 = _inputs()
    y_ref, m_ref = linear_memory_recurrent(q, k, v, rule=rule, lr=lr, log_decay=log_decay, initial_state=m0)
    y, m = linear_memory_chunked(q, k, v, rule=rule, lr=lr, log_decay=log_decay, initial_state=m0, chunk_size=chunk)
    assert max_diff(y, y_ref) < 1e-12 and max_diff(m, m_ref) < 1e-12


@pytest.mark.parametrize("rule", RULES)
def test_chunked_equals_recurrent_constant_lr_no_decay(rule):
    q, k, v, *_ = _inputs()
    y_ref, m_ref = linear_memory_recurrent(q, k, v, rule=rule, lr=0.7)
    y, m = linear_memory_chunked(q, k, v, rule=rule, lr=0.7, chunk_size=16)
    assert max_diff(y, y_ref) < 1e-12 and max_diff(m, m_ref) < 1e-12


@pytest.mark.parametrize("rule", RULES)
def test_gradients_of_chunked_equal_reference(rule):
    inputs = _inputs(requires_grad=True)
    q, k, v, lr, log_decay, m0 = inputs
    y_ref, m_ref = linear_memory_recurrent(q, k, v, rule=rule, lr=lr, log_decay=log_decay, initial_state=m0)
    y, m = linear_memory_chunked(q, k, v, rule=rule, lr=lr, log_decay=log_decay, initial_state=m0, chunk_size=16)
    out_ref = torch.cat([y_ref.flatten(), m_ref.flatten()])
    out = torch.cat([y.flatten(), m.flatten()])
    for a, b in zip(grads_of(out, inputs), grads_of(out_ref, inputs)):
        assert max_diff(a, b) < 1e-10


def test_rules_match_their_definitions():
    """One step from a random M: hebbian adds v k^T, delta subtracts (Mk - v) k^T, dgd rescales the step."""
    k = F.normalize(torch.randn(1, 1, 1, 4, dtype=torch.float64), dim=-1) * 2
    v, q = torch.randn(1, 1, 1, 3, dtype=torch.float64), torch.randn(1, 1, 1, 4, dtype=torch.float64)
    m0 = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    kk, vv, M = k[0, 0, 0], v[0, 0, 0], m0[0, 0]
    b, a = 0.3, 0.9
    log_a = torch.full((1, 1, 1), a, dtype=torch.float64).log()
    expected = {
        "hebbian": a * M + b * torch.outer(vv, kk),
        "delta": a * M - b * torch.outer(M @ kk - vv, kk),
        "dgd": a * M - b / (1 + b * kk @ kk) * torch.outer(M @ kk - vv, kk),
    }
    for rule, want in expected.items():
        _, m = linear_memory_recurrent(q, k, v, rule=rule, lr=b, log_decay=log_a, initial_state=m0)
        assert max_diff(m[0, 0], want) < 1e-12, rule


def test_dgd_step_is_the_proximal_minimiser():
    """Longhorn: M_t = argmin_M 1/2||M k - v||^2 + 1/(2 b)||M - M_{t-1}||^2."""
    k, v = torch.randn(1, 1, 1, 4, dtype=torch.float64), torch.randn(1, 1, 1, 3, dtype=torch.float64)
    m0, b = torch.randn(1, 1, 3, 4, dtype=torch.float64), 0.8
    _, m = linear_memory_recurrent(k, k, v, rule="dgd", lr=b, initial_state=m0)
    m = m[0, 0].clone().requires_grad_()
    obj = 0.5 * (m @ k[0, 0, 0] - v[0, 0, 0]).pow(2).sum() + (m - m0[0, 0]).pow(2).sum() / (2 * b)
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
    assert max_diff(torch.cat(parts, 1), y) < 1e-12
    assert_grads_close(layer, x, y, y_rec)


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
