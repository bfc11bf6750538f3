"""In-context learning for the CMS: every level takes a gradient step every C_l tokens of a sequence.

Each level l holds fast weights theta_l per sequence (batch row), starting from the block's
parameters. Its objective, over the stream u of its inputs (x for level 1 and for the independent
and nested variants, h_{l-1} for sequential levels), is next-input prediction through the block
read as a residual map:

    l_t(theta) = 1/2 || u_{t-1} + f(u_{t-1}; theta) - u_t ||^2        (t >= 1)

Outputs at tokens of a chunk use the weights from the chunk start; at every C_l-th token the level
steps theta_l <- theta_l - lr_l * mean(grad l_t) over the pairs accumulated since its last step
(paper Eq. 71, with the mean instead of the sum so that lr does not scale with C_l). Because the
weights are constant inside a chunk, the chunk's outputs and its loss are one batched
``functional_call`` (vmapped over the sequences' weights) and its gradient one autograd call:
no Python loop per token (except C_l = 1).

Nested variant: the levels are deltas, f(x; theta_1 + ... + theta_k); the chunk sizes must not
increase along the levels (level 1 slowest). When level l steps, every faster level m > l is
re-initialised to its learnable initial delta, i.e. it restarts from level l's new state: the
initial state of a fast level is what the slower level has learned (paper section 7.1).

``mode="recurrent"`` is the token-by-token reference, with gradients from plain autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.func import functional_call, grad, vmap

from ._checks import check_choice, check_finite, check_state_batch
from .memory.fast_weights import pieces, reference_grads


class LevelState(NamedTuple):
    """One level's in-context state: fast weights (B, ...), gradient sum since its last step, pair count."""

    weights: dict
    grad_sum: dict
    count: int


class CMSState(NamedTuple):
    """In-context CMS state: one LevelState per level, each level's last input (B, dim), tokens seen."""

    levels: tuple
    prev: tuple
    position: int

    def detach(self) -> "CMSState":
        """A copy cut from the autograd graph (truncated backpropagation through time)."""
        cut = lambda d: {n: t.detach() for n, t in d.items()}  # noqa: E731
        levels = tuple(LevelState(cut(s.weights), cut(s.grad_sum), s.count) for s in self.levels)
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
    w.r.t. the block's parameters and the inputs). Returns (outputs, grads, number of pairs).
    """
    first = prev if prev is not None else seg[:, 0]
    seq = torch.cat([first[:, None], seg], dim=1)
    skip = 1 if prev is None else 0  # the first token of a sequence has no predecessor

    def pair_loss(params):
        out = _read(block, params, seq)
        err = (seq[:, :-1] + out[:, :-1] - seg).pow(2).sum(-1)[:, skip:]  # (B, pairs)
        return 0.5 * err.sum(), out

    grads, out = grad(pair_loss, has_aux=True)(w)
    return out[:, 1:], grads, seg.shape[1] - skip


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
            levels.append(LevelState(w, {n: torch.zeros_like(t) for n, t in w.items()}, 0))
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
        w, gsum, count = st
        outs = []
        for s, e, completes in pieces(u.shape[1], chunk, position % chunk):
            seg = u[:, s:e]
            out, g, n_pairs = _chunk_step(block, w, prev, seg)
            outs.append(out)
            gsum = {n: gsum[n] + g[n] for n in gsum}
            count += n_pairs
            prev = seg[:, -1]
            if completes:
                w, gsum, count = _step(w, gsum, count, lr)
        return torch.cat(outs, dim=1), LevelState(w, gsum, count), prev

    def _token(self, cms, xt, levels, prev, pos):
        """One token through every level (reference): read, accumulate, step at boundaries."""
        def one(i, u):
            block, chunk = cms.blocks[i], self.chunks[i]
            if chunk is None:
                out = block(u)
            else:
                w, gsum, count = levels[i]
                out = vmap(lambda p, xi: functional_call(block, p, (xi,)))(w, u)
                if prev[i] is not None:
                    loss = lambda p, k, v: _batch_pair_loss(block, p, k, v)  # noqa: E731
                    g = reference_grads(w, prev[i], u, loss)
                    gsum, count = {n: gsum[n] + g[n] for n in gsum}, count + 1
                if (pos + 1) % chunk == 0:
                    w, gsum, count = _step(w, gsum, count, self.lrs[i])
                levels[i] = LevelState(w, gsum, count)
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
                g, n_pairs = None, 0
                if prev is not None:
                    loss = lambda p, k, v: _batch_pair_loss(block, p, k, v)  # noqa: E731
                    g, n_pairs = reference_grads(w, prev, seg[:, 0], loss), 1
            else:
                out, g, n_pairs = _chunk_step(block, w, prev, seg)
                outs.append(out)
            for i, c in enumerate(self.chunks):
                if c is not None and g is not None:
                    lv = levels[i]
                    levels[i] = LevelState(lv.weights, {n: lv.grad_sum[n] + g[n] for n in g}, lv.count + n_pairs)
            prev = seg[:, -1]
            for i, c in enumerate(self.chunks):
                if c is not None and (pos + end) % c == 0:
                    levels[i] = LevelState(*_step(*levels[i], self.lrs[i]))
                    for m in range(i + 1, len(levels)):  # faster levels restart from level i's state
                        wm = {n: p.expand_as(levels[m].weights[n]) for n, p in inits[m].items()}
                        levels[m] = LevelState(wm, {n: torch.zeros_like(v) for n, v in wm.items()}, 0)
            start = end
        y = torch.cat(outs, dim=1)
        return y, CMSState(tuple(levels), (prev,) * len(levels), pos + t)


def _batch_pair_loss(block, params, keys, values):
    """Sum over batch rows of the pair loss, for the autograd reference."""
    pred = keys + vmap(lambda p, k: functional_call(block, p, (k,)))(params, keys)
    return 0.5 * (pred - values).pow(2).sum()


def _step(w: dict, gsum: dict, count: int, lr: float):
    """theta <- theta - lr * gsum / count (no step without pairs); reset the accumulator."""
    if count > 0:
        w = {n: w[n] - (lr / count) * gsum[n] for n in w}
    return w, {n: torch.zeros_like(v) for n, v in gsum.items()}, 0
