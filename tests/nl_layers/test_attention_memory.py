"""Softmax attention as the minimiser of a weighted L2 memory objective == F.scaled_dot_product_attention."""

import pytest
import torch
import torch.nn.functional as F

import nl_layers
from nl_layers.memory.attention import memory_objective, softmax_memory, softmax_memory_reference

from .helpers import assert_grads_close, grads_of, max_diff


def _qkv(tq=63, tk=63, requires_grad=False):
    q = torch.randn(2, 3, tq, 10, dtype=torch.float64, requires_grad=requires_grad)
    k = torch.randn(2, 3, tk, 10, dtype=torch.float64, requires_grad=requires_grad)
    v = torch.randn(2, 3, tk, 7, dtype=torch.float64, requires_grad=requires_grad)
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 16, 128])
def test_memory_forms_equal_sdpa(causal, chunk):
    q, k, v = _qkv()
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert max_diff(softmax_memory(q, k, v, causal=causal, chunk_size=chunk), sdpa) < 1e-12
    assert max_diff(softmax_memory_reference(q, k, v, causal=causal), sdpa) < 1e-12


def test_gradients_equal_sdpa():
    q, k, v = _qkv(requires_grad=True)
    ours = softmax_memory(q, k, v, causal=True, chunk_size=16)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for a, b in zip(grads_of(ours, [q, k, v]), grads_of(sdpa, [q, k, v])):
        assert max_diff(a, b) < 1e-10


def test_read_out_minimises_the_memory_objective():
    """The gradient of sum_i s(k_i, q)||v_i - M||^2 vanishes at the read-out, and any move raises the objective."""
    q, k, v = _qkv(tq=9, tk=9)
    m = softmax_memory(q, k, v, causal=True).requires_grad_()
    obj = memory_objective(m, q, k, v, causal=True)
    (g,) = torch.autograd.grad(obj.sum(), m)
    assert g.abs().max() < 1e-9
    nudged = memory_objective(m.detach() + 1e-3 * torch.randn_like(m), q, k, v, causal=True)
    assert (nudged > obj.detach()).all()


def test_queries_at_the_end_of_a_longer_key_sequence():
    """Tq < Tk: the queries are the last Tq positions (streaming with a cache)."""
    q, k, v = _qkv(tq=5, tk=20)
    full_q = torch.cat([torch.zeros(2, 3, 15, 10, dtype=torch.float64), q], dim=2)
    full = F.scaled_dot_product_attention(full_q, k, v, is_causal=True)[:, :, 15:]
    assert max_diff(softmax_memory(q, k, v, causal=True, chunk_size=4), full) < 1e-12
    assert max_diff(softmax_memory_reference(q, k, v, causal=True), full) < 1e-12


@pytest.mark.parametrize("rope", [True, False])
def test_layer_streamed_equals_whole_and_memory_impl_equals_sdpa(rope):
    attn = nl_layers.AttentionMemory(24, heads=4, rope=rope).double()
    x = torch.randn(2, 37, 24, dtype=torch.float64, requires_grad=True)
    y, state = attn(x)
    parts, s = [], None
    for piece in torch.split(x, [1, 20, 16], dim=1):
        out, s = attn(piece, s)
        parts.append(out)
    assert max_diff(torch.cat(parts, 1), y) < 1e-12 and s.keys.shape[2] == 37
    mem = nl_layers.AttentionMemory(24, heads=4, rope=rope, impl="memory", chunk_size=8).double()
    mem.load_state_dict(attn.state_dict())
    y_mem, _ = mem(x)
    assert max_diff(y_mem, y) < 1e-12
    assert_grads_close(attn, x, y, y_mem, module_b=mem)


def test_non_causal_layer():
    attn = nl_layers.AttentionMemory(16, heads=2, causal=False, impl="memory").double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    y, _ = attn(x)
    ref = nl_layers.AttentionMemory(16, heads=2, causal=False).double()
    ref.load_state_dict(attn.state_dict())
    assert max_diff(ref(x)[0], y) < 1e-12
    with pytest.raises(ValueError, match="causal"):
        attn(x, nl_layers.AttentionMemoryState(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8)))


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="impl"):
        nl_layers.AttentionMemory(16, impl="flash")
    with pytest.raises(ValueError, match="divisible"):
        nl_layers.AttentionMemory(16, heads=3)
    with pytest.raises(ValueError, match="even"):
        nl_layers.AttentionMemory(12, heads=4, rope=True)
    q, k, v = _qkv(tq=8, tk=4)
    with pytest.raises(ValueError, match="at least as many keys"):
        softmax_memory(q, k, v, causal=True)
    with pytest.raises(ValueError, match="chunk_size"):
        softmax_memory(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="4-D"):
        softmax_memory(q[0], k, v)
    attn = nl_layers.AttentionMemory(16, heads=2)
    x = torch.randn(1, 4, 16)
    x[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        attn(x)
