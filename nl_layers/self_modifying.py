"""Self-modifying Titans: keys, values, step sizes and decays are produced by memories that learn in context.

Per head, with x_t the head's slice of the input after a causal depthwise convolution (width 4,
starting as the identity; only it and the query projection are static):

    k_t = normalize(M_k(x^_t)),  v_t = normalize(M_v(x^_t)),  q_t = normalize(W_q x_t),  x^_t = normalize(x_t),
    eta_t = max_lr * sigmoid(w_eta . M_eta(x^_t) + b_eta),  alpha_t = sigmoid(w_alpha . M_alpha(x^_t) + b_alpha),
    y_t = M_mem(q_t)

where M_k, M_v, M_eta, M_alpha and M_mem are residual-MLP fast-weight memories (the readouts w, b
of eta and alpha are static). Every memory writes its own value, v_hat = M(v_t) (stop-gradient by
default), and learns by delta gradient descent (DGD) with decay and momentum, each step taken at
the memory's anchor A and bounded as in :class:`~nl_layers.NeuralMemory`:

    g_t = W a a^T + grad_W 1/2 ||M(k_t) - v_hat_t||^2 at A   for every weight matrix W with input a
    r_t = (M_A(k_t) - v_hat_t, W_out a_t),  c_t = eta_t s_t / (1 + eta_t ||g_t||^2 / ||r_t||^2),  s_t = min(1, tau / ||r_t||)
    S_t = beta S_{t-1} - c_t g_t,      W_t = W_0 + alpha_t (W_{t-1} - W_0) + S_t   (beta = sigmoid(learned scalar))

which is M <- M(alpha I - c k k^T) - c grad for a linear memory with W_0 = 0 and no momentum.
The decay pulls toward the learnable initial weights W_0. The input-direction decay W a a^T acts
on the output layer of each residual MLP (a = act(W_in k)); the hidden layer takes the plain
gradient step: decaying W_in along k as well collapses the hidden features within a few hundred tokens.

Anchors. All five memories take their gradients at the weights their anchor segment started from
(``anchor_size`` tokens aligned to absolute positions; streaming is exact), and the four component
memories are also *read* there, so within a segment k, v, eta, alpha are one batched call and
every memory's update is one parallel scan; the main memory is read with its per-token weights.
``anchor_size=None`` (default) never re-anchors: one parallel pass per call, and the component
memories act as learned static MLPs (nothing ever re-reads their writes, so they are not written);
the main memory still learns in context. ``anchor_size=b`` makes the components self-modify every
b tokens (the paper's chunk-wise form; b = 1 is token by token), at one parallel pass per segment
(a Python loop over T / b segments, and the components' writes cost about as much as the main
memory). ``chunk_size`` only blocks the computation. ``mode="recurrent"`` is the token-by-token
reference (plain autograd gradients).

Stability: every step obeys ||c_t g_t|| <= sqrt(max_lr) tau / 2 whatever the inputs and weights
(see nl_layers/ops/fast_weights/step.py), so the fast weights move at most polynomially in the
number of tokens and cannot overflow. With anchors, the steps of a segment add up unseen and the
momentum beta ~ 0.9 multiplies them by up to 10: max_lr = 0.1 is the default because a char-level
LM (3 seeds) trained equally well for max_lr 0.1 to 3 without anchors, but with anchor_size = 16
only 0.1 kept its loss (0.3 lost 0.5 nats, 1 lost 0.6; with anchor_size = 64, 0.3 lost 0.02).

Reference: Behrouz et al. 2025 (Nested Learning), section 8.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call, vmap

from ._function import Function
from ._checks import check_choice, check_positive_int, check_sequence, check_state_batch
from ._modules import CausalDepthwiseConv1d, l2_normalize, merge_heads, normalized_heads
from .memory.fast_weights import (
    expand_params,
    flatten,
    reference_grads_and_losses,
    reference_step,
    segments,
    shared_params,
    unflatten,
)
from .memory.mlp import ResidualMLPMemory
from .ops.fast_weights import AnalyticEngine, make_engine
from .ops.normalize_kernels import normalize_rows, normalize_rows_backward

COMPONENTS = ("key", "value", "lr", "decay")
MEMORIES = COMPONENTS + ("memory",)


class SelfModifyingState(NamedTuple):
    """Streaming state: per memory name, weights / anchor / momentum dicts of (B, H, *shape); the
    causal convolution's last inputs (B, width - 1, dim); tokens seen."""

    weights: dict
    anchor: dict
    momentum: dict
    conv: torch.Tensor
    position: int

    def detach(self) -> "SelfModifyingState":
        """A copy cut from the autograd graph (truncated backpropagation through time)."""
        cut = lambda tree: {m: {n: t.detach() for n, t in d.items()} for m, d in tree.items()}  # noqa: E731
        return SelfModifyingState(cut(self.weights), cut(self.anchor), cut(self.momentum), self.conv.detach(), self.position)


