"""Linear associative memory layer: gated linear attention, Gated DeltaNet and Longhorn (DGD).

The ops (recurrent reference, pure-torch chunked form, flash-linear-attention kernels) live in
``nl_layers.ops.linear_memory``; this module holds the layer and its streaming state and
re-exports the two public ops.

Example:
    >>> layer = LinearMemory(dim=16, heads=2, rule="dgd", chunk_size=8)
    >>> y, state = layer(torch.randn(1, 20, 16))
    >>> state.memory.shape
    torch.Size([1, 2, 8, 8])
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_positive_int, check_sequence, check_state_batch
from .._modules import l2_normalize
from ..ops.linear_memory import IMPLS, RULES, linear_memory_chunked, linear_memory_recurrent

__all__ = ["RULES", "LinearMemory", "LinearMemoryState", "linear_memory_chunked", "linear_memory_recurrent"]


class LinearMemoryState(NamedTuple):
    """Streaming state of a linear memory: the matrix memory M, shape (B, H, dv, dk)."""

    memory: torch.Tensor


class LinearMemory(nn.Module):
    """Multi-head linear associative memory layer (hebbian / delta / dgd rule).

    x (B, T, dim) -> q, k, v projections per head (q, k l2-normalized by default), a step size
    b_t = lr * sigmoid(w_b . x_t) (or the constant lr), a decay a_t = sigmoid(w_a . x_t) (or 1),
    the memory recurrence of the rule with y_t = M_t q_t, then an output projection:

        hebbian  M_t = a_t M_{t-1} + b_t v_t k_t^T
                 fla: chunk_simple_gla(q, k, b*v, g=log a, scale=1)
        delta    M_t = a_t M_{t-1} + b_t (v_t - a_t M_{t-1} k_t) k_t^T   (Gated DeltaNet)
                 fla: chunk_gated_delta_rule(q, k, v, g=log a, beta=b, scale=1)
        dgd      delta with b_t -> c_t = b_t / (1 + b_t ||k_t||^2)        (Longhorn)
                 fla: chunk_gated_delta_rule(q, k, v, g=log a, beta=c, scale=1)

    Stable at the defaults: q and k are l2-normalized, b_t in (0, lr] with lr = 1 (sigmoid gives
    b_t in (0, 1)) and a_t in (0, 1). A delta step is M_t = M_{t-1} a_t (I - b_t k_t k_t^T) +
    b_t v_t k_t^T; with b_t ||k_t||^2 <= 1 the transition a_t (I - b_t k_t k_t^T) has eigenvalues
    a_t (1 - b_t ||k_t||^2) and a_t, so its spectral norm is a_t <= 1 and
    ||M_t|| <= a_t ||M_{t-1}|| + b_t ||v_t|| ||k_t||: M never amplifies itself (hebbian obeys the
    same bound). dgd's c_t ||k_t||^2 < 1 holds for every b_t > 0.

    Args:
        dim: model width.
        heads: number of heads; head_dim defaults to dim // heads.
        rule: "hebbian" (linear attention), "delta" (Gated DeltaNet) or "dgd" (Longhorn).
        lr: step size (the maximum step when ``data_dependent_lr``).
        data_dependent_lr: learn b_t from the input.
        decay: learn a decay gate a_t from the input (otherwise a_t = 1).
        chunk_size: chunk length of the pure-torch parallel form.
        normalize_qk: l2-normalize q and k (keeps the delta rules stable for lr <= 1).
        impl: "auto" (flash-linear-attention's kernels for float16/bfloat16 CUDA inputs when
            installed, else pure torch), "torch" or "fla".

    ``forward(x, state=None, mode="chunked")`` returns ``(y, LinearMemoryState)``; pass the state
    back to continue a sequence (streaming). ``mode="recurrent"`` runs the token-by-token reference.

    Example:
        >>> layer = LinearMemory(dim=32, heads=4, rule="delta", chunk_size=16)
        >>> x = torch.randn(2, 40, 32)
        >>> y, state = layer(x)
        >>> y2, _ = layer(torch.randn(2, 8, 32), state)   # continue the stream
        >>> y.shape
        torch.Size([2, 40, 32])
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        head_dim: int | None = None,
        rule: str = "delta",
        lr: float = 1.0,
        data_dependent_lr: bool = True,
        decay: bool = True,
        chunk_size: int = 64,
        normalize_qk: bool = True,
        impl: str = "auto",
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(heads, "heads")
        check_choice(rule, "rule", RULES)
        check_positive_int(chunk_size, "chunk_size")
        check_choice(impl, "impl", IMPLS)
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}), or pass head_dim")
            head_dim = dim // heads
        check_positive_int(head_dim, "head_dim")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.dim, self.heads, self.head_dim, self.rule = dim, heads, head_dim, rule
        self.lr, self.chunk_size, self.normalize_qk, self.impl = float(lr), chunk_size, normalize_qk, impl
        inner = heads * head_dim
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_lr = nn.Linear(dim, heads) if data_dependent_lr else None
        self.to_decay = nn.Linear(dim, heads) if decay else None
        if self.to_decay is not None:
            nn.init.constant_(self.to_decay.bias, 3.0)  # a_t ~ 0.95 at init: long memory
        self.out = nn.Linear(inner, dim, bias=False)

    def gates(self, x: torch.Tensor):
        """Step sizes b (B, T, H) (or the float lr) and log-decays (B, T, H) (or None) for input x."""
        lr = self.lr * torch.sigmoid(self.to_lr(x)) if self.to_lr is not None else self.lr
        log_decay = F.logsigmoid(self.to_decay(x)) if self.to_decay is not None else None
        return lr, log_decay

    def forward(self, x: torch.Tensor, state: LinearMemoryState | None = None, mode: str = "chunked"):
        check_sequence(x, self.dim)
        check_choice(mode, "mode", ("chunked", "recurrent"))
        # (B, T, H, D) throughout: the projection's layout and flash-linear-attention's, no transposes
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)) for t in self.to_qkv(x).chunk(3, dim=-1))
        if self.normalize_qk:  # under autocast the norm runs in float32; keep q, k in v's dtype
            q, k = l2_normalize(q).to(v.dtype), l2_normalize(k).to(v.dtype)
        lr, log_decay = self.gates(x)
        m0 = state.memory if state is not None else None
        if m0 is not None:
            check_state_batch(m0.shape[0], x.shape[0])
        kwargs = dict(rule=self.rule, lr=lr, log_decay=log_decay, initial_state=m0, layout="bthd")
        if mode == "chunked":
            y, m = linear_memory_chunked(q, k, v, chunk_size=self.chunk_size, impl=self.impl, **kwargs)
        else:
            y, m = linear_memory_recurrent(q, k, v, **kwargs)
        return self.out(y.flatten(2)), LinearMemoryState(m)
