"""The fast-weight scan: momentum and decay over per-token updates, token by token and chunk-parallel.

Each of N memory copies holds an offset D = W - W_0 and a momentum S. Token t brings an update
u_t (a weight-shaped tensor) and scalar coefficients m_t (momentum) and a_t (decay), in (0, 1]:

    S_t = m_t S_{t-1} + u_t,        D_t = a_t D_{t-1} + S_t.

Without momentum (``log_m=None``) S_t = u_t. :func:`scan_recurrent` runs this token by token (the
reference). The chunked form splits the L tokens into n chunks of C and, inside chunk c with
start state (D^c, S^c), uses the closed form

    D_t = P^a_t D^c + F_t S^c + sum_{r <= t} (D^a D^m)_tr u_r,    S_t = P^m_t S^c + sum_{r <= t} D^m_tr u_r,

D^x_tr = prod_{r < j <= t} x_j, P^x_t = prod_{j <= t} x_j (within the chunk), F = D^a P^m. Every
chunk is an affine map of its start state, (D, S) -> (A D + F S + dD, M S + dS) with scalar
A, F, M, so the same closed form one level up gives the start states of all chunks: for up to
G = 16 chunks one G x G decay-product matrix times the chunk summaries (:func:`scan_maps`);
beyond, groups of G chunks in closed form, the groups' own maps by the same function
(recursively, log_G n levels) and a fix-up, so the cost stays linear in n. No loop over chunks;
everything else is batched over all chunks at once. The last chunk is zero-padded and its end
state read at the last real token (padding with a = m = 1, u = 0 would not be inert for D,
since D_t = D_{t-1} + S_t).

:class:`ChunkPlan` holds the coefficients (shared by every weight matrix of a memory);
:func:`rank1_states` / :func:`rank1_read` work on updates given as rank-1 factors
u_t = left_t right_t^T and never form a per-token matrix (the dual form); :func:`dense_states` /
:func:`dense_all` on materialised updates of any shape.

Example:
    >>> n, length = 3, 10
    >>> u = torch.randn(n, length, 4, 5)
    >>> log_m, log_a = -torch.rand(n, length), -0.1 * torch.rand(n, length)
    >>> d0, s0 = torch.randn(n, 4, 5), torch.randn(n, 4, 5)
    >>> ref, _, _ = scan_recurrent(u, log_m, log_a, d0, s0)
    >>> plan = ChunkPlan.build(log_m, log_a, chunk_size=4)
    >>> starts, (d_last, s_last) = dense_states(plan, plan.blocks(u), d0, s0)
    >>> bool(torch.allclose(dense_all(plan, plan.blocks(u), starts), ref, atol=1e-5))
    True
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def decay_products(log_x: torch.Tensor):
    """D (..., L, L) with D_ts = prod_{s<r<=t} x_r (s <= t, else 0) and the log prefix (..., L), sum_{r<=t} log x_r."""
    length = log_x.shape[-1]
    cum = log_x.cumsum(-1)
    mask = torch.ones(length, length, dtype=torch.bool, device=log_x.device).tril()
    zero = torch.zeros((), dtype=log_x.dtype, device=log_x.device)
    return torch.where(mask, torch.where(mask, cum[..., :, None] - cum[..., None, :], zero).exp(), zero), cum


def bc(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a coefficient against a tensor with extra trailing (parameter) dims."""
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


