"""In-context learning for the CMS: every level takes a gradient step every C_l tokens of a sequence.

Each level l holds fast weights theta_l per sequence (batch row), starting from the block's
parameters. Its objective, over the stream u of its inputs (x for level 1 and for the independent
and nested variants, h_{l-1} for sequential levels), is next-input prediction through the block
read as a residual map:

    l_t(theta) = 1/2 || u_{t-1} + f(u_{t-1}; theta) - u_t ||^2        (t >= 1)

Outputs at tokens of a chunk use the weights from the chunk start; at every C_l-th token the level
steps on the n pairs accumulated since its last step, with g = sum_t grad l_t (paper Eq. 71):

    theta_l <- theta_l - s g,        s = min(lr_l / n, s*),    s* = ||g||^2 / ||J g||^2,

per sequence, where J stacks the Jacobians of the pairs' residuals (so ||J g||^2 is one
forward-mode product). lr_l / n is the plain step on the mean loss (lr does not scale with C_l).
Stability: along g the Gauss-Newton model of the pairs' loss is S - s ||g||^2 + s^2 ||J g||^2 / 2,
which decreases on [0, s*] and has its minimum at s*; the plain step overshoots once
lr_l / n > 2 s*, and then every step multiplies the error, as it did at width 384 with lr 1e-2
(the curvature grows with the width: ||u||^2 ~ dim for normalised inputs, ||act(W_1 u)||^2 ~ hidden).
The cap never lets a step go past the model's minimum, at any width or input scale, and leaves the
plain step unchanged where it is small enough. s is a step size: it is not differentiated through.

Because the weights are constant inside a chunk, the chunk's outputs and its loss are one batched
``functional_call`` (vmapped over the sequences' weights) and its gradient one ``torch.func.grad``:
no Python loop per token (except C_l = 1). For the CMS's own MLP blocks (``nn.Linear`` layers, a
known activation) the same gradient and ``J g`` come in closed form, a few batched matrix products
per chunk (:mod:`nl_layers.cms_in_context_mlp`); other blocks take the transforms.

Nested variant: the levels are deltas, f(x; theta_1 + ... + theta_k); the chunk sizes must not
increase along the levels (level 1 slowest). When level l steps, every faster level m > l is
re-initialised to its learnable initial delta, i.e. it restarts from level l's new state: the
initial state of a fast level is what the slower level has learned (paper section 7.1).

``mode="recurrent"`` is the token-by-token reference, with gradients from plain autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.func import functional_call, grad, jvp, vmap

from . import cms_in_context_mlp as mlp
from ._checks import check_choice, check_finite, check_state_batch
from .memory.fast_weights import pieces, reference_grads


class LevelState(NamedTuple):
    """One level's in-context state: fast weights (B, ...), and, since its last step, the gradient sum,
    the pair count and the pairs' inputs u_{t-1} (B, count, d) (None when count is 0)."""

    weights: dict
    grad_sum: dict
    count: int
    keys: torch.Tensor | None = None


class CMSState(NamedTuple):
    """In-context CMS state: one LevelState per level, each level's last input (B, dim), tokens seen."""

    levels: tuple
    prev: tuple
    position: int

    def detach(self) -> "CMSState":
        """A copy cut from the autograd graph (truncated backpropagation through time)."""
        cut = lambda d: {n: t.detach() for n, t in d.items()}  # noqa: E731
        levels = tuple(
            LevelState(cut(s.weights), cut(s.grad_sum), s.count, None if s.keys is None else s.keys.detach()) for s in self.levels
        )
        prev = tuple(None if p is None else p.detach() for p in self.prev)
        return CMSState(levels, prev, self.position)


def _read(block, params, x):
    """Per-row weights (B, ...) applied to x (B, L, d)."""
    return vmap(lambda p, xi: functional_call(block, p, (xi,)), randomness="different")(params, x)


def _chunk_step(block, w: dict, prev, seg: torch.Tensor):
    """Outputs of a chunk at fixed weights, and the gradient of its summed pair losses.

    One batched forward over [u_{start-1}, u_start, ..., u_end-1] gives both the chunk's outputs
    f(u_t) and the predictions u_{t-1} + f(u_{t-1}); the gradient w.r.t. the per-row weights is
    ``torch.func.grad`` of that forward (it traces under ``torch.compile`` and stays differentiable
    w.r.t. the block's parameters and the inputs). Returns (outputs, grads, the pairs' inputs
    u_{t-1} (B, pairs, d)). A plain MLP block takes the closed form of :mod:`nl_layers.cms_in_context_mlp`.
    """
    act_grad = mlp.derivative(block)
    if act_grad is not None:
        return mlp.chunk_step(block, act_grad, w, prev, seg)
    first = prev if prev is not None else seg[:, 0]
    seq = torch.cat([first[:, None], seg], dim=1)
    skip = 1 if prev is None else 0  # the first token of a sequence has no predecessor

    def pair_loss(params):
        out = _read(block, params, seq)
        err = (seq[:, :-1] + out[:, :-1] - seg).pow(2).sum(-1)[:, skip:]  # (B, pairs)
        return 0.5 * err.sum(), out

    grads, out = grad(pair_loss, has_aux=True)(w)
    return out[:, 1:], grads, seq[:, skip:-1]


