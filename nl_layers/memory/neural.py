"""Titans neural memory: a deep memory that learns at test time by gradient descent with momentum.

For each head the memory is a model M_W (default a residual MLP x + W_out silu(W_in x)) whose
weights W are fast weights, one copy per batch row and head. Token t writes key k_t, value v_t:

    loss     l(W; k, v) = 1/2 ||M_W(k) - v||^2
    surprise S_t = eta_t S_{t-1} - theta_t grad l(W_anchor; k_t, v_t)
    memory   W_t = W_0 + (1 - alpha_t)(W_{t-1} - W_0) + S_t
    read     y_t = M_{W_t}(q_t)

Forgetting pulls the fast weights back to the learnable initial weights W_0 (the slow level that
outer training shapes), not to zero: a residual-MLP memory forgets what it wrote in context but
keeps what it was trained to start from. For a memory with W_0 = 0 (``memory="linear"``) this is
the literal Titans rule W_t = (1 - alpha_t) W_{t-1} + S_t.

theta_t = max_lr * sigmoid(w_theta . x_t), eta_t = sigmoid(w_eta . x_t), alpha_t = sigmoid(w_alpha . x_t)
are data-dependent per head. q, k, v come from linear projections followed by a causal depthwise
convolution (width 4); q and k are l2-normalized. W_anchor is the state at the start of the token's
chunk (chunk_size tokens): within a chunk all gradients are one ``vmap(grad(functional_call))`` (or, for the built-in
memories, their closed form) and the momentum/decay recurrence is a closed-form scan (see
fast_weights.py). chunk_size=1 is the exact
token-by-token Titans memory. ``mode="recurrent"`` runs a token-by-token reference with the same
chunk semantics that takes its gradients with plain autograd.

Stability: within a chunk every token's update is taken at the chunk-start weights, so a chunk
applies up to L / (1 - eta) of them without feedback; for the residual-MLP memory the curvature of
the inner loss is about |silu(W_in k)|^2 (tens at head_dim 64). The inner loop then stays bounded
only for roughly max_lr * L * |h|^2 / (1 - eta) < 2: at width 384 in a trained language model the
default max_lr = 0.1 diverged (fast weights to inf) after one optimizer step, and max_lr = 1e-3
with chunk_size 16 trained but still diverged in 4 of 6 runs (benchmarks/results/evidence/lm).
Lower ``max_lr`` or ``chunk_size``, or use ``memory="linear"`` (curvature |k|^2 = 1), if you see NaN.

References: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024);
lucidrains/titans-pytorch; DESIGN.md section 5.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from .._checks import check_choice, check_positive_int, check_sequence, check_state_batch
from .._modules import CausalDepthwiseConv1d, l2_normalize, merge_heads, split_heads
from .fast_weights import expand_params, flatten, make_engine, pieces, reference_grads, unflatten
from .mlp import make_memory


class NeuralMemoryState(NamedTuple):
    """Streaming state of a NeuralMemory.

    weights: name -> (B, H, *shape) current fast weights W_t.
    anchor: name -> (B, H, *shape) weights at the start of the current chunk (where gradients are taken).
    momentum: name -> (B, H, *shape) surprise S_t.
    conv: (B, width - 1, channels) last projected inputs, for the causal convolution.
    position: tokens seen so far (the chunk phase is position % chunk_size).
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


