"""Property: two tokens of the delta rules by hand are Gated DeltaNet's recurrence (decay, then the delta step)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nl_layers.memory.linear import linear_memory_chunked, linear_memory_recurrent

from .helpers import max_diff

gate = st.floats(0.05, 1.0)


@settings(max_examples=25, deadline=None)
@given(a1=gate, a2=gate, b1=st.floats(0.0, 1.5), b2=st.floats(0.0, 1.5), seed=st.integers(0, 2**16),
       rule=st.sampled_from(["delta", "dgd"]))
def test_two_tokens_by_hand(a1, a2, b1, b2, seed, rule):
    g = torch.Generator().manual_seed(seed)
    dk, dv = 3, 2
    q, k = torch.randn(2, 2, dk, generator=g, dtype=torch.float64)  # each (token, dk)
    v = torch.randn(2, dv, generator=g, dtype=torch.float64)
    m0 = torch.randn(dv, dk, generator=g, dtype=torch.float64)
    steps = [b1, b2]
    if rule == "dgd":  # Longhorn: c_t = b_t / (1 + b_t ||k_t||^2)
        steps = [b / (1 + b * float(k[i] @ k[i])) for i, b in enumerate(steps)]
    eye = torch.eye(dk, dtype=torch.float64)
    # M_t = a_t M_{t-1} + b_t (v_t - a_t M_{t-1} k_t) k_t^T  (token 1)
    m1 = a1 * m0 + steps[0] * torch.outer(v[0] - a1 * m0 @ k[0], k[0])
    # = M_{t-1} a_t (I - b_t k_t k_t^T) + b_t v_t k_t^T  (token 2, the transition form)
    m2 = m1 @ (a2 * (eye - steps[1] * torch.outer(k[1], k[1]))) + steps[1] * torch.outer(v[1], k[1])
    want_y = torch.stack([m1 @ q[0], m2 @ q[1]])

    batch = lambda x: x[None, None]  # noqa: E731
    lr = batch(torch.tensor([b1, b2], dtype=torch.float64))
    log_decay = batch(torch.tensor([a1, a2], dtype=torch.float64).log())
    kw = dict(rule=rule, lr=lr, log_decay=log_decay, initial_state=batch(m0))
    results = {"recurrent": linear_memory_recurrent(batch(q), batch(k), batch(v), **kw)}
    for chunk in (1, 2, 16):
        results[f"chunk {chunk}"] = linear_memory_chunked(batch(q), batch(k), batch(v), chunk_size=chunk, **kw)
    for name, (y, m) in results.items():
        assert max_diff(m[0, 0], m2) < 1e-12, name
        assert max_diff(y[0, 0], want_y) < 1e-12, name


@pytest.mark.parametrize("rule", ["delta", "dgd"])
def test_unit_step_on_a_unit_key_stores_the_value_exactly(rule):
    """b = 1, ||k|| = 1, any decay: the delta rule overwrites the decayed read-out, M_t k_t = v_t
    (dgd's c = 1/2 goes halfway)."""
    k = torch.nn.functional.normalize(torch.randn(1, 1, 1, 4, dtype=torch.float64), dim=-1)
    v, m0 = torch.randn(1, 1, 1, 3, dtype=torch.float64), torch.randn(1, 1, 3, 4, dtype=torch.float64)
    log_a = torch.full((1, 1, 1), 0.6, dtype=torch.float64).log()
    _, m = linear_memory_chunked(k, k, v, rule=rule, lr=1.0, log_decay=log_a, initial_state=m0)
    read, old = m[0, 0] @ k[0, 0, 0], 0.6 * m0[0, 0] @ k[0, 0, 0]
    want = v[0, 0, 0] if rule == "delta" else (old + v[0, 0, 0]) / 2
    assert max_diff(read, want) < 1e-12
