"""Titans neural memory: a deep memory that learns at test time by gradient descent with momentum.

For each head the memory is a model M_W (default a residual MLP x + W_out silu(W_in x)) whose
weights W are fast weights, one copy per batch row and head. Token t writes key k_t, value v_t:

    residual  r_t = M_A(k_t) - v_t,  g_t = grad_W 1/2 ||M_W(k_t) - v_t||^2 at W = A (the anchor)
    step      c_t = theta_t s_t / (1 + theta_t kappa_t),  kappa_t = ||g_t||^2 / ||r_t||^2,  s_t = min(1, tau / ||r_t||)
    surprise  S_t = eta_t S_{t-1} - c_t g_t
    memory    W_t = W_0 + (1 - alpha_t)(W_{t-1} - W_0) + S_t
    read      y_t = M_{W_t}(q_t)

Forgetting pulls the fast weights back to the learnable initial weights W_0 (the slow level that
outer training shapes), not to zero; for ``memory="linear"`` (W_0 = 0) it is the literal Titans
rule W_t = (1 - alpha_t) W_{t-1} + S_t. theta_t = max_lr * sigmoid(w_theta . x_t),
eta_t = sigmoid(w_eta . x_t), alpha_t = sigmoid(w_alpha . x_t) are data-dependent per head.
q, k, v come from linear projections and a causal depthwise convolution (width 4), then l2-normalisation.

The anchor A. Gradients are taken at the weights the token's *anchor segment* started from:
``anchor_size`` tokens aligned to absolute positions (so streaming in pieces is exact).

- ``anchor_size=None`` (default): the anchor is never refreshed, A = the weights the sequence
  started from (W_0 for a fresh state; titans-pytorch's default). Every error is measured
  against A, so there is no feedback from earlier writes into later gradients, and the whole
  call is one parallel pass: no loop over time at all.
- ``anchor_size=b``: re-anchor every b tokens: within a segment errors are measured against
  the segment-start weights (no feedback inside it), across segments they see every earlier
  write. b = 1 is the exact token-by-token memory; b = the chunk size is the Titans paper's
  chunk-wise training (Section 3.2: gradients w.r.t. the chunk-start state, sequential across
  chunks) and what this layer's former ``chunk_size`` did. One parallel pass per segment, so
  a Python loop over T / b segments.

``chunk_size`` only blocks the computation (it never changes the result): within a chunk the
momentum/decay scan is a closed form with C x C decay products, across chunks a log-depth scan
(nl_layers/ops/fast_weights). ``mode="recurrent"`` is a token-by-token reference with the same
anchors and plain-autograd gradients.

Stability. c_t kappa_t < 1, so no token overshoots its own target along r_t (normalised LMS;
Longhorn's b / (1 + b ||k||^2) for the linear memory), and every step is bounded whatever the
inputs, weights or curvature: ||c_t g_t|| <= sqrt(theta_t) s_t ||r_t|| / 2 <= sqrt(max_lr) tau / 2
(``error_clip`` = tau; None leaves ||r_t|| unclipped). With momentum (eta <= 1) and decay
(1 - alpha <= 1) the fast weights then move by at most ||S_0|| t + t(t+1)/2 sqrt(max_lr) tau / 2
after t tokens, for any anchor_size: they cannot blow up, whatever max_lr. (The former rule,
theta_t g_t with anchors every 16 tokens, overshot by up to theta L kappa / (1 - eta) per
chunk and reached NaN within a few optimizer steps of a language model.) Within a segment the
steps of up to b tokens still add up before the memory sees them, so with anchor_size = b
large max_lr oscillates (bounded, but it hurts the fit); max_lr = 1 trained well in both regimes
(char-level LM and associative recall, 3 seeds each; recall accuracy rose from 0.3 at
max_lr = 0.03 to 0.6 at 1; max_lr = 3 with anchors of 16 tokens lost 0.15 nats).

References: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024);
lucidrains/titans-pytorch; Liu et al. 2024 (Longhorn).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from .._checks import check_choice, check_positive_int, check_sequence, check_state_batch
from .._modules import CausalDepthwiseConv1d, l2_normalize, merge_heads
from ..ops.fast_weights import AnalyticEngine, make_engine
from .fast_weights import (
    expand_params,
    flatten,
    reference_grads_and_losses,
    reference_step,
    segments,
    shared_params,
    unflatten,
)
from .mlp import make_memory


class NeuralMemoryState(NamedTuple):
    """Streaming state of a NeuralMemory.

    weights: name -> (B, H, *shape) current fast weights W_t.
    anchor: name -> (B, H, *shape) weights at the start of the current anchor segment (where gradients are taken).
    momentum: name -> (B, H, *shape) surprise S_t.
    conv: (B, width - 1, channels) last projected inputs, for the causal convolution.
    position: tokens seen so far.
    """

    weights: dict
    anchor: dict
    momentum: dict
    conv: torch.Tensor
    position: int

    def detach(self) -> "NeuralMemoryState":
        """A copy cut from the autograd graph (truncated backpropagation through time)."""
        cut = lambda tree: {n: t.detach() for n, t in tree.items()}  # noqa: E731
        return NeuralMemoryState(cut(self.weights), cut(self.anchor), cut(self.momentum), self.conv.detach(), self.position)


def check_anchor(anchor_size) -> None:
    check_positive_int(anchor_size, "anchor_size", allow_none=True)


class NeuralMemory(nn.Module):
    """Titans neural long-term memory layer (residual-MLP fast weights, surprise momentum, forgetting).

    Args:
        dim: model width. heads: number of heads; head_dim defaults to dim // heads.
        chunk_size: compute blocking of the parallel form (does not change results).
        anchor_size: gradients of each segment of ``anchor_size`` tokens are taken at the weights
            at its start; None (default): never re-anchor (one parallel pass per call).
        memory: "mlp" (residual MLP, hidden = expansion * head_dim), "linear" (M(x) = W x, W_0 = 0)
            or an nn.Module mapping (..., head_dim) -> (..., head_dim). Its parameters are the
            learnable initial fast weights, shared by all heads.
        max_lr: upper bound of the data-dependent inner learning rate theta_t (before normalisation).
        error_clip: tau, the norm the inner residual is clipped to (None: no clip).
        momentum: learn the surprise momentum eta_t (otherwise eta_t = 0: S_t = -c_t g_t).
        forget: learn the forgetting gate alpha_t (otherwise alpha_t = 0).
        conv_width: width of the causal depthwise convolution on q, k, v (1 = none).
        grad_impl: "func" (``vmap(grad(functional_call))`` over the memory model, any module),
            "analytic" (closed-form, dual-form segments of the built-in memories: the same numbers
            with less overhead) or "auto" (default: analytic when available).

    ``forward(x, state=None, mode="chunked", need_state=True)`` returns ``(y, NeuralMemoryState)``.
    Feeding a sequence in pieces, passing the state along, gives the same outputs as one call.
    ``need_state=False`` (a caller that drops the state, such as a training loss) returns ``(y, None)``
    and skips the end-of-call fast weights where the engine can (y is the same).

    Example:
        >>> mem = NeuralMemory(dim=32, heads=2, chunk_size=8)
        >>> x = torch.randn(2, 20, 32)
        >>> y, state = mem(x)
        >>> y_a, s = mem(x[:, :13]); y_b, _ = mem(x[:, 13:], s)
        >>> bool(torch.allclose(torch.cat([y_a, y_b], 1), y, atol=1e-5))
        True
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        head_dim: int | None = None,
        chunk_size: int = 64,
        anchor_size: int | None = None,
        memory="mlp",
        expansion: float = 2.0,
        max_lr: float = 1.0,
        error_clip: float | None = 1.0,
        momentum: bool = True,
        forget: bool = True,
        conv_width: int = 4,
        grad_impl: str = "auto",
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(heads, "heads")
        check_positive_int(chunk_size, "chunk_size")
        check_anchor(anchor_size)
        check_positive_int(conv_width, "conv_width")
        check_choice(grad_impl, "grad_impl", ("auto", "func", "analytic"))
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}), or pass head_dim")
            head_dim = dim // heads
        if not max_lr > 0:
            raise ValueError(f"max_lr must be > 0, got {max_lr}")
        if error_clip is not None and not error_clip > 0:
            raise ValueError(f"error_clip must be > 0 or None, got {error_clip}")
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.chunk_size, self.anchor_size, self.max_lr, self.error_clip = chunk_size, anchor_size, max_lr, error_clip
        inner = heads * head_dim
        self.memory = make_memory(memory, head_dim, expansion)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.conv = CausalDepthwiseConv1d(3 * inner, conv_width)
        self.to_lr = nn.Linear(dim, heads)
        self.to_momentum = nn.Linear(dim, heads) if momentum else None
        self.to_forget = nn.Linear(dim, heads) if forget else None
        if self.to_forget is not None:
            nn.init.constant_(self.to_forget.bias, -4.0)  # alpha ~ 0.02 at init
        self.out = nn.Linear(inner, dim, bias=False)
        self.engine = make_engine(self.memory, self._token_loss, grad_impl)

    # -- the inner objective ------------------------------------------------------------------
    def _token_loss(self, params, k, v):
        return 0.5 * (functional_call(self.memory, params, (k,)) - v).pow(2).sum()

    def _copy_losses(self, params, k, v):  # (N,) losses of one token per copy, for the reference
        pred = vmap(lambda p, x: functional_call(self.memory, p, (x,)))(params, k)
        return 0.5 * (pred - v).pow(2).sum(-1)

    # -- shared preparation -------------------------------------------------------------------
    def initial_state(self, batch: int, like: torch.Tensor, conv: bool = True) -> NeuralMemoryState:
        """The state at the start of a sequence: the learnable initial weights, zero momentum
        (``conv=False``: conv None, the convolution then pads by itself, with no zeros tensor)."""
        w = expand_params(self.memory, batch, self.heads)
        zero = like.new_zeros(())  # one zero, broadcast to every momentum (no memory, no writes)
        zeros = {n: zero.expand(t.shape) for n, t in w.items()}
        cache = like.new_zeros(batch, self.conv.width - 1, self.conv.weight.shape[0]) if conv else None
        return NeuralMemoryState(w, w, zeros, cache, 0)

    def _prepare(self, x, conv_cache):
        b, t = x.shape[:2]
        h, inner = self.heads, self.heads * self.head_dim
        gates = [m for m in (self.to_lr, self.to_momentum, self.to_forget) if m is not None]
        # q, k, v and the gates' logits in one product: the projections' weights side by side
        weight = torch.cat([self.to_qkv.weight] + [g.weight for g in gates])
        qkv, logits = F.linear(x, weight).split([3 * inner, h * len(gates)], -1)
        qkv, conv = self.conv(qkv, conv_cache)
        qkv = l2_normalize(qkv.view(b, t, 3 * h, self.head_dim))  # q, k, v of every head at once
        # (B, T, 3, H, d) -> (3, B*H, T, d) and (B, T, G, H) -> (G, B*H, T): one copy each
        q, k, v = qkv.view(b, t, 3, h, self.head_dim).permute(2, 0, 3, 1, 4).reshape(3, b * h, t, self.head_dim).unbind(0)
        logits = (logits + torch.cat([g.bias for g in gates])).view(b, t, len(gates), h)
        logits = iter(logits.permute(2, 0, 3, 1).reshape(len(gates), b * h, t).unbind(0))
        lr = torch.sigmoid(next(logits))
        lr = lr if self.max_lr == 1.0 else self.max_lr * lr
        log_m = F.logsigmoid(next(logits)) if self.to_momentum is not None else None
        log_a = F.logsigmoid(-next(logits)) if self.to_forget is not None else torch.zeros_like(lr)  # log(1 - alpha)
        return q, k, v, lr, log_m, log_a, conv

    def forward(self, x: torch.Tensor, state: NeuralMemoryState | None = None, mode: str = "chunked", need_state: bool = True):
        check_sequence(x, self.dim)
        check_choice(mode, "mode", ("chunked", "recurrent"))
        b, t, _ = x.shape
        if state is not None:
            check_state_batch(state.conv.shape[0], b)
        fresh = state is None  # zero offset and momentum: the scan skips them
        # A fresh call whose state is dropped, on the analytic engine, reads nothing of a state (the
        # shared initial weights W_0 serve every copy, later segments start from their own results).
        stateless = fresh and not need_state and mode == "chunked" and isinstance(self.engine, AnalyticEngine)
        if not stateless:
            state = self.initial_state(b, x, conv=False) if state is None else state
        q, k, v, lr, log_m, log_a, conv = self._prepare(x, None if stateless else state.conv)
        if stateless:
            w = anchor = s = base = None
        else:
            w, anchor, s = flatten(state.weights), flatten(state.anchor), flatten(state.momentum)
            base = flatten(expand_params(self.memory, b, self.heads))
        if mode == "chunked":
            y, w, anchor, s = self._parallel(q, k, v, lr, log_m, log_a, w, anchor, s, base,
                                             0 if stateless else state.position, fresh, need_state)
        else:
            y, w, anchor, s = self._recurrent(q, k, v, lr, log_m, log_a, w, anchor, s, base, state.position)
        y = merge_heads(y.reshape(b, self.heads, t, self.head_dim))
        if not need_state:
            return self.out(y), None
        new_state = NeuralMemoryState(
            unflatten(w, b, self.heads), unflatten(anchor, b, self.heads), unflatten(s, b, self.heads), conv, state.position + t
        )
        return self.out(y), new_state

    # -- parallel form: one batched pass per anchor segment -------------------------------------
    def _parallel(self, q, k, v, lr, log_m, log_a, w, anchor, s, base, position, fresh=False, need_state=True):
        """Read-outs and the end state (w, anchor, s; None for w and s when the last segment is run
        without ``need_state``)."""
        ys, length = [], q.shape[1]
        # The analytic engine takes weights shared by every copy as one matrix (plain products, no per-copy
        # gradients): the initial weights W_0, and the anchor of a fresh sequence until it is first refreshed.
        if isinstance(self.engine, AnalyticEngine):
            base = shared_params(self.memory)
        work = base if fresh and isinstance(self.engine, AnalyticEngine) else anchor
        for start, end, reanchor in segments(q.shape[1], self.anchor_size, position):
            sl = slice(start, end)
            zero = fresh and start == 0
            y, delta, s = self.engine.segment(
                work, None if zero else {n: w[n] - base[n] for n in w}, None if zero else s, base,
                k[:, sl], v[:, sl], lr[:, sl],
                None if log_m is None else log_m[:, sl], log_a[:, sl], self.chunk_size, self.error_clip, q=q[:, sl],
                need_state=need_state or end < length,
            )
            w = None if delta is None else {n: base[n] + delta[n] for n in delta}
            ys.append(y)
            if reanchor:
                anchor = work = w
        return torch.cat(ys, dim=1) if len(ys) > 1 else ys[0], w, anchor, s

    # -- token-by-token reference ---------------------------------------------------------------
    def _recurrent(self, q, k, v, lr, log_m, log_a, w, anchor, s, base, position):
        read = vmap(lambda p, x: functional_call(self.memory, p, (x,)))
        ys = []
        for i in range(q.shape[1]):
            g, losses = reference_grads_and_losses(anchor, k[:, i], v[:, i], self._copy_losses)
            w, s = reference_step(
                w, s, base, g, 2 * losses, lr[:, i], None if log_m is None else log_m[:, i], log_a[:, i], self.error_clip
            )
            ys.append(read(w, q[:, i]))
            if self.anchor_size is not None and (position + i + 1) % self.anchor_size == 0:
                anchor = w  # segment done: the next gradients are taken here
        return torch.stack(ys, dim=1), w, anchor, s