class NeuralMemory(nn.Module):
    """Titans neural long-term memory layer (residual-MLP fast weights, surprise momentum, forgetting).

    Args:
        dim: model width. heads: number of heads; head_dim defaults to dim // heads.
        chunk_size: tokens per chunk (gradients at the chunk-start state); 1 = token by token.
        memory: "mlp" (residual MLP, hidden = expansion * head_dim), "linear" (M(x) = W x, W_0 = 0)
            or an nn.Module mapping (..., head_dim) -> (..., head_dim). Its parameters are the
            learnable initial fast weights, shared by all heads.
        max_lr: upper bound of the data-dependent inner learning rate theta_t.
        momentum: learn the surprise momentum eta_t (otherwise eta_t = 0: S_t = -theta_t grad).
        forget: learn the forgetting gate alpha_t (otherwise alpha_t = 0).
        conv_width: width of the causal depthwise convolution on q, k, v (1 = none).
        grad_impl: "func" (``vmap(grad(functional_call))`` over the memory model, any module),
            "analytic" (closed-form, dual-form chunks of the built-in memories: the same numbers
            with several times less overhead) or "auto" (default: analytic when available).

    ``forward(x, state=None, mode="chunked")`` returns ``(y, NeuralMemoryState)``. Feeding a
    sequence in pieces, passing the state along, gives the same outputs as one call.

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
        chunk_size: int = 16,
        memory="mlp",
        expansion: float = 2.0,
        max_lr: float = 0.1,
        momentum: bool = True,
        forget: bool = True,
        conv_width: int = 4,
        grad_impl: str = "auto",
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(heads, "heads")
        check_positive_int(chunk_size, "chunk_size")
        check_positive_int(conv_width, "conv_width")
        check_choice(grad_impl, "grad_impl", ("auto", "func", "analytic"))
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}), or pass head_dim")
            head_dim = dim // heads
        if not max_lr > 0:
            raise ValueError(f"max_lr must be > 0, got {max_lr}")
        self.dim, self.heads, self.head_dim, self.chunk_size, self.max_lr = dim, heads, head_dim, chunk_size, max_lr
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

    def _batch_loss(self, params, k, v):
        pred = vmap(lambda p, x: functional_call(self.memory, p, (x,)))(params, k)
        return 0.5 * (pred - v).pow(2).sum()

    # -- shared preparation -------------------------------------------------------------------
    def initial_state(self, batch: int, like: torch.Tensor) -> NeuralMemoryState:
        """The state at the start of a sequence: the learnable initial weights, zero momentum."""
        w = expand_params(self.memory, batch, self.heads)
        zeros = {n: torch.zeros_like(t) for n, t in w.items()}
        conv = like.new_zeros(batch, self.conv.width - 1, self.conv.weight.shape[0])
        return NeuralMemoryState(w, w, zeros, conv, 0)

    def _prepare(self, x, state):
        qkv, conv = self.conv(self.to_qkv(x), state.conv)
        q, k, v = (split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        q, k = l2_normalize(q), l2_normalize(k)
        flat = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731  (B, H, ...) -> (B*H, ...)
        lr = flat(self.max_lr * torch.sigmoid(self.to_lr(x)).transpose(1, 2))
        log_m = flat(F.logsigmoid(self.to_momentum(x)).transpose(1, 2)) if self.to_momentum is not None else None
        if self.to_forget is not None:
            log_a = flat(F.logsigmoid(-self.to_forget(x)).transpose(1, 2))  # log(1 - alpha)
        else:
            log_a = torch.zeros_like(lr)
        return flat(q), flat(k), flat(v), lr, log_m, log_a, conv

    def forward(self, x: torch.Tensor, state: NeuralMemoryState | None = None, mode: str = "chunked"):
        check_sequence(x, self.dim)
        check_choice(mode, "mode", ("chunked", "recurrent"))
        b, t, _ = x.shape
        if state is not None:
            check_state_batch(state.conv.shape[0], b)
        state = self.initial_state(b, x) if state is None else state
        q, k, v, lr, log_m, log_a, conv = self._prepare(x, state)
        w, anchor, s = flatten(state.weights), flatten(state.anchor), flatten(state.momentum)
        base = flatten(expand_params(self.memory, b, self.heads))
        run = self._chunked if mode == "chunked" else self._recurrent
        y, w, anchor, s = run(q, k, v, lr, log_m, log_a, w, anchor, s, base, state.position)
        y = merge_heads(y.reshape(b, self.heads, t, self.head_dim))
        new_state = NeuralMemoryState(
            unflatten(w, b, self.heads), unflatten(anchor, b, self.heads), unflatten(s, b, self.heads), conv, state.position + t
        )
        return self.out(y), new_state

    # -- chunked parallel form ----------------------------------------------------------------
    def _chunked(self, q, k, v, lr, log_m, log_a, w, anchor, s, base, position):
        ys = []
        for start, end, completes in pieces(q.shape[1], self.chunk_size, position % self.chunk_size):
            sl = slice(start, end)
            delta = {n: w[n] - base[n] for n in w}  # the scan decays W - W_0
            y, delta, s = self.engine.chunk(
                anchor, delta, s, base, k[:, sl], v[:, sl], lr[:, sl],
                None if log_m is None else log_m[:, sl], log_a[:, sl], q=q[:, sl],
            )
            w = {n: delta[n] + base[n] for n in w}
            ys.append(y)
            if completes:
                anchor = w
        return torch.cat(ys, dim=1), w, anchor, s

    # -- token-by-token reference ---------------------------------------------------------------
    def _recurrent(self, q, k, v, lr, log_m, log_a, w, anchor, s, base, position):
        read = vmap(lambda p, x: functional_call(self.memory, p, (x,)))
        ys = []
        for i in range(q.shape[1]):
            g = reference_grads(anchor, k[:, i], v[:, i], self._batch_loss)
            theta = lr[:, i]
            eta = log_m[:, i].exp() if log_m is not None else None
            a = log_a[:, i].exp()
            new_s, new_w = {}, {}
            for n in w:
                shape = (-1,) + (1,) * (w[n].ndim - 1)
                step = -theta.reshape(shape) * g[n]
                new_s[n] = step if eta is None else eta.reshape(shape) * s[n] + step
                new_w[n] = base[n] + a.reshape(shape) * (w[n] - base[n]) + new_s[n]
            s, w = new_s, new_w
            ys.append(read(w, q[:, i]))
            if (position + i + 1) % self.chunk_size == 0:  # chunk done: the next gradients are taken here
                anchor = w
        return torch.stack(ys, dim=1), w, anchor, s