class ChunkPlan(NamedTuple):
    """Chunk coefficients of one scan; tensors are (N, n, C[, C]) unless noted.

    pa, mix: D_t = pa_t D^c + fs_t S^c + sum_r mix_tr u_r within a chunk; fs (None without momentum).
    dm: S_t = pm_t S^c + sum_r dm_tr u_r (None without momentum).
    end_*: the same at each chunk's last real token, (N, n) or (N, n, C): the chunk-to-chunk maps
    (end_la, end_lm: log A, log M; end_f: F).
    """

    length: int
    size: int
    pa: torch.Tensor
    mix: torch.Tensor
    fs: torch.Tensor | None
    dm: torch.Tensor | None
    end_la: torch.Tensor
    end_f: torch.Tensor | None
    end_lm: torch.Tensor | None
    end_mix: torch.Tensor
    end_dm: torch.Tensor | None

    @property
    def chunks(self) -> int:
        return self.pa.shape[1]

    @staticmethod
    def build(log_m: torch.Tensor | None, log_a: torch.Tensor, chunk_size: int) -> "ChunkPlan":
        """Plan for log-momentum (N, L) (None: no momentum) and log-decay (N, L) in chunks of ``chunk_size``."""
        length = log_a.shape[1]
        size = min(chunk_size, length)
        n = -(-length // size)
        rem = length - (n - 1) * size
        work = torch.promote_types(log_a.dtype, torch.float32)  # decay products in at least float32

        def blocks(t):
            return F.pad(t.to(work), (0, n * size - length)).reshape(t.shape[0], n, size)

        def end(t):  # row of each chunk's last real token
            if t is None:
                return None
            return t[:, :, rem - 1] if rem == size else torch.cat([t[:, :-1, size - 1], t[:, -1:, rem - 1]], 1)

        cast = lambda t: None if t is None else t.to(log_a.dtype)  # noqa: E731
        da, la = decay_products(blocks(log_a))
        if log_m is None:
            mix, fs, dm, lm = da, None, None, None
        else:
            dm, lm = decay_products(blocks(log_m))
            mix, fs = da @ dm, (da @ lm.exp()[..., None])[..., 0]
        return ChunkPlan(
            length, size, cast(la.exp()), cast(mix), cast(fs), cast(dm),
            cast(end(la)), cast(end(fs)), cast(end(lm)), cast(end(mix)), cast(end(dm)),
        )

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, ...) -> (N, n, C, ...), zero-padded at the end."""
        n, size = self.chunks, self.size
        pad = n * size - self.length
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], 1)
        return x.reshape(x.shape[0], n, size, *x.shape[2:])

    def unblocks(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n, C, ...) -> (N, L, ...)."""
        return x.reshape(x.shape[0], -1, *x.shape[3:])[:, : self.length]


GROUP = 16


def _shift(x: torch.Tensor, first: float) -> torch.Tensor:
    """x_{c-1} along dim 1, with ``first`` at c = 0."""
    return torch.cat([torch.full_like(x[:, :1], first), x[:, :-1]], 1)


def _scan_closed(la, f, lm, bd, bs):
    """:func:`scan_maps` for a few maps, with G x G decay-product matrices (bd, bs flattened to (B, G, P))."""
    da, cla = decay_products(la)
    if f is None:
        return cla, None, None, da @ bd, None
    dm, clm = decay_products(lm)
    s_loc = dm @ bs
    d_loc = da @ (bd + f[..., None] * _shift(s_loc, 0.0))
    f_tot = (da @ (f * _shift(clm, 0.0).exp())[..., None])[..., 0]
    return cla, f_tot, clm, d_loc, s_loc


