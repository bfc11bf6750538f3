"""One gradient-anchor segment of a fast-weight memory, all tokens at once.

Within a segment every token's gradient is taken at the same anchor weights A, so the whole
segment is one batched pass: the per-token gradients g_t of l(W; k_t, v_t) at A and their
residual norms, the bounded step sizes c_t (see step.py), the updates u_t = -c_t g_t, the
momentum/decay scan of D = W - W_0 (see scan.py) and, when queries are given, the read-out
y_t = M_{W_0 + D_t}(q_t) with every token's own weights. Two engines give the same numbers:

- :class:`AnalyticEngine`, for memories with closed-form rank-1 ``factors`` and ``compose`` (the
  built-in residual MLP and linear map): per weight matrix g_t = left_t right_t^T, the read-out in
  dual form (matrix products only, no per-token weights);
- :class:`FuncEngine`, for any module: per-token gradients by ``vmap(grad(functional_call))``,
  materialised, and the read-out with materialised per-token weights (memory N x L x the
  module's parameter count for a segment of L tokens).

Example:
    >>> from nl_layers.memory.mlp import ResidualMLPMemory
    >>> mem = ResidualMLPMemory(4, 8)
    >>> engine = make_engine(mem, None, "analytic")
    >>> w = {n: p.detach().expand(3, *p.shape) for n, p in mem.named_parameters()}
    >>> zeros = {n: torch.zeros_like(t) for n, t in w.items()}
    >>> k, v, q = torch.randn(3, 10, 4), torch.randn(3, 10, 4), torch.randn(3, 10, 4)
    >>> y, d, s = engine.segment(w, zeros, zeros, w, k, v, torch.full((3, 10), 0.1), None,
    ...                          torch.zeros(3, 10), chunk_size=4, error_clip=1.0, q=q)
    >>> y.shape, d["w_in"].shape
    (torch.Size([3, 10, 4]), torch.Size([3, 8, 4]))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..._modules import factored_grad_sq_norm
from .grouped_linear import apply_weight as _apply  # x W^T (+ add in the same operator)
from .grouped_linear import grouped_linear
from .scan import (
    ChunkPlan,
    TokenPlan,
    bc,
    dense_all,
    dense_states,
    rank1_ends,
    rank1_read,
    rank1_read_tokens,
    rank1_states,
)
from .step import inner_step




def _get(tree: dict | None, name: str):
    """tree[name]; None (a zero state, see scan.py) for tree None."""
    return None if tree is None else tree[name]


class AnalyticEngine:
    """Segments in closed form for memories with ``factors`` and ``compose`` (see memory/mlp.py).

    ``form``: "chunks" (chunk start states, :class:`ChunkPlan`), "tokens" (one L x L closed form
    per segment, :class:`TokenPlan`) or "auto" (the one that moves fewer bytes, :meth:`use_tokens`);
    the results are the same.
    """

    def __init__(self, template: nn.Module, form: str = "auto"):
        if not all(hasattr(template, a) for a in ("factors", "compose")):
            raise ValueError(
                f"grad_impl='analytic' needs a memory with closed-form factors/compose "
                f"(ResidualMLPMemory, LinearMapMemory); {type(template).__name__} has none: use grad_impl='func'"
            )
        if form not in ("auto", "tokens", "chunks"):
            raise ValueError(f"form must be 'auto', 'tokens' or 'chunks', got {form!r}")
        self.template, self.form = template, form

    def use_tokens(self, length: int, chunk_size: int, momentum: bool, sizes) -> bool:
        """Whether to take the whole segment in one closed form (:class:`TokenPlan`, an L x L matrix
        per copy) rather than in chunks (chunk start states: n K x the weight matrix per copy and
        matrix, n = L / C chunks): "auto" takes the former when L^2 <= n K x the smallest weight
        matrix (short segments, such as a language model's 256 tokens in chunks of 64)."""
        if self.form != "auto":
            return self.form == "tokens"
        chunks = -(-length // min(chunk_size, length))
        return length**2 <= chunks * (2 if momentum else 1) * min(sizes)

    def read(self, w: dict, x: torch.Tensor) -> torch.Tensor:
        """All tokens x (N, L, d) read with one set of weights per copy (N, ...), or one for all copies (...)."""
        if all(t.ndim == 2 for t in w.values()) and hasattr(self.template, "read_shared"):  # one for all: G = 1
            y = self.template.read_shared(x.reshape(-1, x.shape[-1]), {n: t[None] for n, t in w.items()})
            if y is not None:
                return y.view(*x.shape[:-1], -1)
        return self.template.compose(x, lambda n, inp, add=None: _apply(w[n], inp, add))

    def read_shared(self, w: dict, x: torch.Tensor, heads: torch.Tensor | None = None):
        """x (N, L, d) read by G memories with one set of weights each, w: name -> (G, ...), shared by
        all N copies: (G N, L, d_out), memory-major (as :meth:`read` of the G memories stacked along
        the copies, without repeating x or the weights); the memory's own ``read_shared`` where it has one.
        ``heads`` (R, d_out): the first G - R memories' outputs ((G - R) N, L, d_out) and the last R
        outputs' dot products with the heads (R, N L), as (outputs, dots)."""
        g = next(iter(w.values())).shape[0]
        r = 0 if heads is None else heads.shape[0]
        flat = x.reshape(-1, x.shape[-1])
        out = self.template.read_shared(flat, w, heads) if hasattr(self.template, "read_shared") else None
        if out is None:
            y = self.template.compose(flat.expand(g, -1, -1), lambda n, inp, add=None: grouped_linear(inp, w[n], add))
            out = y if heads is None else (y[: g - r], (y[g - r :] @ heads[:, :, None])[..., 0])
        y, dots = (out, None) if heads is None else out
        y = y.reshape((g - r) * x.shape[0], x.shape[1], -1)
        return y if heads is None else (y, dots)

    def segment(self, anchor, d0, s0, base, k, v, lr, log_m, log_a, chunk_size, error_clip, q=None, dgd=False, need_state=True):
        """Returns (read-out of q (N, L, d) or None, D at the end, S at the end); d0, s0 None: zero.

        anchor and base: name -> (N, *shape) per copy, or (*shape) one for all copies. ``need_state``
        False: the caller does not use the end states; the token form then skips them and returns
        None for both (the chunk form has them anyway, as a by-product of its chunk starts).
        """
        fused = getattr(self.template, "factors_and_norms", None)  # factors and norms in one node, where it has one
        fused = None if fused is None else fused(anchor, k, v, dgd)
        if fused is None:
            facs, residual = self.template.factors(anchor, k, v, dgd)
            g_sq, r_sq = factored_grad_sq_norm(facs.values(), residual)
        else:
            facs, g_sq, r_sq = fused
        scale = inner_step(lr, g_sq, r_sq, error_clip, negate=True)  # -c: the updates are u = -c g
        if self.use_tokens(k.shape[1], chunk_size, log_m is not None, [a.shape[-1] * b.shape[-1] for a, b in facs.values()]):
            return self._segment_tokens(log_m, log_a, facs, scale, d0, s0, base, q, need_state)
        plan = ChunkPlan.build(log_m, log_a, chunk_size)
        blocked = {n: (plan.blocks(scale[..., None] * left), plan.blocks(right)) for n, (left, right) in facs.items()}
        starts, d_last, s_last = {}, {}, {}
        for n, (left, right) in blocked.items():
            starts[n], (d_last[n], s_last[n]) = rank1_states(plan, left, right, _get(d0, n), _get(s0, n))
        y = None
        if q is not None:

            def linear(n, x, add=None):  # W_t x_t (+ add) for every token t, without forming W_t
                left, right = blocked[n]
                fixed = _apply(base[n], x.flatten(1, 2), None if add is None else add.flatten(1, 2))  # one weight per copy
                return fixed.reshape(*x.shape[:3], -1) + rank1_read(plan, left, right, starts[n], x)

            y = plan.unblocks(self.template.compose(plan.blocks(q), linear))
        return y, d_last, s_last

    def _segment_tokens(self, log_m, log_a, facs, scale, d0, s0, base, q, need_state=True):
        """:meth:`segment` through a :class:`TokenPlan`: the updates' step sizes folded into its
        columns; the initial state's part only when one is given; the end states only with ``need_state``
        (None, None otherwise)."""
        given_s = s0 is not None and log_m is not None  # without momentum S_0 does not enter
        plan = TokenPlan.build(log_m, log_a, initial=given_s, ends=need_state, d0=d0 is not None, scale=scale)
        mixing = plan.mix
        if need_state:
            weights = mixing[:, -1, :, None] if log_m is None else torch.stack([mixing[:, -1], plan.dm_last * scale], -1)
        y, d_last, s_last = None, {}, {}
        for n, (left, right) in facs.items() if need_state else ():
            ends = rank1_ends(left, right, weights)
            d_last[n] = ends[:, 0]
            if log_m is None:
                s_last[n] = scale[:, -1, None, None] * left[:, -1, :, None] * right[:, -1, None, :]  # S_L = u_L
            else:
                s_last[n] = ends[:, 1] if not given_s else ends[:, 1] + bc(plan.pm[:, -1], s0[n]) * s0[n]
            if d0 is not None:
                d_last[n] = d_last[n] + bc(plan.pa[:, -1], d0[n]) * d0[n]
            if given_s:
                d_last[n] = d_last[n] + bc(plan.fs[:, -1], s0[n]) * s0[n]
        fused = getattr(self.template, "read_tokens", None)  # the whole read in one node, where the memory has one
        if q is not None and fused is not None and d0 is None and not given_s:
            y = fused(mixing, facs, base, q)
        if q is not None and y is None:

            def linear(n, x, add=None):  # W_t x_t (+ add) for every token t, without forming W_t
                left, right = facs[n]
                if d0 is None and not given_s:  # the base product inside the read (x's gradient in one sum)
                    return rank1_read_tokens(mixing, left, right, x, add, weight=base[n])
                out = _apply(base[n], x, add)
                if d0 is not None:
                    out = out + plan.pa[..., None] * _apply(d0[n], x)
                if given_s:
                    out = out + plan.fs[..., None] * _apply(s0[n], x)
                return rank1_read_tokens(mixing, left, right, x, out)

            y = self.template.compose(q, linear)
        return (y, d_last, s_last) if need_state else (y, None, None)


class FuncEngine:
    """Segments by ``vmap(grad(functional_call))`` over any memory model (functions built once).

    Args:
        template: the memory model (its parameters give names and shapes; values are substituted).
        token_loss: ``loss(params, k, v) -> scalar`` 1/2 ||r||^2 for one token and one memory copy.
    """

    def __init__(self, template: nn.Module, token_loss: Callable):
        def call(params, x):
            return functional_call(template, params, (x,))

        def dgd_decay(params, k):  # (W a) a^T on the DGD layer (zero elsewhere) and ||W a||^2, one token
            name = template.dgd_layer
            a = template.layer_inputs(params, k)[name]
            wa = params[name] @ a
            out = {n: torch.zeros_like(p) for n, p in params.items()}
            out[name] = wa[:, None] * a[None, :]
            return out, wa.square().sum()

        self.token_grads = vmap(vmap(grad_and_value(token_loss), in_dims=(None, 0, 0)))
        self.token_decay = vmap(vmap(dgd_decay, in_dims=(None, 0))) if hasattr(template, "dgd_layer") else None
        self.read_per_token = vmap(vmap(call))
        self.read = vmap(call)

    def segment(self, anchor, d0, s0, base, k, v, lr, log_m, log_a, chunk_size, error_clip, q=None, dgd=False, need_state=True):
        """Returns (read-out of q (N, L, d) or None, D at the end, S at the end); d0, s0 None: zero.
        ``need_state``: accepted for :class:`AnalyticEngine`'s interface; the end states come with
        the chunk starts anyway."""
        g, loss = self.token_grads(anchor, k, v)
        r_sq = 2 * loss
        if dgd:
            if self.token_decay is None:
                raise ValueError("the DGD rule needs a memory with dgd_layer and layer_inputs")
            decay, wa_sq = self.token_decay(anchor, k)
            g, r_sq = {n: g[n] + decay[n] for n in g}, r_sq + wa_sq
        g_sq = sum(t.flatten(2).square().sum(-1) for t in g.values())
        scale = inner_step(lr, g_sq, r_sq, error_clip, negate=True)  # -c
        plan = ChunkPlan.build(log_m, log_a, chunk_size)
        u = {n: plan.blocks(bc(scale, t) * t) for n, t in g.items()}
        starts, d_last, s_last = {}, {}, {}
        for n, un in u.items():
            starts[n], (d_last[n], s_last[n]) = dense_states(plan, un, _get(d0, n), _get(s0, n))
        y = None
        if q is not None:
            y = self.read_per_token({n: base[n][:, None] + dense_all(plan, u[n], starts[n]) for n in u}, q)
        return y, d_last, s_last


def make_engine(template: nn.Module, token_loss: Callable | None, grad_impl: str):
    """FuncEngine for "func", AnalyticEngine for "analytic"; "auto": analytic when the memory has
    the closed forms (the built-in memories), torch.func otherwise."""
    if grad_impl == "auto":
        grad_impl = "analytic" if all(hasattr(template, a) for a in ("factors", "compose")) else "func"
    return AnalyticEngine(template) if grad_impl == "analytic" else FuncEngine(template, token_loss)
