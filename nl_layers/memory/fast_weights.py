"""Fast-weight machinery shared by NeuralMemory (Titans) and SelfModifyingTitans.

A fast-weight memory holds one copy W of a memory model's parameters per (batch row, head),
flattened here to a leading dimension N. Writing is done on the offset D = W - W_0 from the
learnable initial weights W_0. Over a chunk of L tokens, token t contributes an update direction
u_t computed at the chunk-start weights W_anchor (so the L directions are one batched call), and
a scan with scalar per-token coefficients applies momentum m_t and decay a_t:

    S_t = m_t S_{t-1} + u_t,        D_t = a_t D_{t-1} + S_t.

The scan is solved in closed form with L x L matrices of decay products (no loop over tokens):
D_t = P^a_t D_0 + (D^a P^m)_t S_0 + sum_r (D^a D^m)_tr u_r and S_t = P^m_t S_0 + sum_r D^m_tr u_r,
where D^x_ts = prod_{s<r<=t} x_r and P^x_t = prod_{r<=t} x_r. Without momentum S_t = u_t.

Two engines compute a chunk (same numbers, see the tests):

- :class:`FuncEngine`: per-token gradients by ``vmap(grad(functional_call))`` over any memory
  model, materialised per token, then the scan (titans-pytorch style; built once);
- :class:`AnalyticEngine`: for the built-in memories, whose per-token gradients are rank-1 per
  weight matrix (grad = left (x) right). Then D_L = ... + (left * coef)^T right and the per-token
  read-out W_t x_t = W_0 x_t + P^a_t D_0 x_t + ... + ((D^a D^m) * (x right^T)) (-lr * left) never
  forms a per-token weight (the "dual form" of test-time training): matrix products only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def pieces(length: int, chunk_size: int, offset: int):
    """Split ``length`` tokens into pieces aligned to chunks of ``chunk_size``.

    ``offset`` is how many tokens of the current chunk were already seen (streaming).
    Yields (start, end, completes_chunk).
    """
    pos, off = 0, offset
    while pos < length:
        take = min(chunk_size - off, length - pos)
        yield pos, pos + take, off + take == chunk_size
        pos += take
        off = (off + take) % chunk_size


def decay_products(log_x: torch.Tensor):
    """D (N, L, L) with D_ts = prod_{s<r<=t} x_r (s <= t, else 0) and P (N, L) = prod_{r<=t} x_r."""
    length = log_x.shape[-1]
    cum = log_x.cumsum(-1)
    mask = torch.ones(length, length, dtype=torch.bool, device=log_x.device).tril()
    neg_inf = torch.tensor(float("-inf"), dtype=log_x.dtype, device=log_x.device)
    d = torch.where(mask, cum[..., :, None] - cum[..., None, :], neg_inf).exp()
    return d, cum.exp()


class ChunkCoefficients(NamedTuple):
    """D_t = pa_t D_0 + from_s0_t S_0 + sum_r mix_tr u_r;  S_L = pm_last S_0 + sum_r dm_last_r u_r."""

    mix: torch.Tensor  # (N, L, L)
    pa: torch.Tensor  # (N, L)
    from_s0: torch.Tensor | None  # (N, L); None without momentum
    dm_last: torch.Tensor | None  # (N, L); None without momentum (then S_L = u_L)
    pm_last: torch.Tensor | None  # (N,)


def chunk_coefficients(log_m: torch.Tensor | None, log_a: torch.Tensor) -> ChunkCoefficients:
    """Scan coefficients from log-momentum (N, L) (None: no momentum) and log-decay (N, L)."""
    da, pa = decay_products(log_a)
    if log_m is None:
        return ChunkCoefficients(da, pa, None, None, None)
    dm, pm = decay_products(log_m)
    return ChunkCoefficients(da @ dm, pa, (da @ pm[..., None])[..., 0], dm[:, -1], pm[:, -1])


def _bc(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a (N,) or (N, L) coefficient against a tensor with trailing parameter dims."""
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def _apply(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ w.transpose(-1, -2)


class FuncEngine:
    """Chunks by ``vmap(grad(functional_call))`` over any memory model (functions built once).

    Args:
        template: the memory model (its parameters give names and shapes; values are substituted).
        token_loss: ``loss(params, k, v) -> scalar`` for one token and one memory copy.
    """

    def __init__(self, template: nn.Module, token_loss: Callable):
        def call(params, x):
            return functional_call(template, params, (x,))

        def dgd_decay(params, k):  # (W a) a^T on the DGD layer, zero elsewhere, for one token
            name = template.dgd_layer
            a = template.layer_inputs(params, k)[name]
            out = {n: torch.zeros_like(p) for n, p in params.items()}
            out[name] = (params[name] @ a)[:, None] * a[None, :]
            return out

        self.token_grads = vmap(vmap(grad(token_loss), in_dims=(None, 0, 0)), in_dims=(0, 0, 0))
        self.read_per_token = vmap(vmap(call))
        self.read = vmap(call)
        self.token_decay = vmap(vmap(dgd_decay, in_dims=(None, 0))) if hasattr(template, "dgd_layer") else None

    def chunk(self, anchor, delta0, s0, base, k, v, lr, log_m, log_a, q=None, dgd=False):
        """One chunk: returns (read-out of q with per-token weights or None, D_L, S_L)."""
        co = chunk_coefficients(log_m, log_a)
        g = self.token_grads(anchor, k, v)
        if dgd:
            if self.token_decay is None:
                raise ValueError("the DGD rule needs a memory with dgd_layer and layer_inputs")
            d = self.token_decay(anchor, k)
            g = {n: g[n] + d[n] for n in g}
        u = {n: -_bc(lr, gn) * gn for n, gn in g.items()}
        rows = co.mix if q is not None else co.mix[:, -1:]
        sel = slice(None) if q is not None else slice(-1, None)
        delta_all, delta_last, s_last = {}, {}, {}
        for n, un in u.items():
            dn = torch.einsum("ntr,nr...->nt...", rows, un) + _bc(co.pa[:, sel], un) * delta0[n][:, None]
            if co.from_s0 is not None:
                dn = dn + _bc(co.from_s0[:, sel], un) * s0[n][:, None]
                s_last[n] = torch.einsum("nr,nr...->n...", co.dm_last, un) + _bc(co.pm_last, s0[n]) * s0[n]
            else:
                s_last[n] = un[:, -1]
            delta_all[n], delta_last[n] = dn, dn[:, -1]
        y = None
        if q is not None:
            y = self.read_per_token({n: base[n][:, None] + delta_all[n] for n in u}, q)
        return y, delta_last, s_last


class AnalyticEngine:
    """Chunks in closed form for memories with ``factors`` and ``compose`` (see memory/mlp.py)."""

    def __init__(self, template: nn.Module):
        if not all(hasattr(template, a) for a in ("factors", "compose")):
            raise ValueError(
                f"grad_impl='analytic' needs a memory with closed-form factors/compose "
                f"(ResidualMLPMemory, LinearMapMemory); {type(template).__name__} has none: use grad_impl='func'"
            )
        self.template = template

    def read(self, w: dict, x: torch.Tensor) -> torch.Tensor:
        """All tokens x (N, L, d) read with one set of weights per copy (N, ...)."""
        return self.template.compose(x, lambda n, inp: _apply(w[n], inp))

    def chunk(self, anchor, delta0, s0, base, k, v, lr, log_m, log_a, q=None, dgd=False):
        """One chunk: returns (read-out of q with per-token weights or None, D_L, S_L)."""
        co = chunk_coefficients(log_m, log_a)
        facs = {n: (-lr[..., None] * left, right) for n, (left, right) in self.template.factors(anchor, k, v, dgd).items()}
        delta_last, s_last = {}, {}
        for n, (left, right) in facs.items():
            dn = (left * co.mix[:, -1, :, None]).transpose(-1, -2) @ right + _bc(co.pa[:, -1], delta0[n]) * delta0[n]
            if co.from_s0 is not None:
                dn = dn + _bc(co.from_s0[:, -1], s0[n]) * s0[n]
                s_last[n] = (left * co.dm_last[..., None]).transpose(-1, -2) @ right + _bc(co.pm_last, s0[n]) * s0[n]
            else:
                s_last[n] = left[:, -1, :, None] * right[:, -1, None, :]
            delta_last[n] = dn
        y = None
        if q is not None:

            def linear(n, x):  # W_t x_t for every token t, without forming W_t
                left, right = facs[n]
                out = _apply(base[n], x) + co.pa[..., None] * _apply(delta0[n], x)
                if co.from_s0 is not None:
                    out = out + co.from_s0[..., None] * _apply(s0[n], x)
                return out + (co.mix * (x @ right.transpose(-1, -2))) @ left

            y = self.template.compose(q, linear)
        return y, delta_last, s_last


def make_engine(template: nn.Module, token_loss: Callable, grad_impl: str):
    """FuncEngine for "func", AnalyticEngine for "analytic"; "auto": analytic when the memory has
    the closed forms (the built-in memories), torch.func otherwise."""
    if grad_impl == "auto":
        grad_impl = "analytic" if all(hasattr(template, a) for a in ("factors", "compose")) else "func"
    return AnalyticEngine(template) if grad_impl == "analytic" else FuncEngine(template, token_loss)


def expand_params(template: nn.Module, batch: int, heads: int) -> dict:
    """Initial fast weights: the template's parameters repeated per (batch, head), (B, H, *shape)."""
    return {n: p.expand(batch, heads, *p.shape) for n, p in template.named_parameters()}


def flatten(tree: dict) -> dict:
    """(B, H, *shape) -> (B*H, *shape)."""
    return {n: t.reshape(-1, *t.shape[2:]) for n, t in tree.items()}


def unflatten(tree: dict, batch: int, heads: int) -> dict:
    """(B*H, *shape) -> (B, H, *shape)."""
    return {n: t.reshape(batch, heads, *t.shape[1:]) for n, t in tree.items()}


def reference_grads(anchor: dict, k: torch.Tensor, v: torch.Tensor, loss: Callable) -> dict:
    """Gradients of ``loss(anchor, k, v)`` (a sum over memory copies) w.r.t. the anchor, with plain autograd.

    The token-by-token references use this instead of ``torch.func.grad``, so the chunked paths are
    checked against an independent computation. The graph is kept (create_graph) whenever grad
    mode is on, so the result is differentiable w.r.t. everything the anchor and k, v depend on.
    """
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        # A fresh view is a node of its own: tensors already computed from the anchor (such as a
        # self-generated target) stay constants of the inner gradient, yet the outer graph is kept.
        leaves = {n: a.view_as(a) if (outer and a.requires_grad) else a.detach().requires_grad_() for n, a in anchor.items()}
        total = loss(leaves, k, v)
        grads = torch.autograd.grad(total, list(leaves.values()), create_graph=outer, allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(leaves, grads)}
