"""Linear associative memory: linear attention, gated DeltaNet and Longhorn (DGD) as one layer.

The memory is a matrix M in R^{dv x dk} per head. Each token writes a key/value pair and reads
y_t = M_t q_t (after its own write). With a decay gate a_t in (0, 1] and a step size b_t > 0:

    hebbian:  M_t = a_t M_{t-1} + b_t v_t k_t^T                        (gated linear attention)
    delta:    M_t = a_t M_{t-1} - b_t (M_{t-1} k_t - v_t) k_t^T        (gated DeltaNet)
    dgd:      the delta rule with b_t -> c_t = b_t / (1 + b_t ||k_t||^2) (Longhorn: the closed-form
              step on 1/2||M k - v||^2 + 1/(2 b)||M - M_{t-1}||^2)

Two implementations that agree to rounding: a token-by-token recurrent reference and a chunked
parallel form. The chunked form writes every rule as M_t = a_t M_{t-1} + u_t k_t^T; within a
chunk the corrections u solve a unit lower-triangular system (the WY/UT transform of DeltaNet):

    (I + L) U = diag(b) (V - diag(g_excl) K M_0^T),   L_ts = b_t (g_{t-1}/g_s) k_t.k_s  (s < t)

with g_t the product of the gates since the chunk start (L = 0 for hebbian), then
y_t = g_t M_0 q_t + sum_{s<=t} (g_t/g_s)(k_s.q_t) u_s and M_C = g_C M_0 + sum_s (g_C/g_s) u_s k_s^T.

References: Katharopoulos et al. 2020 (linear attention); Yang et al. 2024 (DeltaNet, Gated
DeltaNet); Liu et al. 2024 (Longhorn); Behrouz et al. 2025 (Nested Learning, section 5).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_positive_int, check_sequence, check_state_batch
from .._modules import l2_normalize, merge_heads, split_heads

RULES = ("hebbian", "delta", "dgd")


class LinearMemoryState(NamedTuple):
    """Streaming state of a linear memory: the matrix memory M, shape (B, H, dv, dk)."""

    memory: torch.Tensor


def _check_qkv(q, k, v, lr, log_decay, initial_state):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, time, dim), got {getattr(t, 'shape', t)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must share (batch, heads, time) with k: {tuple(v.shape)} vs {tuple(k.shape)}")
    b, h, t, dk = k.shape
    for name, g in (("lr", lr), ("log_decay", log_decay)):
        if isinstance(g, torch.Tensor) and g.shape != (b, h, t):
            raise ValueError(f"{name} must be a float or a tensor of shape {(b, h, t)}, got {tuple(g.shape)}")
    if log_decay is not None and not isinstance(log_decay, torch.Tensor):
        raise TypeError("log_decay must be None or a tensor of log-gates (<= 0) of shape (batch, heads, time)")
    if initial_state is not None and initial_state.shape != (b, h, v.shape[-1], dk):
        raise ValueError(f"initial_state must have shape {(b, h, v.shape[-1], dk)}, got {tuple(initial_state.shape)}")


def _step_sizes(rule, k, lr):
    b = lr if isinstance(lr, torch.Tensor) else torch.full(k.shape[:3], float(lr), dtype=k.dtype, device=k.device)
    if rule == "dgd":
        b = b / (1.0 + b * (k * k).sum(-1))
    return b


def linear_memory_recurrent(q, k, v, *, rule="delta", lr=1.0, log_decay=None, initial_state=None):
    """Token-by-token reference of the linear memory rules.

    Args:
        q, k: (B, H, T, dk); v: (B, H, T, dv).
        rule: "hebbian", "delta" or "dgd".
        lr: step size b_t, a float or a (B, H, T) tensor.
        log_decay: None (a_t = 1) or a (B, H, T) tensor of log a_t <= 0.
        initial_state: M_0 of shape (B, H, dv, dk); zeros when None.

    Returns:
        (y, M_T): y of shape (B, H, T, dv) with y_t = M_t q_t, and the final memory.

    Example:
        >>> q = k = torch.randn(1, 2, 5, 4); v = torch.randn(1, 2, 5, 3)
        >>> y, m = linear_memory_recurrent(q, k, v, rule="hebbian")
        >>> y.shape, m.shape
        (torch.Size([1, 2, 5, 3]), torch.Size([1, 2, 3, 4]))
    """
    check_choice(rule, "rule", RULES)
    _check_qkv(q, k, v, lr, log_decay, initial_state)
    bsz, h, t, dk = k.shape
    m = initial_state if initial_state is not None else k.new_zeros(bsz, h, v.shape[-1], dk)
    b = _step_sizes(rule, k, lr)
    ys = []
    for i in range(t):
        a = log_decay[..., i].exp()[..., None, None] if log_decay is not None else 1.0
        kt, vt = k[:, :, i], v[:, :, i]
        if rule == "hebbian":
            write = vt
        else:
            write = vt - torch.einsum("bhvk,bhk->bhv", m, kt)
        m = a * m + b[:, :, i, None, None] * write[..., :, None] * kt[..., None, :]
        ys.append(torch.einsum("bhvk,bhk->bhv", m, q[:, :, i]))
    return torch.stack(ys, dim=2), m


def _segment_decays(log_a):
    """Within-chunk decay products from log-gates (..., C).

    Returns D (..., C, C) with D_ts = prod_{s<r<=t} a_r for s <= t (0 above the diagonal),
    E (..., C, C) with E_ts = prod_{s<r<t} a_r for s < t (0 elsewhere), and
    g (..., C) = prod_{r<=t} a_r, g_excl (..., C) = prod_{r<t} a_r.
    """
    c = log_a.shape[-1]
    cum = log_a.cumsum(-1)
    excl = cum - log_a
    ones = torch.ones(c, c, dtype=torch.bool, device=log_a.device)
    incl_mask, strict_mask = ones.tril(), ones.tril(-1)
    neg_inf = torch.tensor(float("-inf"), dtype=log_a.dtype, device=log_a.device)
    d = torch.where(incl_mask, cum[..., :, None] - cum[..., None, :], neg_inf).exp()
    e = torch.where(strict_mask, excl[..., :, None] - cum[..., None, :], neg_inf).exp()
    return d, e, cum.exp(), excl.exp()


def linear_memory_chunked(q, k, v, *, rule="delta", lr=1.0, log_decay=None, chunk_size=64, initial_state=None):
    """Chunked parallel form of :func:`linear_memory_recurrent` (same arguments, same results).

    Work inside a chunk is matrix products and one triangular solve per chunk, all chunks at
    once; only the state M is carried from chunk to chunk. Any length T works: the tail is
    padded with inert tokens (b = 0, a = 1) that leave the state unchanged. Half and bfloat16
    inputs are computed in float32 and the results cast back.

    Example:
        >>> q = k = F.normalize(torch.randn(1, 2, 63, 8), dim=-1); v = torch.randn(1, 2, 63, 8)
        >>> y1, m1 = linear_memory_chunked(q, k, v, rule="delta", lr=0.5, chunk_size=16)
        >>> y2, m2 = linear_memory_recurrent(q, k, v, rule="delta", lr=0.5)
        >>> bool(torch.allclose(y1, y2, atol=1e-5))
        True
    """
    check_choice(rule, "rule", RULES)
    check_positive_int(chunk_size, "chunk_size")
    _check_qkv(q, k, v, lr, log_decay, initial_state)
    if q.dtype in (torch.float16, torch.bfloat16):  # gate products and the triangular solve need float32
        up = lambda t: t.float() if isinstance(t, torch.Tensor) else t  # noqa: E731
        y, m = linear_memory_chunked(
            up(q), up(k), up(v), rule=rule, lr=up(lr), log_decay=up(log_decay), chunk_size=chunk_size,
            initial_state=up(initial_state),
        )
        return y.to(q.dtype), m.to(q.dtype)
    bsz, h, t, dk = k.shape
    dv = v.shape[-1]
    b = _step_sizes(rule, k, lr)
    log_a = log_decay if log_decay is not None else k.new_zeros(bsz, h, t)
    pad = (-t) % chunk_size
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        b, log_a = F.pad(b, (0, pad)), F.pad(log_a, (0, pad))
    n = (t + pad) // chunk_size
    q, k, v = (x.reshape(bsz, h, n, chunk_size, x.shape[-1]) for x in (q, k, v))
    b, log_a = b.reshape(bsz, h, n, chunk_size), log_a.reshape(bsz, h, n, chunk_size)

    d, e, g, g_excl = _segment_decays(log_a)  # (B,H,N,C,C), (B,H,N,C)
    bv = b[..., None] * v
    if rule == "hebbian":
        u_free, u_state = bv, None
    else:
        # (I + L) U = b (V - g_excl K M_0^T);  L_ts = b_t E_ts k_t.k_s for s < t.
        lower = b[..., :, None] * e * (k @ k.transpose(-1, -2))
        eye = torch.eye(chunk_size, dtype=k.dtype, device=k.device)
        system = eye + lower
        u_free = torch.linalg.solve_triangular(system, bv, upper=False, unitriangular=True)
        u_state = torch.linalg.solve_triangular(
            system, (b * g_excl)[..., None] * k, upper=False, unitriangular=True
        )  # U = u_free - u_state M_0^T
    attn = d * (q @ k.transpose(-1, -2))  # (B,H,N,C,C): D_ts (q_t . k_s)
    to_end = d[..., -1, :]  # (B,H,N,C): prod_{s<r<=C} a_r

    m = initial_state if initial_state is not None else k.new_zeros(bsz, h, dv, dk)
    ys = []
    for i in range(n):
        u = u_free[:, :, i]
        if u_state is not None:
            u = u - u_state[:, :, i] @ m.transpose(-1, -2)
        gi = g[:, :, i]
        ys.append(gi[..., None] * (q[:, :, i] @ m.transpose(-1, -2)) + attn[:, :, i] @ u)
        m = gi[..., -1, None, None] * m + (to_end[:, :, i, :, None] * u).transpose(-1, -2) @ k[:, :, i]
    y = torch.stack(ys, dim=2).reshape(bsz, h, n * chunk_size, dv)[:, :, :t]
    return y, m


class LinearMemory(nn.Module):
    """Multi-head linear associative memory layer (hebbian / delta / dgd rule).

    x (B, T, dim) -> q, k, v projections per head (q, k l2-normalized by default), an optional
    data-dependent step size b_t = lr * sigmoid(w_b . x_t) and decay gate a_t = sigmoid(w_a . x_t),
    the memory recurrence of the chosen rule, then an output projection.

    Args:
        dim: model width.
        heads: number of heads; head_dim defaults to dim // heads.
        rule: "hebbian" (linear attention), "delta" (gated DeltaNet) or "dgd" (Longhorn).
        lr: step size (the maximum step when ``data_dependent_lr``).
        data_dependent_lr: learn b_t from the input.
        decay: learn a decay gate a_t from the input (otherwise a_t = 1).
        chunk_size: chunk length of the parallel form.
        normalize_qk: l2-normalize q and k (keeps the delta rules stable for lr <= 1).

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
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(heads, "heads")
        check_choice(rule, "rule", RULES)
        check_positive_int(chunk_size, "chunk_size")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}), or pass head_dim")
            head_dim = dim // heads
        check_positive_int(head_dim, "head_dim")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.dim, self.heads, self.head_dim, self.rule = dim, heads, head_dim, rule
        self.lr, self.chunk_size, self.normalize_qk = float(lr), chunk_size, normalize_qk
        inner = heads * head_dim
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_lr = nn.Linear(dim, heads) if data_dependent_lr else None
        self.to_decay = nn.Linear(dim, heads) if decay else None
        if self.to_decay is not None:
            nn.init.constant_(self.to_decay.bias, 3.0)  # a_t ~ 0.95 at init: long memory
        self.out = nn.Linear(inner, dim, bias=False)

    def gates(self, x: torch.Tensor):
        """Step sizes b (B, H, T) (or a float) and log-decays (B, H, T) (or None) for input x."""
        lr = self.lr * torch.sigmoid(self.to_lr(x)).transpose(1, 2) if self.to_lr is not None else self.lr
        log_decay = F.logsigmoid(self.to_decay(x)).transpose(1, 2) if self.to_decay is not None else None
        return lr, log_decay

    def forward(self, x: torch.Tensor, state: LinearMemoryState | None = None, mode: str = "chunked"):
        check_sequence(x, self.dim)
        check_choice(mode, "mode", ("chunked", "recurrent"))
        q, k, v = (split_heads(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        if self.normalize_qk:
            q, k = l2_normalize(q), l2_normalize(k)
        lr, log_decay = self.gates(x)
        m0 = state.memory if state is not None else None
        if m0 is not None:
            check_state_batch(m0.shape[0], x.shape[0])
        kwargs = dict(rule=self.rule, lr=lr, log_decay=log_decay, initial_state=m0)
        if mode == "chunked":
            y, m = linear_memory_chunked(q, k, v, chunk_size=self.chunk_size, **kwargs)
        else:
            y, m = linear_memory_recurrent(q, k, v, **kwargs)
        return self.out(merge_heads(y)), LinearMemoryState(m)