class InContextEngine:
    """Runs a CMS in in-context mode (chunked or token-by-token reference)."""

    def __init__(self, cms, chunks: list, lrs: list):
        if cms.variant == "nested":
            order = [float("inf") if c is None else c for c in chunks]
            if any(b > a for a, b in zip(order, order[1:])):
                raise ValueError(f"nested in-context chunk sizes must not increase along the levels (slowest first), got {chunks}")
        self.chunks, self.lrs = list(chunks), list(lrs)

    def initial_state(self, cms, batch: int) -> CMSState:
        levels = []
        for blk in cms.blocks:
            w = {n: p.expand(batch, *p.shape) for n, p in blk.named_parameters()}
            levels.append(LevelState(w, _zeros_like(w), 0))
        return CMSState(tuple(levels), (None,) * len(levels), 0)

    def run(self, cms, x: torch.Tensor, state: CMSState | None, mode: str):
        check_choice(mode, "mode", ("chunked", "recurrent"))
        if x.ndim != 3 or x.shape[1] == 0:
            raise ValueError(f"in-context mode needs x of shape (batch, time, dim) with time >= 1, got {tuple(x.shape)}")
        check_finite(x, "x")
        state = self.initial_state(cms, x.shape[0]) if state is None else state
        if len(state.levels) != len(cms.blocks):
            raise ValueError(f"state has {len(state.levels)} levels but the CMS has {len(cms.blocks)}")
        check_state_batch(next(iter(state.levels[0].weights.values())).shape[0], x.shape[0])
        if cms.variant == "nested":
            return self._nested(cms, x, state, mode == "recurrent")
        levels, prev = list(state.levels), list(state.prev)
        if mode == "recurrent":
            outs = []
            for i in range(x.shape[1]):
                y, levels, prev = self._token(cms, x[:, i], levels, prev, state.position + i)
                outs.append(y)
            y = torch.stack(outs, dim=1)
        elif cms.variant == "sequential":
            h, levels[0], prev[0] = self._level(cms, 0, x, levels[0], prev[0], state.position)
            for i in range(1, len(levels)):
                out, levels[i], prev[i] = self._level(cms, i, h, levels[i], prev[i], state.position)
                h = h + out
            y = h
        else:
            y = 0
            for i in range(len(levels)):
                out, levels[i], prev[i] = self._level(cms, i, x, levels[i], prev[i], state.position)
                y = y + cms.mix[i] * out
        return y, CMSState(tuple(levels), tuple(prev), state.position + x.shape[1])

    # -- sequential / independent ---------------------------------------------------------------
    def _level(self, cms, i, u, st: LevelState, prev, position):
        """Chunked run of level i over the stream u (B, T, d)."""
        block, chunk, lr = cms.blocks[i], self.chunks[i], self.lrs[i]
        if chunk is None:
            return block(u), st, u[:, -1]
        outs = []
        for s, e, completes in pieces(u.shape[1], chunk, position % chunk):
            seg = u[:, s:e]
            out, g, keys = _chunk_step(block, st.weights, prev, seg)
            outs.append(out)
            st = _accumulate(st, g, keys)
            prev = seg[:, -1]
            if completes:
                st = _step(block, st, lr)
        return torch.cat(outs, dim=1), st, prev

    def _token(self, cms, xt, levels, prev, pos):
        """One token through every level (reference): read, accumulate, step at boundaries."""
        def one(i, u):
            block, chunk = cms.blocks[i], self.chunks[i]
            if chunk is None:
                out = block(u)
            else:
                st = levels[i]
                out = vmap(lambda p, xi: functional_call(block, p, (xi,)))(st.weights, u)
                if prev[i] is not None:
                    loss = lambda p, k, v: _batch_pair_loss(block, p, k, v)  # noqa: E731
                    st = _accumulate(st, reference_grads(st.weights, prev[i], u, loss), prev[i][:, None])
                if (pos + 1) % chunk == 0:
                    st = _step(block, st, self.lrs[i])
                levels[i] = st
            prev[i] = u
            return out

        if cms.variant == "sequential":
            h = one(0, xt)
            for i in range(1, len(levels)):
                h = h + one(i, h)
            return h, levels, prev
        return sum(cms.mix[i] * one(i, xt) for i in range(len(levels))), levels, prev

    # -- nested --------------------------------------------------------------------------------
    def _nested(self, cms, x, state: CMSState, reference: bool):
        block = cms.blocks[0]
        levels, prev, pos = list(state.levels), state.prev[0], state.position
        inits = [dict(blk.named_parameters()) for blk in cms.blocks]
        t = x.shape[1]
        if reference:
            ends = list(range(1, t + 1))
        else:
            ends = sorted({e for e in range(1, t + 1) for c in self.chunks if c is not None and (pos + e) % c == 0} | {t})
        outs, start = [], 0
        for end in ends:
            seg = x[:, start:end]
            w = {n: sum(lv.weights[n] for lv in levels) for n in levels[0].weights}
            if reference:
                outs.append(vmap(lambda p, xi: functional_call(block, p, (xi,)))(w, seg[:, 0])[:, None])
                g, keys = None, None
                if prev is not None:
                    loss = lambda p, k, v: _batch_pair_loss(block, p, k, v)  # noqa: E731
                    g, keys = reference_grads(w, prev, seg[:, 0], loss), prev[:, None]
            else:
                out, g, keys = _chunk_step(block, w, prev, seg)
                outs.append(out)
            for i, c in enumerate(self.chunks):
                if c is not None and g is not None and keys.shape[1]:
                    levels[i] = _accumulate(levels[i], g, keys)
            prev = seg[:, -1]
            for i, c in enumerate(self.chunks):
                if c is not None and (pos + end) % c == 0:
                    levels[i] = _step(block, levels[i], self.lrs[i], at=w)  # J g at the summed weights
                    for m in range(i + 1, len(levels)):  # faster levels restart from level i's state
                        wm = {n: p.expand_as(levels[m].weights[n]) for n, p in inits[m].items()}
                        levels[m] = LevelState(wm, _zeros_like(wm), 0)
            start = end
        y = torch.cat(outs, dim=1)
        return y, CMSState(tuple(levels), (prev,) * len(levels), pos + t)


