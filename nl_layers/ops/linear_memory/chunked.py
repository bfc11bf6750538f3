"""Chunked form of the linear memory in pure torch: all work inside chunks at once, one matmul per chunk.

Split time into chunks of C tokens. In a chunk with start state M_0, g_t = prod_{r<=t} a_r (from
the chunk start), D_ts = g_t / g_s for s <= t (0 above the diagonal) and writes u_t:

    M_t = g_t M_0 + sum_{s<=t} D_ts u_s k_s^T.

Delta rules (u_t = b_t (v_t - a_t M_{t-1} k_t)): the writes solve the unit lower-triangular system
(the WY/UT transform of DeltaNet)

    (I + L) U = diag(b) V - diag(b g) K M_0^T,   L_ts = b_t D_ts k_t.k_s  (s < t),

so U = W_v - W_k M_0^T with W_v = (I + L)^{-1} diag(b) V and W_k = (I + L)^{-1} diag(b g) K
(hebbian: W_v = diag(b) V, W_k = 0). With P = D * (Q K^T) and r_s = g_C / g_s, each chunk is an
affine map of its start state:

    Y   = P W_v + (diag(g) Q - P W_k) M_0^T                    (outputs)
    M_C = M_0 A + B,   A = g_C I - W_k^T diag(r) K,   B = W_v^T diag(r) K.

Everything except the recurrence M_{i+1} = M_i A_i + B_i is computed for all chunks at once; for
the delta rules a loop does one batched matmul per chunk, for hebbian (A_i = g_C I, a scalar) the
states of all chunks come at once from the fast-weight scan across chunks (a closed form, or a
log-depth scan beyond 16 chunks: no loop over chunks); all outputs come after it from the
chunk-start states in one batched product. Time is padded to a multiple of C
with inert tokens (b = 0, a = 1). float16/bfloat16 inputs are computed in float32 (autocast off)
and the results cast back; gradients flow through everything by autograd.

Example:
    >>> q = k = torch.nn.functional.normalize(torch.randn(1, 2, 37, 8, dtype=torch.float64), dim=-1)
    >>> v = torch.randn(1, 2, 37, 5, dtype=torch.float64); b = torch.rand(1, 2, 37, dtype=torch.float64)
    >>> from nl_layers.ops.linear_memory.naive import recurrent
    >>> y, m = chunked(q, k, v, b, None, None, delta=True, chunk_size=16)
    >>> y_ref, m_ref = recurrent(q, k, v, b, None, None, delta=True)
    >>> bool(torch.allclose(y, y_ref)) and bool(torch.allclose(m, m_ref))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fast_weights import cross

__all__ = ["chunked"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunked(q, k, v, b, log_decay, initial_state, *, delta: bool, chunk_size: int):
    """The chunked form above; same arguments and results as ``naive.recurrent`` plus ``chunk_size``.

    Args:
        q, k: (B, H, T, dk); v: (B, H, T, dv); b, log_decay: (B, H, T) (log_decay may be None);
        initial_state: (B, H, dv, dk) or None; delta: delta/dgd if True, hebbian if False.

    Returns:
        (y, M_T) in q's dtype: y (B, H, T, dv), M_T (B, H, dv, dk).
    """
    out_dtype = q.dtype
    dtype = _compute_dtype(out_dtype)
    with torch.autocast(q.device.type, enabled=False):
        up = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        y, m = _chunked(up(q), up(k), up(v), up(b), up(log_decay), up(initial_state), delta, chunk_size)
    return y.to(out_dtype), m.to(out_dtype)


def _chunked(q, k, v, b, log_a, m0, delta, c):
    bsz, h, t, dk = k.shape
    dv = v.shape[-1]
    bh = bsz * h
    pad = (-t) % c
    if log_a is None:
        log_a = b.new_zeros(b.shape)
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        b, log_a = F.pad(b, (0, pad)), F.pad(log_a, (0, pad))
    n = (t + pad) // c
    q, k, v = (x.reshape(bh, n, c, x.shape[-1]) for x in (q, k, v))
    b, log_a = b.reshape(bh, n, c), log_a.reshape(bh, n, c)

    cum = log_a.cumsum(-1)  # log g_t
    ones = torch.ones(c, c, dtype=torch.bool, device=q.device)
    # -inf as a Python scalar: torch.tensor(-inf, device=cuda) copies from the host (refused in a CUDA graph capture)
    decay = torch.where(ones.tril(), cum[..., :, None] - cum[..., None, :], float("-inf")).exp()  # D (bh,n,c,c)
    g = cum.exp()[..., None]  # (bh,n,c,1)
    kr = (cum[..., -1:] - cum).exp()[..., None] * k  # diag(r) K
    bv = b[..., None] * v
    if delta:
        lower = (b[..., :, None] * decay * (k @ k.transpose(-1, -2))).tril(-1)
        system = lower + torch.eye(c, dtype=q.dtype, device=q.device)
        rhs = torch.cat([bv, (b[..., None] * g) * k], dim=-1)
        w_v, w_k = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True).split([dv, dk], -1)
    else:
        w_v, w_k = bv, None
    p = decay * (q @ k.transpose(-1, -2))  # (bh,n,c,c), lower triangular with diagonal
    y_free = p @ w_v  # (bh,n,c,dv)
    q_eff = g * q if w_k is None else g * q - p @ w_k  # (bh,n,c,dk): reads the chunk-start state
    shift = w_v.transpose(-1, -2) @ kr  # B_i, (bh,n,dv,dk)
    if delta:
        eye = torch.eye(dk, dtype=q.dtype, device=q.device)
        maps = (g[..., -1, :, None] * eye - w_k.transpose(-1, -2) @ kr).transpose(0, 1)  # A_i, (n,bh,dk,dk)
        m = m0.reshape(bh, dv, dk) if m0 is not None else q.new_zeros(bh, dv, dk)
        starts = []
        for a_i, b_i in zip(maps.unbind(0), shift.transpose(0, 1).unbind(0)):
            starts.append(m)
            m = torch.baddbmm(b_i, m, a_i)
        states = torch.stack(starts, dim=1)  # (bh,n,dv,dk)
    else:  # scalar transitions: every chunk-start state at once (closed form, or a log-depth scan)
        states, m = _scalar_states(cum[..., -1], shift, None if m0 is None else m0.reshape(bh, dv, dk))
    y = y_free + q_eff @ states.transpose(-1, -2)
    y = y.reshape(bsz, h, n * c, dv)[:, :, :t]
    return y, m.reshape(bsz, h, dv, dk)


def _scalar_states(log_g, shift, m0):
    """M_{i+1} = g_i M_i + B_i for every chunk i at once: (start states (bh,n,dv,dk), end state)."""
    summaries = shift[:, :, None]  # one stacked component (no momentum): (bh, n, 1, dv, dk)
    if log_g.shape[1] <= cross.GROUP:
        starts, final = cross.closed_states(cross.cross_operator(log_g, None, None), summaries, m0, None)
    else:
        starts, final = cross.grouped_states(log_g, None, None, summaries, m0, None)
    return starts[:, :, 0], final[:, 0]
