"""Across chunks: the start state of every chunk (and the end state) from the chunk summaries.

Chunk c maps its start state affinely, (D, S) -> (A_c D + F_c S + dD_c, M_c S + dS_c), with
scalars A_c, F_c, M_c per memory copy and the chunk's summaries dD_c, dS_c (see scan.py). With
the exclusive products E^x_cj = prod_{j<r<c} x_r (j < c) and e^x_c = prod_{r<c} x_r:

    S^c = sum_{j<c} E^m_cj dS_j + e^m_c S_0,
    D^c = sum_{j<c} E^a_cj dD_j + sum_{l<c} (E^a diag(F) E^m)_cl dS_l + (E^a (F e^m))_c S_0 + e^a_c D_0,

and c = n (one step past the last chunk) is the end state. So for up to :data:`GROUP` chunks
all start states are one batched product of a small (n K) x (n K) operator with the stacked
summaries (K = 2 with momentum: D and S; K = 1 without), built once per scan and shared by
every weight matrix (:func:`cross_operator`). Beyond, :func:`grouped_states` takes groups of
GROUP chunks each in closed form from a zero start, the groups' own start states by the same
function over the groups' maps (recursively: log_G n levels), and adds each group start's part to
its chunks in one product, so the cost stays linear in n. (:func:`scan_maps`, the prefix maps
themselves, composes them in groups the same way.)

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
#: chunks of 64 is 4; 16K tokens 256). Beyond it the two-level grouped form runs. On an H100 (Titans
#: memories, dim 512, 8 heads, bf16, 64K tokens per call, ``python -m benchmarks.layers.cross_group``)
#: 256 was the fastest or level with 16 and 64 at every length from 1K to 64K: at 16K the closed
#: form (2.44 M tok/s, NeuralMemory) beat the grouped one (2.24 M with 16 or 64), at 64K all three
#: were within 3%; the operator is (2n)^2 per memory copy, 1 MiB in fp32 at n = 256.
GROUP = 256


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


def grouped_states(end_la, end_f, end_lm, summaries: torch.Tensor, d0, s0, group: int | None = None):
    """:func:`closed_states` for many chunks (same inputs and outputs), in groups of ``group`` (default
    :data:`GROUP`) chunks: each group's start states from zero and its end state by its own closed
    form (two products), the groups' start states by this function over the groups' maps (their
    end states as summaries, the initial state there), then every chunk's start state gets its group
    start's part through the group operator's coefficients (one product added in place):

        X_c = X^loc_c + C_c X_g,   C_c = [[e^a_c, (E^a (F e^m))_c], [0, e^m_c]]   (K = 2; K = 1: e^a_c)

    for chunk c of group g with start state X_g = (D, S)."""
    group = GROUP if group is None else group
    b, n, k = summaries.shape[:3]
    shape = summaries.shape[3:]
    if n <= group:
        op = cross_operator(end_la, end_f, end_lm)
        return closed_states(CrossOperator(*(None if t is None else t.to(summaries.dtype) for t in op)), summaries, d0, s0)
    ng = -(-n // group)
    pad = ng * group - n  # identity maps (log A = log M = 0, F = 0) with zero summaries

    def grouped(t):
        if t is None:
            return None
        if pad:
            t = F.pad(t, (0, pad)) if t.ndim == 2 else torch.cat([t, t.new_zeros(b, pad, *t.shape[2:])], 1)
        return t.reshape(b * ng, group, *t.shape[2:])

    la, f, lm = grouped(end_la), grouped(end_f), grouped(end_lm)
    op = cross_operator(la, f, lm)
    flat = grouped(summaries).reshape(b * ng, group * k, -1)
    cast = lambda t: t.to(flat.dtype)  # noqa: E731
    local = cast(op.starts) @ flat  # every chunk's start state from a zero group start
    ends = (cast(op.final) @ flat).reshape(b, ng, k, *shape)
    # the groups' maps: A = e^a, M = e^m at one past the group's last chunk; F: S_0's coefficient in D there
    g_la, g_lm = la.sum(-1).reshape(b, ng), None if lm is None else lm.sum(-1).reshape(b, ng)
    g_f = None if f is None else (op.ea[:, group] * (f * op.pm[:, :group])).sum(-1).reshape(b, ng)
    starts_g, final = grouped_states(g_la, g_f, g_lm, ends, d0, s0, group)
    if k == 1:
        coeff = op.pa[:, :group, None]  # (B ng, group, 1)
    else:
        via_s = op.ea[:, :group] @ (f * op.pm[:, :group])[..., None]  # (B ng, group, 1)
        coeff = torch.cat([op.pa[:, :group, None], via_s, torch.zeros_like(via_s), op.pm[:, :group, None]], -1)
        coeff = coeff.reshape(b * ng, group * 2, 2)  # rows c K + k', columns D_g, S_g
    local = local.baddbmm_(cast(coeff), starts_g.reshape(b * ng, k, -1))
    return local.reshape(b, ng * group, k, *shape)[:, :n], final