def _batch_pair_loss(block, params, keys, values):
    """Sum over batch rows of the pair loss, for the autograd reference."""
    pred = keys + vmap(lambda p, k: functional_call(block, p, (k,)))(params, keys)
    return 0.5 * (pred - values).pow(2).sum()


def _accumulate(st: LevelState, g: dict, keys: torch.Tensor) -> LevelState:
    """Add a piece's gradient sum and its pairs' inputs (B, n, d) to a level's accumulators."""
    if st.count == 0:  # the sum restarts (autograd returns weight gradients transposed: one dense copy)
        return LevelState(st.weights, {n: t.contiguous() for n, t in g.items()}, keys.shape[1], keys)
    gsum = {n: st.grad_sum[n] + g[n] for n in g}
    return LevelState(st.weights, gsum, st.count + keys.shape[1], torch.cat([st.keys, keys], 1))


def _step(block, st: LevelState, lr: float, at: dict | None = None) -> LevelState:
    """theta <- theta - s g, s = min(lr / n, ||g||^2 / ||J g||^2) per row, J g at the weights ``at``
    (default: the level's own); no step without pairs. The accumulators restart."""
    w, g = st.weights, st.grad_sum
    if st.count > 0:
        act_grad = mlp.derivative(block)
        if act_grad is not None:  # closed form (cms_in_context_mlp)
            cut = lambda d: {n: t.detach() for n, t in d.items()}  # noqa: E731
            jg = mlp.directional(block, act_grad, cut(w if at is None else at), cut(g), st.keys.detach())
        else:
            cut = lambda d: {n: _own_memory(t.detach()) for n, t in d.items()}  # noqa: E731
            _, jg = jvp(lambda p: _read(block, p, st.keys.detach()), (cut(w if at is None else at),), (cut(g),))
        gg = sum(t.detach().pow(2).flatten(1).sum(1) for t in g.values())
        jj = jg.pow(2).flatten(1).sum(1)
        s = torch.clamp(gg / jj.clamp_min(torch.finfo(jj.dtype).tiny), max=lr / st.count)  # (B,)
        w = {n: w[n] - s.reshape(-1, *(1,) * (g[n].ndim - 1)) * g[n] for n in w}
    return LevelState(w, _zeros_like(g), 0, None)


def _own_memory(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied if it is broadcast (stride 0, like the initial fast weights): jvp's dual tensors need it."""
    return t.contiguous() if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)) else t


def _zeros_like(d: dict) -> dict:
    """Zeros shaped like every tensor of ``d``, as expanded scalars (no memory is filled)."""
    return {n: v.new_zeros(()).expand_as(v) for n, v in d.items()}
