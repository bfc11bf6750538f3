"""Softmax attention as an associative memory: the read-out is the minimiser of a weighted L2 objective.

For a query q the memory returns

    M*(q) = argmin_M sum_i s(k_i, q) ||v_i - M||^2 = sum_i s(k_i, q) v_i / sum_i s(k_i, q),
    s(k, q) = exp(q.k / sqrt(d)),

which is softmax attention. The memory's state is the sufficient statistics of that objective
(here kept as the keys and values themselves, a KV cache). Three forms that agree:

- :func:`softmax_memory_reference`: solves the objective's normal equations query by query;
- :func:`softmax_memory`: accumulates the statistics (sum of weights, weighted sum of values) over
  key chunks with a running maximum for stability (the flash-attention recurrence);
- ``F.scaled_dot_product_attention``, which :class:`AttentionMemory` uses by default.

Reference: Behrouz et al. 2025 (Nested Learning), section 5.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_positive_int, check_sequence, check_state_batch
from .._modules import Rotary, merge_heads, split_heads


class AttentionMemoryState(NamedTuple):
    """Streaming state: keys (B, H, P, d) and values (B, H, P, dv) seen so far (a KV cache)."""

    keys: torch.Tensor
    values: torch.Tensor


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, time, dim), got {getattr(t, 'shape', t)}")
    if q.shape[-1] != k.shape[-1] or k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _allowed(tq: int, tk: int, causal: bool, device) -> torch.Tensor | None:
    """Boolean (tq, tk) mask: query i (at absolute position tk - tq + i) sees keys j <= its position."""
    if not causal:
        return None
    if tq > tk:
        raise ValueError(f"causal attention needs at least as many keys as queries, got {tq} queries and {tk} keys")
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)


def memory_objective(m: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False):
    """sum_i s(k_i, q) ||v_i - m||^2 for every query (B, H, Tq), with m (B, H, Tq, dv)."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    weights = scores.exp()
    mask = _allowed(q.shape[2], k.shape[2], causal, q.device)
    if mask is not None:
        weights = weights * mask
    dist = (v[:, :, None, :, :] - m[:, :, :, None, :]).pow(2).sum(-1)  # (B, H, Tq, Tk)
    return (weights * dist).sum(-1)


def softmax_memory_reference(q, k, v, causal: bool = False):
    """Query-by-query solution of the memory objective's normal equations (slow reference).

    d/dM sum_i w_i ||v_i - M||^2 = 0  <=>  (sum_i w_i) M = sum_i w_i v_i, with w_i = s(k_i, q)
    (scaled by exp(-max score) for stability, which leaves the minimiser unchanged).

    Example:
        >>> q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
        >>> ref = softmax_memory_reference(q, k, v, causal=True)
        >>> bool(torch.allclose(ref, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6))
        True
    """
    _check(q, k, v)
    tq, tk = q.shape[2], k.shape[2]
    mask = _allowed(tq, tk, causal, q.device)
    out = []
    for i in range(tq):
        visible = slice(None) if mask is None else mask[i]
        ki, vi = k[:, :, visible], v[:, :, visible]
        scores = (ki @ q[:, :, i, :, None])[..., 0] / math.sqrt(q.shape[-1])
        w = (scores - scores.amax(-1, keepdim=True)).exp()
        normal_lhs = w.sum(-1)[..., None]  # sum_i w_i
        normal_rhs = (w[..., None] * vi).sum(-2)  # sum_i w_i v_i
        out.append(normal_rhs / normal_lhs)
    return torch.stack(out, dim=2)


