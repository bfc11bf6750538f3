"""Across chunks: the start state of every chunk (and the end state) from the chunk summaries.

Chunk c maps its start state affinely, (D, S) -> (A_c D + F_c S + dD_c, M_c S + dS_c), with
scalars A_c, F_c, M_c per memory copy and the chunk's summaries dD_c, dS_c (see scan.py). With
the exclusive products E^x_cj = prod_{j<r<c} x_r (j < c) and e^x_c = prod_{r<c} x_r:

    S^c = sum_{j<c} E^m_cj dS_j + e^m_c S_0,
    D^c = sum_{j<c} E^a_cj dD_j + sum_{l<c} (E^a diag(F) E^m)_cl dS_l + (E^a (F e^m))_c S_0 + e^a_c D_0,

and c = n (one step past the last chunk) is the end state. So for up to :data:`GROUP` chunks
all start states are one batched product of a small (n K) x (n K) operator with the stacked
summaries (K = 2 with momentum: D and S; K = 1 without), built once per scan and shared by
every weight matrix (:func:`cross_operator`). Beyond, :func:`scan_maps` composes the maps in
groups of GROUP chunks, recursively (log_G n levels), so the cost stays linear in n.

Example:
    >>> la, f, lm = -torch.rand(2, 5), torch.rand(2, 5), -torch.rand(2, 5)
    >>> op = cross_operator(la, f, lm)
    >>> op.starts.shape, op.final.shape
    (torch.Size([2, 10, 10]), torch.Size([2, 2, 10]))
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

#: chunks whose start states come from one closed-form product (a language model's 256 tokens in
#: chunks of 64 is 4; 4K tokens 64). Beyond it the grouped recursion runs, which took ~1.6x the
#: closed form's time per token on an H100 (Titans memories, dim 512, 8 heads, bf16: 1.5 M against
#: 2.4 M tok/s at T = 4K with 16 and 64; the same at 1K and 16K whatever the value:
#: ``python -m benchmarks.layers.cross_group``).
GROUP = 64


_MASKS: dict = {}


def _constant(rows: int, cols: int, diagonal: int, fill: float, like: torch.Tensor) -> torch.Tensor:
    """(rows, cols): ``fill`` on and above ``diagonal`` (fill = -inf) or on and below it (fill = 1),
    0 elsewhere. Eager calls build each such constant once per shape, dtype and device (it is never
    written); a compiled graph, or a CUDA graph being captured, builds it."""

    def build():
        full = torch.full((rows, cols), fill, dtype=like.dtype, device=like.device)
        return full.triu(diagonal) if fill < 0 else full.tril(diagonal)

    if torch.compiler.is_compiling() or (like.is_cuda and torch.cuda.is_current_stream_capturing()):
        return build()
    key = (rows, cols, diagonal, fill, like.dtype, like.device)
    mask = _MASKS.get(key)
    if mask is None:
        with torch.inference_mode(False), torch.no_grad():  # a plain tensor, whatever mode the first call ran in
            mask = build()
        if len(_MASKS) >= 64:
            _MASKS.clear()
        _MASKS[key] = mask
    return mask


def _above(rows: int, cols: int, diagonal: int, like: torch.Tensor) -> torch.Tensor:
    """(rows, cols): -inf on and above ``diagonal``, 0 below: added before an exponential it masks
    exactly (exp(-inf) = 0, with a zero gradient) and costs no masked_fill (built once, :func:`_constant`)."""
    return _constant(rows, cols, diagonal, float("-inf"), like)


def decay_products(log_x: torch.Tensor):
    """D (..., L, L) with D_ts = prod_{s<r<=t} x_r (s <= t, else 0) and the log prefix (..., L), sum_{r<=t} log x_r.

    Masked entries become -inf before the exponential (:func:`_above`).
    """
    length = log_x.shape[-1]
    cum = log_x.cumsum(-1)
    return (cum[..., :, None] - cum[..., None, :] + _above(length, length, 1, log_x)).exp(), cum


def exclusive_products(log_x: torch.Tensor):
    """E (B, n + 1, n) with E_cj = prod_{j<r<c} x_r (j < c, else 0) and e (B, n + 1), e_c = prod_{r<c} x_r.

    Row n is one step past the last chunk (the end state).
    """
    n = log_x.shape[-1]
    padded = F.pad(log_x, (0, 1))
    cum = padded.cumsum(-1)
    prev = cum - padded  # sum_{r<c} log x_r
    return (prev[..., :, None] - cum[..., None, :n] + _above(n + 1, n, 0, log_x)).exp(), prev.exp()


class CrossOperator(NamedTuple):
    """Start and end states as products with the stacked summaries X (B, n K, P) (index c K + k).

    starts (B, n K, n K) and final (B, K, n K): the parts from the summaries. The initial state
    enters through ea (B, n + 1, n), pa, pm (B, n + 1) and f (B, n) (pm, f None without momentum):
    D_0 with pa, S_0 with ea (f pm) in D and pm in S (row n: the end state); computed only when a
    nonzero initial state is given (:meth:`initial`).
    """

    starts: torch.Tensor
    final: torch.Tensor
    ea: torch.Tensor
    pa: torch.Tensor
    pm: torch.Tensor | None
    f: torch.Tensor | None

    def initial(self, d0, s0):
        """The part of every state (B, n + 1, K, *shape) from the initial D_0 and S_0 (None: zero)."""
        col = lambda c, x: c.reshape(*c.shape, *([1] * (x.ndim - 1))) * x[:, None]  # noqa: E731  (B, n+1, *shape)
        in_d = None if d0 is None else col(self.pa, d0)
        if self.pm is None:  # K = 1: no momentum, S_0 does not enter D
            return in_d[:, :, None]
        if s0 is None:
            return torch.stack([in_d, torch.zeros_like(in_d)], 2)
        via_s = col((self.ea @ (self.f * self.pm[:, :-1])[..., None])[..., 0], s0)
        return torch.stack([via_s if in_d is None else in_d + via_s, col(self.pm, s0)], 2)


def cross_operator(end_la, end_f, end_lm) -> CrossOperator:
    """The operator of the chunk maps (log A, F, log M: (B, n); F, log M None without momentum)."""
    b, n = end_la.shape
    if end_f is None:
        ea, pa = exclusive_products(end_la)
        return CrossOperator(ea[:, :n], ea[:, n:], ea, pa, None, None)
    (ea, em), (pa, pm) = (t.unbind(0) for t in exclusive_products(torch.stack([end_la, end_lm])))
    via_s = ea @ (end_f[..., None] * em[:, :n])  # (E^a diag(F) E^m)
    blocks = torch.stack([ea, via_s, torch.zeros_like(ea), em], -1).reshape(b, n + 1, n, 2, 2)
    big = blocks.permute(0, 1, 3, 2, 4).reshape(b, (n + 1) * 2, n * 2)  # (B, (n+1) K, n K), index c K + k
    return CrossOperator(big[:, : n * 2], big[:, n * 2 :], ea, pa, pm, end_f)


def closed_states(op: CrossOperator, summaries: torch.Tensor, d0, s0):
    """Start states (B, n, K, *shape) and end states (B, K, *shape) from summaries (B, n, K, *shape).

    d0, s0: (B, *shape) initial offset and momentum, or None for zero (no work spent on them).
    """
    b, n, k = summaries.shape[:3]
    shape = summaries.shape[3:]
    flat = summaries.reshape(b, n * k, -1)
    starts = (op.starts @ flat).reshape(summaries.shape)
    final = (op.final @ flat).reshape(b, k, *shape)
    if d0 is not None or (s0 is not None and op.pm is not None):
        init = op.initial(d0, s0)
        starts, final = starts + init[:, :n], final + init[:, n]
    return starts, final


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


def scan_maps(la, f, lm, bd, bs, group: int | None = None):
    """Prefix compositions of the maps (D, S) -> (A D + F S + bd, M S + bs), A = exp(la), M = exp(lm).

    la, f, lm: (B, n) (f, lm, bs None without momentum); bd, bs: (B, n, P). Returns the prefix maps
    as (log A, F, log M, D, S) with D, S the states reached from zero: the state after map c from
    (D0, S0) is (A_c D0 + F_c S0 + D_c, M_c S0 + S_c). Closed form up to ``group`` maps; beyond,
    groups in closed form and the groups' maps by this function, then a fix-up.
    """
    group = GROUP if group is None else group
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


def grouped_states(end_la, end_f, end_lm, summaries: torch.Tensor, d0, s0):
    """:func:`closed_states` for many chunks, through :func:`scan_maps` (same inputs and outputs)."""
    b, n, k = summaries.shape[:3]
    shape = summaries.shape[3:]
    bc = lambda c, like: c.reshape(c.shape + (1,) * (like.ndim - c.ndim))  # noqa: E731
    delta_d = summaries[:, :, 0]
    delta_s = summaries[:, :, 1] if k == 2 else None
    d0 = torch.zeros_like(delta_d[:, 0]) if d0 is None else d0
    # Fold the initial state into chunk 0's summary, so the scan from zero gives the states themselves.
    first_d = bc(end_la[:, 0].exp(), d0) * d0
    if delta_s is not None:
        s0 = torch.zeros_like(delta_s[:, 0]) if s0 is None else s0
        first_d = first_d + bc(end_f[:, 0], s0) * s0
        delta_s = torch.cat([delta_s[:, :1] + (bc(end_lm[:, 0].exp(), s0) * s0)[:, None], delta_s[:, 1:]], 1)
    delta_d = torch.cat([delta_d[:, :1] + first_d[:, None], delta_d[:, 1:]], 1)
    flat = lambda t: None if t is None else t.reshape(b, n, -1)  # noqa: E731
    _, _, _, d_end, s_end = scan_maps(end_la, end_f, end_lm, flat(delta_d), flat(delta_s))
    states = [torch.cat([d0[:, None], d_end.reshape(b, n, *shape)[:, :-1]], 1)]
    ends = [d_end[:, -1].reshape(b, *shape)]
    if s_end is not None:
        states.append(torch.cat([s0[:, None], s_end.reshape(b, n, *shape)[:, :-1]], 1))
        ends.append(s_end[:, -1].reshape(b, *shape))
    return torch.stack(states, 2), torch.stack(ends, 1)
