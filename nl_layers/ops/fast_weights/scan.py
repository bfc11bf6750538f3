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
A, F, M, so the same closed form one level up gives the start states of all chunks (cross.py:
one small operator times the stacked summaries for up to 16 chunks, a grouped log-depth scan
beyond). No loop over chunks; everything else is batched over all chunks at once. The last chunk is zero-padded and its end
state read at the last real token (padding with a = m = 1, u = 0 would not be inert for D,
since D_t = D_{t-1} + S_t).

:class:`ChunkPlan` holds the coefficients (shared by every weight matrix of a memory);
:func:`rank1_states` / :func:`rank1_read` work on updates given as rank-1 factors
u_t = left_t right_t^T and never form a per-token matrix (the dual form); :func:`dense_states` /
:func:`dense_all` on materialised updates of any shape.

For a short segment the whole scan is one closed form instead (:class:`TokenPlan`: the same
formulas with a single chunk of L tokens, mix = D^a D^m an L x L matrix per copy): the read-out
is then one masked product per weight matrix (:func:`rank1_read_tokens`, the step sizes folded
into the columns of mix) and the end state one weighted product (:func:`rank1_ends`), with no
chunk start states at all. It moves fewer bytes when L^2 is below the chunk states' size, n K x
the weight matrix (a language model's 256 tokens against 96 x 192 matrices in chunks of 64).

Example:
    >>> n, length = 3, 10
    >>> u = torch.randn(n, length, 4, 5)
    >>> log_m, log_a = -torch.rand(n, length), -0.1 * torch.rand(n, length)
    >>> d0, s0 = torch.randn(n, 4, 5), torch.randn(n, 4, 5)
    >>> ref, _, _ = scan_recurrent(u, log_m, log_a, d0, s0)
    >>> plan = ChunkPlan.build(log_m, log_a, chunk_size=4)
    >>> starts, (d_last, s_last) = dense_states(plan, plan.blocks(u), d0, s0)
    >>> starts.shape  # (copies, chunks, K = 2: offset D and momentum S at each chunk's start, *shape)
    torch.Size([3, 3, 2, 4, 5])
    >>> bool(torch.allclose(dense_all(plan, plan.blocks(u), starts), ref, atol=1e-5))
    True
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..._function import Function

from . import cross
from .cross import CrossOperator, closed_states, cross_operator, decay_products, grouped_states
from . import decay_kernels
from .grouped_linear import apply_weight
from .decay_kernels import decay_rowcol, decay_tiles
from . import read_kernels
from .read_kernels import read_grads


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """``torch.promote_types(t.dtype, torch.float32)`` for floating t, decided in Python (no operator call)."""
    return t.dtype if t.dtype in (torch.float64, torch.float32) else torch.float32


def bc(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a coefficient against a tensor with extra trailing (parameter) dims."""
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


class ChunkPlan(NamedTuple):
    """Chunk coefficients of one scan; tensors are (N, n, C[, C]) unless noted.

    pa, mix: D_t = pa_t D^c + fs_t S^c + sum_r mix_tr u_r within a chunk; fs (None without momentum).
    dm: S_t = pm_t S^c + sum_r dm_tr u_r (None without momentum).
    end_*: the same at each chunk's last real token, (N, n) or (N, n, C): the chunk-to-chunk maps
    (end_la, end_lm: log A, log M; end_f: F).
    weights (N, n, C, K): the summary weights, end_mix (and end_dm); reads (N, n, C, K): pa (and fs).
    cross: the operator giving every start state at once (up to cross.GROUP chunks), else None.
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
    weights: torch.Tensor
    reads: torch.Tensor
    cross: CrossOperator | None

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
        work = _work_dtype(log_a)  # decay products in at least float32

        def blocks(t):
            return F.pad(t.to(work), (0, n * size - length)).reshape(t.shape[0], n, size)

        def end(t):  # row of each chunk's last real token
            if t is None:
                return None
            return t[:, :, rem - 1] if rem == size else torch.cat([t[:, :-1, size - 1], t[:, -1:, rem - 1]], 1)

        cast = lambda t: None if t is None else t.to(log_a.dtype)  # noqa: E731
        if log_m is None:
            da, la = decay_products(blocks(log_a))
            mix, fs, dm, lm = da, None, None, None
        else:  # both decays in one pass (half the launches, forward and backward)
            (da, dm), (la, lm) = (t.unbind(0) for t in decay_products(torch.stack([blocks(log_a), blocks(log_m)])))
            mix, fs = da @ dm, (da @ lm.exp()[..., None])[..., 0]
        pa, end_la, end_f, end_lm, end_mix, end_dm = la.exp(), end(la), end(fs), end(lm), end(mix), end(dm)
        weights = end_mix[..., None] if end_dm is None else torch.stack([end_mix, end_dm], -1)
        reads = pa[..., None] if fs is None else torch.stack([pa, fs], -1)
        op = cross_operator(end_la, end_f, end_lm) if n <= cross.GROUP else None
        if op is not None:
            op = CrossOperator(*(cast(t) for t in op))
        return ChunkPlan(
            length, size, cast(pa), cast(mix), cast(fs), cast(dm), cast(end_la), cast(end_f), cast(end_lm),
            cast(end_mix), cast(end_dm), cast(weights), cast(reads), op,
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


def _states(plan: ChunkPlan, summaries: torch.Tensor, d0, s0, last_u):
    """Start states (N, n, K, *shape) and (D_L, S_L) from the summaries (N, n, K, *shape).

    d0, s0 None: a zero initial state. Without momentum S_L is the last update ``last_u``.
    """
    if plan.cross is not None:
        starts, final = closed_states(plan.cross, summaries, d0, s0)
    else:
        starts, final = grouped_states(plan.end_la, plan.end_f, plan.end_lm, summaries, d0, s0)
    return starts, (final[:, 0], final[:, 1] if final.shape[1] == 2 else last_u)


def rank1_states(plan: ChunkPlan, left, right, d0, s0):
    """Updates u_t = left_t right_t^T given blocked, left (N, n, C, o), right (N, n, C, i); d0, s0 (N, o, i) or None.

    Returns (start states (N, n, K, o, i): D^c and, with momentum, S^c; (D_L, S_L)).
    """
    b, n, c, o = left.shape
    k = plan.weights.shape[-1]
    weighted = (plan.weights[..., None] * left[..., None, :]).reshape(b, n, c, k * o)  # sum_r w_r u_r per chunk
    summaries = (weighted.transpose(-1, -2) @ right).reshape(b, n, k, o, right.shape[-1])
    last_u = None
    if k == 1:
        i = (plan.length - 1) % plan.size
        last_u = left[:, -1, i, :, None] * right[:, -1, i, None, :]
    return _states(plan, summaries, d0, s0, last_u)


def read_starts(plan: ChunkPlan, starts, x):
    """The part of D_t x_t from the chunk start states (N, n, K, o, i), for blocked x (N, n, C, i): (N, n, C, o)."""
    b, n, k, o, i = starts.shape
    from_starts = x @ starts.reshape(b, n, k * o, i).transpose(-1, -2)  # (N, n, C, K o)
    if k == 1:
        return plan.pa[..., None] * from_starts
    return (plan.reads[..., None] * from_starts.reshape(b, n, -1, k, o)).sum(-2)


def rank1_read(plan: ChunkPlan, left, right, starts, x):
    """D_t x_t for every token of blocked x (N, n, C, i), without forming D_t: (N, n, C, o)."""
    return (plan.mix * (x @ right.transpose(-1, -2))) @ left + read_starts(plan, starts, x)


class _PrefixSum(Function):
    """cumsum along the last dimension, whose backward (the reverse cumulative sum) is one product
    with the lower-triangular ones (L, L) instead of flip, cumsum, flip."""

    @staticmethod
    def forward(x):
        return x.cumsum(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        length = g.shape[-1]
        return g @ cross._constant(length, length, 0, 1.0, g)  # dx_s = sum_{t >= s} g_t


def prefix_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.cumsum(-1)`` with a one-operator backward (for the short segments of :class:`TokenPlan`).

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
        >>> prefix_sum(x).backward(torch.tensor([[1.0, 10.0, 100.0]])); x.grad
        tensor([[111., 110., 100.]])
    """
    return _PrefixSum.apply(x)


class _DecayMix(Function):
    """mix = D^a (D^m diag(w)) (N, L, L) from the stacked log prefixes c = (ca, cm) (2, N, L) and the
    column weights w (N, L), D^x_ts = exp(cx_t - cx_s) for s <= t (else 0).

    Both factors come from one pass (:func:`~.decay_kernels.decay_tiles`, the weights folded into
    the second's columns); the backward takes X^a = g (D^m diag(w))^T and X^m = D^a^T g from two
    products and the gradients from one more pass over them (:func:`~.decay_kernels.decay_rowcol`,
    which recomputes the exponentials from c): dca = rows(X^a E^a) - cols(X^a E^a),
    dcm = rows(X^m E^m w) - w cols(X^m E^m), dw = cols(X^m E^m).
    """

    @staticmethod
    def forward(c, w):
        ww = F.pad(w.to(c.dtype)[None], (0, 0, 0, 0, 1, 0), value=1.0)  # (ones, w) in one operator
        d = decay_tiles(c, ww)  # D^a, D^m diag(w) at once
        return d[0] @ d[1], d, ww

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)  # no zero gradient for the factors, which are not differentiable
        ctx.save_for_backward(inputs[0], output[1], output[2])

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _, __):
        if g is None:
            return None, None
        c, d, ww = ctx.saved_tensors
        g = g.to(d.dtype)  # the product may have run at a lower precision (autocast)
        if not torch.compiler.is_compiling():  # both products straight into one buffer (no stack)
            x = torch.empty_like(d)
            torch.bmm(g, d[1].transpose(-1, -2), out=x[0])
            torch.bmm(d[0].transpose(-1, -2), g, out=x[1])
        else:  # no out= (torch.compile traces this path)
            x = torch.stack([g @ d[1].transpose(-1, -2), d[0].transpose(-1, -2) @ g])
        row, col = decay_rowcol(x, c, ww)
        return row - ww * col, col[1] if ctx.needs_input_grad[1] else None


def decay_mix(c: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """D^a D^m diag(w) (N, L, L) from the stacked log prefixes c = (cumsum(log a), cumsum(log m)) (2, N, L)
    and column weights w (N, L) (None: ones): mix_tr = w_r sum_{r <= j <= t} prod_{j < i <= t} a_i
    prod_{r < i <= j} m_i (see :class:`TokenPlan`).

    Example:
        >>> la, lm = -torch.rand(2, 6, dtype=torch.float64), -torch.rand(2, 6, dtype=torch.float64)
        >>> w = torch.rand(2, 6, dtype=torch.float64)
        >>> ref = decay_products(la)[0] @ decay_products(lm)[0] * w[:, None, :]
        >>> bool(torch.allclose(decay_mix(torch.stack([la, lm]).cumsum(-1), w), ref))
        True
    """
    return _DecayMix.apply(c, torch.ones_like(c[0]) if w is None else w)[0]


class TokenPlan(NamedTuple):
    """The scan of L tokens in one closed form (short segments), tensors (N, L[, L]):

        D_t = pa_t D_0 + fs_t S_0 + sum_{r <= t} mix_tr u_r,    S_t = pm_t S_0 + sum_{r <= t} dm_tr u_r,

    mix = D^a D^m (D^a alone without momentum) over all L tokens, with the notation of the module
    docstring. Fewer, larger operations than :class:`ChunkPlan` (no chunk maps): for a segment
    short enough that an L x L matrix per copy is smaller than the chunk start states.
    dm_last: row L - 1 of D^m (S_L's weights; None without momentum or when built without ``ends``);
    pa: None when built without ``ends`` nor ``d0`` (only D_L and a given D_0 take it); fs, pm: None
    without momentum or when built without ``initial``.

    Example:
        >>> log_m, log_a = -torch.rand(2, 10), -torch.rand(2, 10)
        >>> u, d0, s0 = torch.randn(2, 10, 3), torch.randn(2, 3), torch.randn(2, 3)
        >>> p = TokenPlan.build(log_m, log_a, initial=True)
        >>> d = p.mix @ u + p.pa[..., None] * d0[:, None] + p.fs[..., None] * s0[:, None]
        >>> bool(torch.allclose(d, scan_recurrent(u, log_m, log_a, d0, s0)[0], atol=1e-5))
        True
    """

    mix: torch.Tensor
    pa: torch.Tensor | None
    fs: torch.Tensor | None
    pm: torch.Tensor | None
    dm_last: torch.Tensor | None

    @staticmethod
    def build(
        log_m: torch.Tensor | None, log_a: torch.Tensor, initial: bool = False, ends: bool = True, d0: bool = True,
        scale: torch.Tensor | None = None,
    ) -> "TokenPlan":
        """Plan for log-momentum (N, L) (None: no momentum) and log-decay (N, L); ``initial``: also fs, pm.

        ``ends`` False: the caller wants no end states (D_L, S_L), so no dm_last (exp(cm_L - cm_r));
        with ``d0`` False too (no initial D_0) no pa = exp(ca_t) either. ``initial`` implies both.
        ``scale`` (N, L): the updates' scalar factors, folded into the columns of mix (mix_tr scale_r;
        dm_last stays unscaled); in the common case (momentum, no initial state) in the same pass
        that forms the decay products.
        """
        work = _work_dtype(log_a)  # decay products in at least float32
        cast = lambda t: None if t is None else t.to(log_a.dtype)  # noqa: E731
        scaled = (lambda m: m) if scale is None else (lambda m: m * scale[:, None, :])  # noqa: E731
        need_pa = ends or d0 or initial
        if log_m is None:
            da, la = decay_products(log_a.to(work))
            return TokenPlan(cast(scaled(da)), cast(la.exp()) if need_pa else None, None, None, None)
        if not initial:  # the common case (a fresh sequence): mix by hand, its backward too
            c = prefix_sum(torch.stack([log_a, log_m]).to(work))
            pa = cast(c[0].exp()) if need_pa else None
            mix = decay_mix(c, None if scale is None else scale.to(work))
            return TokenPlan(cast(mix), pa, None, None, cast((c[1, :, -1:] - c[1]).exp()) if ends else None)
        (da, dm), (la, lm) = (t.unbind(0) for t in decay_products(torch.stack([log_a.to(work), log_m.to(work)])))
        pm = lm.exp()
        return TokenPlan(cast(scaled(da @ dm)), cast(la.exp()), cast((da @ pm[..., None])[..., 0]), cast(pm), cast(dm[:, -1]))


class _Rank1Read(Function):
    """:func:`rank1_read_tokens` with a hand-written backward whose two L x L products, G * M and
    G * S for G = dy left^T, come from one pass over the causal part (:func:`~.read_kernels.read_grads`).
    With a weight W (the base of the read), out + x W^T joins the read and dx = dy W + dS right comes
    from one product added to another (no separate accumulation of x's two gradients)."""

    @staticmethod
    def forward(mixing, left, right, x, out, weight):
        if weight is not None:
            out = apply_weight(weight, x, out)
        scores = x @ right.transpose(-1, -2)
        weighted = mixing * scores
        return (weighted @ left if out is None else torch.baddbmm(out, weighted, left)), scores, weighted

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)
        ctx.has_out = inputs[4] is not None
        ctx.save_for_backward(*inputs[:4], inputs[5], output[1], output[2])

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _, __):
        if g is None:
            return None, None, None, None, None, None
        mixing, left, right, x, weight, scores, weighted = ctx.saved_tensors
        d_scores, d_mixing = read_grads(g @ left.transpose(-1, -2), mixing, scores)
        if weight is None:
            dx, dw = d_scores @ right, None
        else:
            if weight.ndim == 2:  # one weight for all copies
                dx = (g.reshape(-1, g.shape[-1]) @ weight).view(x.shape)
                dw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[5] else None
            else:
                dx = g @ weight
                dw = g.transpose(-1, -2) @ x if ctx.needs_input_grad[5] else None
            dx = dx.baddbmm_(d_scores, right)
        return (d_mixing, weighted.transpose(-1, -2) @ g, d_scores.transpose(-1, -2) @ x, dx,
                g if ctx.has_out else None, dw)


def rank1_read_tokens(mixing: torch.Tensor, left, right, x, out=None, weight=None) -> torch.Tensor:
    """sum_{r <= t} mixing_tr (right_r . x_t) left_r for every token (plus ``out``, if given, and
    x W^T for a ``weight`` W, one for all copies (o, i) or one per copy (N, o, i)): the read
    of a zero-start scan of u_r = left_r right_r^T through a causal (N, L, L) matrix such as
    :attr:`TokenPlan.mix` (with the updates' scalar factors folded into its columns) from the base W;
    left (N, L, o), right, x (N, L, i). On CUDA (one dtype, no autocast, not compiling) the backward
    is :class:`_Rank1Read`'s, which takes mixing as zero above the diagonal (no gradient there)."""
    ts = (mixing, left, right, x) + (() if out is None else (out,)) + (() if weight is None else (weight,))
    if read_kernels.kernel_ok(*ts) and not torch.is_autocast_enabled(x.device.type):
        return _Rank1Read.apply(mixing, left, right, x, out, weight)[0]
    if weight is not None:
        out = apply_weight(weight, x, out)
    weighted = mixing * (x @ right.transpose(-1, -2))
    return weighted @ left if out is None else torch.baddbmm(out, weighted, left)


def rank1_ends(left, right, weights) -> torch.Tensor:
    """sum_r weights_rk left_r right_r^T for each k: (N, K, o, i), for left (N, L, o), right (N, L, i), weights (N, L, K)."""
    b, length, k = weights.shape
    o, i = left.shape[-1], right.shape[-1]
    if i <= o:  # weight the narrower factor
        ends = left.transpose(-1, -2) @ (weights[..., None] * right[:, :, None, :]).reshape(b, length, k * i)
        return ends.reshape(b, o, k, i).transpose(1, 2)
    return ((weights[..., None] * left[:, :, None, :]).reshape(b, length, k * o).transpose(-1, -2) @ right).reshape(b, k, o, i)


def dense_states(plan: ChunkPlan, u, d0, s0):
    """As :func:`rank1_states` for materialised blocked updates u (N, n, C, *shape)."""
    b, n, c = u.shape[:3]
    summaries = (plan.weights.transpose(-1, -2) @ u.reshape(b, n, c, -1)).reshape(b, n, -1, *u.shape[3:])
    last_u = u[:, -1, (plan.length - 1) % plan.size] if plan.end_dm is None else None
    return _states(plan, summaries, d0, s0, last_u)


def dense_all(plan: ChunkPlan, u, starts):
    """D_t for every token (N, L, *shape) from blocked updates and the chunk start states."""
    b, n, c = u.shape[:3]
    d = plan.mix @ u.reshape(b, n, c, -1) + plan.reads @ starts.reshape(b, n, starts.shape[2], -1)
    return plan.unblocks(d.reshape(u.shape))


def scan_recurrent(u, log_m, log_a, d0, s0):
    """Token-by-token reference: u (N, L, *shape) -> (D_t for every t (N, L, *shape), D_L, S_L)."""
    d, s, out = d0, s0, []
    for t in range(u.shape[1]):
        s = u[:, t] if log_m is None else bc(log_m[:, t].exp(), s) * s + u[:, t]
        d = bc(log_a[:, t].exp(), d) * d + s
        out.append(d)
    return torch.stack(out, 1), d, s