def scan_maps(la, f, lm, bd, bs, group: int = GROUP):
    """Prefix compositions of the maps (D, S) -> (A D + F S + bd, M S + bs), A = exp(la), M = exp(lm).

    la, f, lm: (B, n) (f, lm, bs None without momentum); bd, bs: (B, n, P). Returns the prefix maps
    as (log A, F, log M, D, S) with D, S the states reached from zero: the state after map c from
    (D0, S0) is (A_c D0 + F_c S0 + D_c, M_c S0 + S_c). Closed form up to ``group`` maps; beyond,
    groups in closed form and the groups' maps by this function, then a fix-up.
    """
    b, n = la.shape
    if n <= group:
        return _scan_closed(la, f, lm, bd, bs)
    ng = -(-n // group)
    pad = ng * group - n  # identity maps: A = M = 1, F = 0, no input

    def grouped(t):
        if t is None:
            return None
        t = torch.cat([t, t.new_zeros(b, pad, *t.shape[2:])], 1) if pad else t
        return t.reshape(b * ng, group, *t.shape[2:])

    cla, fl, clm, dl, sl = _scan_closed(*(grouped(t) for t in (la, f, lm, bd, bs)))
    last = lambda t: None if t is None else t[:, -1].reshape(b, ng, *t.shape[2:])  # noqa: E731
    ga, gf, gm, gd, gs = scan_maps(last(cla), last(fl), last(clm), last(dl), last(sl), group)
    # state at each group's start (exclusive prefix), as coefficients on (D0, S0) plus the part from zero
    start = lambda t, first: None if t is None else _shift(t, first).reshape(b * ng, 1, *t.shape[2:])  # noqa: E731
    sa, sf, sm, sd, ss = start(ga, 0.0), start(gf, 0.0), start(gm, 0.0), start(gd, 0.0), start(gs, 0.0)
    a_in = cla.exp()[..., None]
    d = a_in * sd + dl
    if fl is not None:
        d = d + fl[..., None] * ss
        s = clm.exp()[..., None] * ss + sl
        fl, clm = cla.exp() * sf + fl * sm.exp(), clm + sm
    else:
        s = None
    cla = cla + sa
    ungroup = lambda t: None if t is None else t.reshape(b, ng * group, *t.shape[2:])[:, :n]  # noqa: E731
    return ungroup(cla), ungroup(fl), ungroup(clm), ungroup(d), ungroup(s)


def exclusive_products(log_x: torch.Tensor):
    """E (B, n, n) with E_cj = prod_{j<r<c} x_r (j < c, else 0) and e (B, n), e_c = prod_{r<c} x_r."""
    n = log_x.shape[-1]
    cum = log_x.cumsum(-1)
    prev = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], -1)  # sum_{r<c} log x_r
    mask = torch.ones(n, n, dtype=torch.bool, device=log_x.device).tril(-1)
    zero = torch.zeros((), dtype=log_x.dtype, device=log_x.device)
    return torch.where(mask, torch.where(mask, prev[..., :, None] - cum[..., None, :], zero).exp(), zero), prev.exp()


def _states_closed(plan: ChunkPlan, delta_d, delta_s, d0, s0, last_u):
    """:func:`_states` for up to GROUP chunks: the start states straight from the summaries.

    S^c = sum_{j<c} E^m_cj dS_j + e^m_c S_0 and D^c = sum_{j<c} E^a_cj (dD_j + F_j S^j) + e^a_c D_0
    (exclusive products, :func:`exclusive_products`): two batched products, no scan and no
    concatenation of states; the end state is the last chunk's map applied to its start state.
    """
    shape = delta_d.shape
    flat = lambda t: t.reshape(t.shape[0], t.shape[1], -1)  # noqa: E731
    init = lambda e, t0: bc(e, t0[:, None]) * t0[:, None]  # noqa: E731  e_c X_0 for every chunk c
    ea, pa = exclusive_products(plan.end_la)
    s_start = None
    if delta_s is not None:
        em, pm = exclusive_products(plan.end_lm)
        s_start = (em @ flat(delta_s)).reshape(delta_s.shape)
        if s0 is not None:
            s_start = s_start + init(pm, s0)
        carried = delta_d + bc(plan.end_f, delta_d) * s_start
    else:
        carried = delta_d
    d_start = (ea @ flat(carried)).reshape(shape)
    if d0 is not None:
        d_start = d_start + init(pa, d0)
    last = lambda t: t[:, -1]  # noqa: E731
    d_last = bc(last(plan.end_la).exp(), d_start[:, -1]) * last(d_start) + last(carried)
    s_last = last_u if delta_s is None else bc(last(plan.end_lm).exp(), s_start[:, -1]) * last(s_start) + last(delta_s)
    return (d_start, s_start), (d_last, s_last)


