"""Fast-weight state helpers shared by NeuralMemory (Titans) and SelfModifyingTitans.

A fast-weight memory holds one copy of a memory model's parameters per (batch row, head); the
layers keep them as dicts name -> (B, H, *shape) in their states and flatten them to (B*H, *shape)
for the computation (nl_layers/ops/fast_weights). This module splits a call into gradient-anchor
segments and holds the pieces of the token-by-token references: gradients by plain autograd and
one step of the update rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..ops.fast_weights.scan import bc
from ..ops.fast_weights.step import inner_step


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


def segments(length: int, anchor_size: int | None, position: int):
    """Split ``length`` tokens starting at absolute ``position`` into anchor segments.

    Segments end at multiples of ``anchor_size`` (absolute positions, so streaming is exact);
    ``anchor_size=None`` is one segment that never re-anchors. Yields (start, end, re-anchor after).
    """
    if anchor_size is None:
        return iter([(0, length, False)])
    return pieces(length, anchor_size, position % anchor_size)


def expand_params(template: nn.Module, batch: int, heads: int) -> dict:
    """Initial fast weights: the template's parameters repeated per (batch, head), (B, H, *shape)."""
    return {n: p.expand(batch, heads, *p.shape) for n, p in template.named_parameters()}


def shared_params(template: nn.Module) -> dict:
    """The template's parameters as one weight per name for every copy, (*shape): what
    :func:`expand_params` repeats. The analytic engines take such weights as they are (a plain
    matrix product for all copies at once, and gradients without a per-copy intermediate)."""
    return dict(template.named_parameters())


def flatten(tree: dict) -> dict:
    """(B, H, *shape) -> (B*H, *shape)."""
    return {n: t.reshape(-1, *t.shape[2:]) for n, t in tree.items()}


def unflatten(tree: dict, batch: int, heads: int) -> dict:
    """(B*H, *shape) -> (B, H, *shape)."""
    return {n: t.reshape(batch, heads, *t.shape[1:]) for n, t in tree.items()}


def reference_grads(anchor: dict, k: torch.Tensor, v: torch.Tensor, loss: Callable) -> dict:
    """Gradients of ``loss(anchor, k, v)`` (a sum over memory copies) w.r.t. the anchor, with plain autograd."""
    return reference_grads_and_losses(anchor, k, v, loss)[0]


def reference_grads_and_losses(anchor: dict, k: torch.Tensor, v: torch.Tensor, loss: Callable):
    """Gradients of ``loss(anchor, k, v)`` (a scalar, or per-copy losses (N,), summed) w.r.t. the anchor
    with plain autograd, and the losses.

    The token-by-token references use this instead of ``torch.func.grad``, so the parallel paths are
    checked against an independent computation. The graph is kept (create_graph) whenever grad
    mode is on, so the result is differentiable w.r.t. everything the anchor and k, v depend on.
    """
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        # A fresh view is a node of its own: tensors already computed from the anchor (such as a
        # self-generated target) stay constants of the inner gradient, yet the outer graph is kept.
        leaves = {n: a.view_as(a) if (outer and a.requires_grad) else a.detach().requires_grad_() for n, a in anchor.items()}
        losses = loss(leaves, k, v)
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()), create_graph=outer, allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(leaves, grads)}, losses


def reference_step(w, s, base, g, r_sq, lr, log_m, log_a, error_clip):
    """One token of the rule for every copy: c = inner_step(...), S <- m S - c g, W <- W_0 + a (W - W_0) + S.

    g: name -> (N, *shape) gradient at the anchor; r_sq, lr, log_a (N,); log_m (N,) or None.
    """
    g_sq = sum(t.flatten(1).square().sum(-1) for t in g.values())
    c = inner_step(lr, g_sq, r_sq, error_clip)
    new_s = {n: -bc(c, g[n]) * g[n] + (0 if log_m is None else bc(log_m.exp(), s[n]) * s[n]) for n in w}
    new_w = {n: base[n] + bc(log_a.exp(), w[n]) * (w[n] - base[n]) + new_s[n] for n in w}
    return new_w, new_s