def softmax_memory(q, k, v, causal: bool = False, chunk_size: int = 128):
    """Minimiser of the memory objective from statistics accumulated over key chunks.

    Keeps, per query, the running maximum score mx, the sum of weights l = sum exp(s - mx) and the
    weighted value sum acc; rescales both when the maximum grows; returns acc / l. Equal to
    ``F.scaled_dot_product_attention(q, k, v, is_causal=causal)`` when Tq == Tk; with Tk > Tq the
    queries are the last Tq positions (streaming with a cache).

    Example:
        >>> q, k, v = torch.randn(3, 2, 2, 33, 8).unbind(0)
        >>> y = softmax_memory(q, k, v, causal=True, chunk_size=8)
        >>> bool(torch.allclose(y, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5))
        True
    """
    _check(q, k, v)
    check_positive_int(chunk_size, "chunk_size")
    tq, tk = q.shape[2], k.shape[2]
    mask = _allowed(tq, tk, causal, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1])
    mx = q.new_full(q.shape[:3] + (1,), float("-inf"))
    l = q.new_zeros(q.shape[:3] + (1,))
    acc = q.new_zeros(q.shape[:3] + (v.shape[-1],))
    for start in range(0, tk, chunk_size):
        sl = slice(start, min(start + chunk_size, tk))
        s = (q @ k[:, :, sl].transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask[:, sl], float("-inf"))
        new_mx = torch.maximum(mx, s.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(new_mx), torch.zeros_like(new_mx), new_mx)  # rows with no key yet
        p = (s - safe).exp()
        rescale = (mx - safe).exp()
        l = l * rescale + p.sum(-1, keepdim=True)
        acc = acc * rescale + p @ v[:, :, sl]
        mx = new_mx
    return acc / l


class AttentionMemory(nn.Module):
    """Multi-head softmax attention read as an associative memory (with a streaming KV state).

    Args:
        dim: model width. heads: number of heads (dim divisible by heads).
        causal: causal masking (required for streaming with a state).
        rope: rotary position embedding on q and k (positions continue across streamed calls).
        impl: "sdpa" (``F.scaled_dot_product_attention``) or "memory" (:func:`softmax_memory`);
            they agree to rounding.
        chunk_size: key chunk of the "memory" implementation.

    ``forward(x, state=None, need_state=True)`` returns ``(y, AttentionMemoryState)`` (``need_state``
    is accepted for the blocks' common interface; the state, a cache of keys and values, costs nothing to return).

    Example:
        >>> attn = AttentionMemory(dim=32, heads=4)
        >>> x = torch.randn(2, 10, 32)
        >>> y, state = attn(x)
        >>> y_a, s = attn(x[:, :6]); y_b, _ = attn(x[:, 6:], s)
        >>> bool(torch.allclose(torch.cat([y_a, y_b], 1), y, atol=1e-5))
        True
    """

    def __init__(self, dim: int, heads: int = 4, causal: bool = True, rope: bool = True, impl: str = "sdpa", chunk_size: int = 128):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(heads, "heads")
        check_choice(impl, "impl", ("sdpa", "memory"))
        check_positive_int(chunk_size, "chunk_size")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if rope and (dim // heads) % 2:
            raise ValueError(f"rope needs an even head dimension, got {dim // heads}; pass rope=False or change heads")
        self.dim, self.heads, self.causal, self.rope, self.impl, self.chunk_size = dim, heads, causal, rope, impl, chunk_size
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.rotary = Rotary(dim // heads) if rope else None

    def forward(self, x: torch.Tensor, state: AttentionMemoryState | None = None, need_state: bool = True):
        check_sequence(x, self.dim)
        if state is not None and not self.causal:
            raise ValueError("streaming with a state needs causal=True (a non-causal query would see future keys)")
        if state is not None:
            check_state_batch(state.keys.shape[0], x.shape[0])
        q, k, v = (split_heads(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        past = 0 if state is None else state.keys.shape[2]
        if self.rotary is not None:
            q, k = self.rotary(q, past), self.rotary(k, past)
        if state is not None:
            k, v = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
        if self.impl == "memory":
            y = softmax_memory(q, k, v, causal=self.causal, chunk_size=self.chunk_size)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed(q.shape[2], k.shape[2], True, x.device))
        return self.out(merge_heads(y)), AttentionMemoryState(k, v)