def _dgd_decay(template: ResidualMLPMemory):
    """(params, k) -> ({name: (W a) a^T} on the output layer (zero elsewhere), ||W a||^2) for one token; reference."""

    def fn(params, k):
        a = template.layer_inputs(params, k)["w_out"]
        wa = params["w_out"] @ a
        decay = {n: torch.zeros_like(p) for n, p in params.items()}
        decay["w_out"] = wa[:, None] * a[None, :]
        return decay, wa.square().sum()

    return fn


class _PairNormalize(Function):
    """k = y_k / n_k, v = y_v / n_v (n = max(||y||, eps)) for the key and value outputs stacked
    (2 N, L, d), one node, their input gradient written in one buffer (no split's cat):
    dy_k = (dk - [||y_k|| > eps] k (k . dk)) / n_k (and v); each half one pass each way on CUDA
    (:mod:`~nl_layers.ops.normalize_kernels`)."""

    @staticmethod
    def forward(y, eps):
        n = y.shape[0] // 2
        (k, n_k), (v, n_v) = normalize_rows(y[:n], eps), normalize_rows(y[n:], eps)
        return k, v, n_k, n_v

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.eps = inputs[1]
        ctx.mark_non_differentiable(*output[2:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*output)

    @staticmethod
    @once_differentiable
    def backward(ctx, gk, gv, *_):
        k, v, n_k, n_v = ctx.saved_tensors
        n = k.shape[0]
        compiling = torch.compiler.is_compiling()  # no out= (torch.compile traces this path): a cat
        gy = None if compiling else k.new_empty(2 * n, *k.shape[1:])
        parts = []
        for i, (g, out, norm) in enumerate(((gk, k, n_k), (gv, v, n_v))):
            rows = slice(i * n, (i + 1) * n)
            if g is None:
                parts.append(torch.zeros_like(out) if compiling else gy[rows].zero_())
                continue
            parts.append(normalize_rows_backward(g, out, norm, ctx.eps, out=None if compiling else gy[rows]))
        return torch.cat(parts) if compiling else gy, None


class SelfModifyingTitans(nn.Module):
    """Self-modifying Titans layer (the sequence mixer of HOPE).

    Args:
        dim: model width; heads: number of heads (dim divisible by heads).
        chunk_size: compute blocking of the parallel form (does not change results).
        anchor_size: gradients (and the component memories' reads) of each segment of
            ``anchor_size`` tokens are taken at the weights at its start; None (default): never
            re-anchor (one parallel pass per call; the component memories stay static).
        expansion: hidden width of every memory, as a multiple of the head dimension.
        max_lr: upper bound of eta_t (before normalisation).
        error_clip: tau, the norm the inner residual is clipped to (None: no clip).
        momentum: initial momentum beta of every memory (learned).
        detach_values: stop the gradient through the self-generated values v_hat = M(v).
        conv_width: width of the causal depthwise convolution on the input (1 = none).
        grad_impl: "analytic" (closed-form per-token gradients of the residual MLPs), "func"
            (``vmap(grad(functional_call))``) or "auto" (default: analytic, or func when
            detach_values=False, which differentiates through M(v) inside the inner loss).

    ``forward(x, state=None, mode="chunked", need_state=True)`` returns ``(y, SelfModifyingState)``;
    ``need_state=False`` (a caller that drops the state) returns ``(y, None)`` and skips the last
    segment's end states and component writes (y is the same).

    Example:
        >>> layer = SelfModifyingTitans(dim=32, heads=2, chunk_size=8, anchor_size=4)
        >>> x = torch.randn(2, 19, 32)
        >>> y, state = layer(x)
        >>> y_a, s = layer(x[:, :10]); y_b, _ = layer(x[:, 10:], s)
        >>> bool(torch.allclose(torch.cat([y_a, y_b], 1), y, atol=1e-5))
        True
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        chunk_size: int = 64,
        anchor_size: int | None = None,
        expansion: float = 2.0,
        max_lr: float = 0.1,
        error_clip: float | None = 1.0,
        momentum: float = 0.9,
        detach_values: bool = True,
        grad_impl: str = "auto",
        conv_width: int = 4,
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(heads, "heads")
        check_positive_int(chunk_size, "chunk_size")
        check_positive_int(anchor_size, "anchor_size", allow_none=True)
        check_positive_int(conv_width, "conv_width")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if not max_lr > 0:
            raise ValueError(f"max_lr must be > 0, got {max_lr}")
        if error_clip is not None and not error_clip > 0:
            raise ValueError(f"error_clip must be > 0 or None, got {error_clip}")
        check_choice(grad_impl, "grad_impl", ("auto", "func", "analytic"))
        if grad_impl == "auto":
            grad_impl = "analytic" if detach_values else "func"
        if grad_impl == "analytic" and not detach_values:
            raise ValueError("detach_values=False differentiates through M(v) inside the inner loss: use grad_impl='func'")
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must lie in (0, 1), got {momentum}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.chunk_size, self.anchor_size, self.max_lr, self.error_clip = chunk_size, anchor_size, max_lr, error_clip
        self.detach_values = detach_values
        hidden = max(1, int(round(expansion * self.head_dim)))
        self.memories = nn.ModuleDict({m: ResidualMLPMemory(self.head_dim, hidden) for m in MEMORIES})
        self.momentum_logit = nn.Parameter(torch.full((len(MEMORIES),), math.log(momentum / (1 - momentum))))
        self.conv = CausalDepthwiseConv1d(dim, conv_width)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.lr_head = nn.Linear(self.head_dim, 1)
        self.decay_head = nn.Linear(self.head_dim, 1)
        nn.init.constant_(self.decay_head.bias, 4.0)  # alpha ~ 0.98 at init
        self.out = nn.Linear(dim, dim, bias=False)
        # Engines and the reference's per-token functions, built once.
        self.engines, self.token_decay, self.token_read = {}, {}, {}
        for m, template in self.memories.items():
            self.engines[m] = make_engine(template, self._loss_fn(template), grad_impl)
            self.token_decay[m] = vmap(_dgd_decay(template))
            self.token_read[m] = vmap(lambda p, z, _t=template: functional_call(_t, p, (z,)))

    def _loss_fn(self, template):
        if self.detach_values:
            return lambda p, k, v: 0.5 * (functional_call(template, p, (k,)) - v).pow(2).sum()
        return lambda p, k, v: 0.5 * (functional_call(template, p, (k,)) - functional_call(template, p, (v,))).pow(2).sum()

    def initial_state(self, batch: int, like: torch.Tensor, conv: bool = True) -> SelfModifyingState:
        """The state at the start of a sequence: the learnable initial weights, zero momentum
        (``conv=False``: conv None, the convolution then pads by itself, with no zeros tensor)."""
        w = {m: expand_params(t, batch, self.heads) for m, t in self.memories.items()}
        zero = like.new_zeros(())  # one zero, broadcast to every momentum (no memory, no writes)
        s = {m: {n: zero.expand(x.shape) for n, x in d.items()} for m, d in w.items()}
        return SelfModifyingState(w, w, s, like.new_zeros(batch, self.conv.width - 1, self.dim) if conv else None, 0)

    def _rates(self, lr_out, decay_out):
        """eta and log alpha from the lr and decay memories' outputs."""
        return self.max_lr * torch.sigmoid(self.lr_head(lr_out).squeeze(-1)), F.logsigmoid(self.decay_head(decay_out).squeeze(-1))

    def _stacked_rates(self, rates):
        """:meth:`_rates` of the lr and decay outputs stacked (2 N, L, d): both heads in one batched
        product (their weights and biases stacked), eta and log alpha (N, L)."""
        heads = (self.lr_head, self.decay_head)
        w = torch.stack([m.weight for m in heads])  # (2, 1, d)
        bias = torch.stack([m.bias for m in heads])[..., None]  # (2, 1, 1)
        logits = torch.baddbmm(bias, rates.reshape(2, -1, rates.shape[-1]), w.transpose(1, 2)).view(2, -1, rates.shape[1])
        return self._logit_rates(logits)

    def _logit_rates(self, logits):
        """eta and log alpha (N, L) from the lr and decay heads' logits stacked (2, N, L)."""
        z_lr, z_decay = logits.unbind(0)
        return self.max_lr * torch.sigmoid(z_lr), F.logsigmoid(z_decay)

    def _gates(self, key_out, value_out, lr_out, decay_out):
        """k, v, eta, log alpha from the four component memories' outputs."""
        return (l2_normalize(key_out), l2_normalize(value_out), *self._rates(lr_out, decay_out))

    def forward(self, x: torch.Tensor, state: SelfModifyingState | None = None, mode: str = "chunked", need_state: bool = True):
        check_sequence(x, self.dim)
        check_choice(mode, "mode", ("chunked", "recurrent"))
        b, t, _ = x.shape
        if state is not None:
            check_state_batch(state.weights["memory"]["w_in"].shape[0], b)
        fresh = state is None  # zero offsets and momenta: the scans skip them
        # A fresh call whose state is dropped, with no re-anchoring, on the analytic engines reads
        # nothing of a state (the shared initial weights serve every copy): none is built.
        stateless = fresh and not need_state and mode == "chunked" and self.anchor_size is None and isinstance(
            self.engines["memory"], AnalyticEngine)
        if not stateless:
            state = self.initial_state(b, x, conv=False) if state is None else state
        x, conv = self.conv(x, None if stateless else state.conv)
        xh, q = normalized_heads(x, self.to_q.weight, self.heads)  # x^ and q of every head, head-major (B*H, T, d)
        log_beta = F.logsigmoid(self.momentum_logit)
        if stateless:
            w = a = s = base = None
        else:
            w = {m: flatten(d) for m, d in state.weights.items()}
            a = {m: flatten(d) for m, d in state.anchor.items()}
            s = {m: flatten(d) for m, d in state.momentum.items()}
            base = {m: flatten(expand_params(tpl, b, self.heads)) for m, tpl in self.memories.items()}
        if mode == "chunked":
            y = self._parallel(xh, q, w, a, s, base, log_beta, 0 if stateless else state.position, fresh, need_state)
        else:
            y = self._recurrent(xh, q, w, a, s, base, log_beta, state.position)
        y = merge_heads(y.reshape(b, self.heads, t, self.head_dim))
        if not need_state:
            return self.out(y), None
        unf = lambda tree: {m: unflatten(d, b, self.heads) for m, d in tree.items()}  # noqa: E731
        return self.out(y), SelfModifyingState(unf(w), unf(a), unf(s), conv, state.position + t)

    def _parallel(self, xh, q, w, a, s, base, log_beta, position, fresh=False, need_state=True):
        """One batched pass per anchor segment; updates w, a, s (dicts per memory) in place. Without
        ``need_state`` the last segment writes nothing that is never read: the components' writes
        (read only after a later re-anchor) are skipped and the main memory's end state is not formed
        (w, a, s are then left incomplete: the caller drops them)."""
        n = xh.shape[0]
        writes = self.anchor_size is not None  # the components are written (and re-read) only with anchors
        # The four component memories share one structure: run them stacked along the copy axis.
        stack = lambda tree: {p: torch.cat([tree[m][p] for m in COMPONENTS]) for p in tree["key"]}  # noqa: E731
        rep = lambda z: z.repeat(len(COMPONENTS), *([1] * (z.ndim - 1)))  # noqa: E731
        comp, main, ys = self.engines["key"], self.engines["memory"], []
        # (w, a, s, base None: a fresh call that keeps no state on the analytic engines, see forward)
        wm, am, sm, bm = (None,) * 4 if w is None else (w["memory"], a["memory"], s["memory"], base["memory"])
        # The analytic engines take weights shared by every copy as one matrix (plain products, no per-copy
        # gradients): the initial weights W_0, and the anchors of a fresh sequence until they are first refreshed.
        shared, work = None, am
        if isinstance(main, AnalyticEngine):
            params = {m: shared_params(self.memories[m]) for m in MEMORIES}
            bm = params["memory"]
            if fresh:
                work = bm
                shared = {p: torch.stack([params[m][p] for m in COMPONENTS]) for p in params["key"]}
        ac = stack(a) if writes or shared is None else None
        if writes:
            wc, sc, bc = stack(w), stack(s), stack(base)
            log_bc = log_beta[: len(COMPONENTS)].repeat_interleave(n)[:, None]

        def read_components(x):  # the four components' outputs stacked: key, value, lr, decay
            return comp.read_shared(shared, x) if shared is not None else comp.read(ac, rep(x))

        def gates(x):  # k, v, eta, log alpha; with shared weights the lr and decay outputs only as their heads' logits
            if shared is None:
                key_value, rates = read_components(x).split(2 * n)
                lr, log_a = self._stacked_rates(rates)
            else:
                heads = (self.lr_head, self.decay_head)
                key_value, dots = comp.read_shared(shared, x, heads=torch.cat([m.weight for m in heads]))
                lr, log_a = self._logit_rates((dots + torch.cat([m.bias for m in heads])[:, None]).view(2, n, -1))
            k, v = _PairNormalize.apply(key_value, 1e-6)[:2]  # as _gates, key and value normalised in one node
            return k, v, lr, log_a

        last = False
        for start, end, reanchor in segments(xh.shape[1], self.anchor_size, position):
            sl = slice(start, end)
            k, v, lr, log_a = gates(xh[:, sl])
            last = not need_state and end == xh.shape[1]
            if writes and not last:  # the components' writes are read after the next re-anchor
                target = read_components(v) if self.detach_values else rep(v)
                _, dc, sc = comp.segment(
                    ac, None if fresh and start == 0 else {p: wc[p] - bc[p] for p in wc}, None if fresh and start == 0 else sc, bc, rep(k), target, rep(lr), log_bc.expand(-1, end - start),
                    rep(log_a), self.chunk_size, self.error_clip, dgd=True,
                )
                wc = {p: bc[p] + dc[p] for p in wc}
            target = main.read(work, v) if self.detach_values else v
            zero = fresh and start == 0
            y, dm, sm = main.segment(
                work, None if zero else {p: wm[p] - bm[p] for p in wm}, None if zero else sm, bm, k, target, lr, log_beta[-1].expand_as(lr), log_a,
                self.chunk_size, self.error_clip, q=q[:, sl], dgd=True, need_state=not last,
            )
            ys.append(y)
            if last:
                break
            wm = {p: bm[p] + dm[p] for p in wm}
            if reanchor:
                ac, am, work, shared = wc, wm, wm, None
        y = torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]
        if last:  # the caller drops the state
            return y
        if writes:
            for i, m in enumerate(COMPONENTS):
                w[m], a[m], s[m] = ({p: z[p][i * n : (i + 1) * n] for p in z} for z in (wc, ac, sc))
        w["memory"], a["memory"], s["memory"] = wm, am, sm
        return y

    def _recurrent(self, xh, q, w, a, s, base, log_beta, position):
        ys, writes = [], MEMORIES if self.anchor_size is not None else ("memory",)
        for i in range(xh.shape[1]):
            k, v, lr, log_a = self._gates(*(self.token_read[m](a[m], xh[:, i]) for m in COMPONENTS))
            for j, m in enumerate(MEMORIES):
                if m not in writes:
                    continue
                target = self.token_read[m](a[m], v) if self.detach_values else v
                g, losses = reference_grads_and_losses(a[m], k, target, self._copy_losses(m))
                d, wa_sq = self.token_decay[m](a[m], k)
                g = {n: g[n] + d[n] for n in g}
                w[m], s[m] = reference_step(
                    w[m], s[m], base[m], g, 2 * losses + wa_sq, lr, log_beta[j].expand_as(lr), log_a, self.error_clip
                )
            ys.append(self.token_read["memory"](w["memory"], q[:, i]))
            if self.anchor_size is not None and (position + i + 1) % self.anchor_size == 0:
                a.update({m: w[m] for m in MEMORIES})  # segment done: re-anchor every memory
        return torch.stack(ys, dim=1)

    def _copy_losses(self, m):
        call = self.token_read[m]
        if self.detach_values:
            return lambda p, k, v: 0.5 * (call(p, k) - v).pow(2).sum(-1)
        return lambda p, k, v: 0.5 * (call(p, k) - call(p, v)).pow(2).sum(-1)
