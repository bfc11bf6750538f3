"""Fast-weight machinery shared by NeuralMemory (Titans) and SelfModifyingTitans.

A fast-weight memory holds one copy W of a memory model's parameters per (batch row, head),
flattened here to a leading dimension N. Over a chunk of L tokens every token t contributes an
update direction u_t computed at the chunk-start weights W_anchor (so all L directions are one
``vmap``), and a scan with scalar per-token coefficients applies momentum m_t and decay a_t:

    S_t = m_t S_{t-1} + u_t,        W_t = a_t W_{t-1} + S_t.

The scan is solved in closed form with L x L matrices of decay products (no loop over tokens):
S_t = P^m_t S_0 + sum_{r<=t} D^m_tr u_r and W_t = P^a_t W_0 + (D^a P^m)_t S_0 + sum_r (D^a D^m)_tr u_r,
where D^x_ts = prod_{s<r<=t} x_r and P^x_t = prod_{r<=t} x_r. Without momentum S_t = u_t.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _bc(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a (N,) or (N, L) coefficient against a tensor with trailing parameter dims."""
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def scan(w0: dict, s0: dict, u: dict, log_m: torch.Tensor | None, log_a: torch.Tensor, per_token: bool):
    """Apply S_t = m_t S_{t-1} + u_t, W_t = a_t W_{t-1} + S_t over one piece of L tokens.

    Args:
        w0, s0: name -> (N, *shape) weights and momentum before the piece.
        u: name -> (N, L, *shape) update directions.
        log_m: (N, L) log-momentum coefficients, or None for no momentum (S_t = u_t).
        log_a: (N, L) log-decay coefficients (0 = no decay).
        per_token: also return the weights after every token, name -> (N, L, *shape).

    Returns:
        (w_all or None, w_L, s_L).
    """
    da, pa = decay_products(log_a)
    if log_m is None:
        mix, from_s0 = da, torch.zeros_like(pa)
    else:
        dm, pm = decay_products(log_m)
        mix = da @ dm  # (N, L, L)
        from_s0 = (da @ pm[..., None])[..., 0]  # (N, L)
    rows = mix if per_token else mix[:, -1:]
    w_all, w_last, s_last = {}, {}, {}
    for name, un in u.items():
        w = torch.einsum("ntr,nr...->nt...", rows, un)
        sel = slice(None) if per_token else slice(-1, None)
        w = w + _bc(pa[:, sel], w) * w0[name][:, None] + _bc(from_s0[:, sel], w) * s0[name][:, None]
        if per_token:
            w_all[name] = w
        w_last[name] = w[:, -1]
        if log_m is None:
            s_last[name] = un[:, -1]
        else:
            s_last[name] = torch.einsum("nr,nr...->n...", dm[:, -1], un) + _bc(pm[:, -1], s0[name]) * s0[name]
    return (w_all if per_token else None), w_last, s_last


class FastWeightFunctions:
    """Batched functional forms of a memory model, built once (titans-pytorch style).

    Args:
        template: the memory model (its parameters give names and shapes; values are substituted).
        token_loss: ``loss(params, k, v) -> scalar`` for one token and one memory copy.

    Attributes:
        token_grads(anchor (N, ...), k (N, L, d), v (N, L, d)) -> name -> (N, L, ...): the gradient
            of every token's loss at the anchor weights of its memory copy.
        read_per_token(w (N, L, ...), x (N, L, d)) -> (N, L, d): token t read with its own weights.
        read(w (N, ...), x (N, L, d)) -> (N, L, d): all tokens read with one set of weights.
    """

    def __init__(self, template: nn.Module, token_loss: Callable):
        def call(params, x):
            return functional_call(template, params, (x,))

        self.token_grads = vmap(vmap(grad(token_loss), in_dims=(None, 0, 0)), in_dims=(0, 0, 0))
        self.read_per_token = vmap(vmap(call))
        self.read = vmap(call)


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