def _states(plan: ChunkPlan, delta_d, delta_s, d0, s0, last_u):
    """Chunk start states (D^c, S^c) (N, n, ...) and the end state from the chunk summaries.

    d0, s0 None: a zero initial state (no work is spent on it).
    """
    if plan.chunks <= GROUP:
        return _states_closed(plan, delta_d, delta_s, d0, s0, last_u)
    d0 = torch.zeros_like(delta_d[:, 0]) if d0 is None else d0
    s0 = torch.zeros_like(delta_s[:, 0]) if (s0 is None and delta_s is not None) else s0
    # Fold the initial state into chunk 0's summary, so the scan from zero gives the states themselves.
    first_d = bc(plan.end_la[:, 0].exp(), d0) * d0
    if plan.end_f is not None:
        first_d = first_d + bc(plan.end_f[:, 0], s0) * s0
        first_s = bc(plan.end_lm[:, 0].exp(), s0) * s0
        delta_s = torch.cat([delta_s[:, :1] + first_s[:, None], delta_s[:, 1:]], 1)
    delta_d = torch.cat([delta_d[:, :1] + first_d[:, None], delta_d[:, 1:]], 1)
    flat = lambda t: None if t is None else t.reshape(t.shape[0], t.shape[1], -1)  # noqa: E731
    _, _, _, d_end, s_end = scan_maps(plan.end_la, plan.end_f, plan.end_lm, flat(delta_d), flat(delta_s), GROUP)
    n = plan.chunks
    d_head, d_last = d_end.reshape(delta_d.shape).split([n - 1, 1], 1)
    if s_end is not None:
        s_head, s_last = s_end.reshape(delta_s.shape).split([n - 1, 1], 1)
        s_start, s_last = torch.cat([s0[:, None], s_head], 1), s_last[:, 0]
    else:
        s_start, s_last = None, last_u
    return (torch.cat([d0[:, None], d_head], 1), s_start), (d_last[:, 0], s_last)


def rank1_states(plan: ChunkPlan, left, right, d0, s0):
    """Updates u_t = left_t right_t^T given blocked, left (N, n, C, o), right (N, n, C, i); d0, s0 (N, o, i).

    Returns ((D^c, S^c) chunk start states (N, n, o, i), S^c None without momentum), (D_L, S_L)).
    """
    summary = lambda w: (left * w[..., None]).transpose(-1, -2) @ right  # noqa: E731  sum_r w_r u_r per chunk
    delta_d = summary(plan.end_mix)
    delta_s = summary(plan.end_dm) if plan.end_dm is not None else None
    last_u = None
    if plan.end_dm is None:
        i = (plan.length - 1) % plan.size
        last_u = left[:, -1, i, :, None] * right[:, -1, i, None, :]
    return _states(plan, delta_d, delta_s, d0, s0, last_u)


def rank1_read(plan: ChunkPlan, left, right, starts, x):
    """D_t x_t for every token of blocked x (N, n, C, i), without forming D_t: (N, n, C, o)."""
    d_start, s_start = starts
    out = plan.pa[..., None] * (x @ d_start.transpose(-1, -2)) + (plan.mix * (x @ right.transpose(-1, -2))) @ left
    if s_start is not None:
        out = out + plan.fs[..., None] * (x @ s_start.transpose(-1, -2))
    return out


def dense_states(plan: ChunkPlan, u, d0, s0):
    """As :func:`rank1_states` for materialised blocked updates u (N, n, C, *shape)."""
    summary = lambda w: torch.einsum("ncr,ncr...->nc...", w, u)  # noqa: E731
    delta_s = summary(plan.end_dm) if plan.end_dm is not None else None
    last_u = u[:, -1, (plan.length - 1) % plan.size] if plan.end_dm is None else None
    return _states(plan, summary(plan.end_mix), delta_s, d0, s0, last_u)


def dense_all(plan: ChunkPlan, u, starts):
    """D_t for every token (N, L, *shape) from blocked updates and the chunk start states."""
    d_start, s_start = starts
    d = torch.einsum("nctr,ncr...->nct...", plan.mix, u) + bc(plan.pa, u) * d_start[:, :, None]
    if s_start is not None:
        d = d + bc(plan.fs, u) * s_start[:, :, None]
    return plan.unblocks(d)


def scan_recurrent(u, log_m, log_a, d0, s0):
    """Token-by-token reference: u (N, L, *shape) -> (D_t for every t (N, L, *shape), D_L, S_L)."""
    d, s, out = d0, s0, []
    for t in range(u.shape[1]):
        s = u[:, t] if log_m is None else bc(log_m[:, t].exp(), s) * s + u[:, t]
        d = bc(log_a[:, t].exp(), d) * d + s
        out.append(d)
    return torch.stack(out, 1), d, s
