"""The in-context CMS's chunk step and capped step for plain MLP blocks, in closed form.

For a block ``f(u) = W2 act(W1 u + b1) + b2`` (:class:`~nl_layers.cms.MLPBlock` of ``nn.Linear``
layers, a known activation, no active dropout) with per-sequence weights, a chunk's pair loss
``1/2 sum_t ||u_{t-1} + f(u_{t-1}) - u_t||^2`` has the gradient, with ``z = W1 u + b1``,
``a = act(z)`` and the residuals ``r_t = u_{t-1} + f(u_{t-1}) - u_t``:

    dW2 = sum_t r_t a_t^T,   db2 = sum_t r_t,   d_t = (W2^T r_t) * act'(z_t),
    dW1 = sum_t d_t u_{t-1}^T,   db1 = sum_t d_t,

and the product of the pairs' Jacobian with a direction ``g`` (the capped step's ``J g``) is

    J g = gW2 a + gb2 + W2 (act'(z) * (gW1 u + gb1)).

Each is a few batched matrix products over the sequences, the same numbers as the generic path's
``torch.func.grad`` / ``jvp`` over ``functional_call`` (:mod:`nl_layers.cms_in_context`) to float
rounding, without its per-chunk transforms (a test compares the two in float64, outputs and
gradients with respect to the inputs and the block's parameters). Any other block takes the
generic path.

Example:
    >>> import torch
    >>> from nl_layers.cms import MLPBlock
    >>> blk = MLPBlock.build(4, 8, activation="silu")
    >>> derivative(blk) is not None, derivative(MLPBlock.build(4, 8, activation=lambda z: z.sin()))
    (True, None)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["derivative", "chunk_step", "directional"]


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0)))) + z * torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


_DERIVATIVES: dict[Callable, Callable[[torch.Tensor], torch.Tensor]] = {
    F.gelu: _gelu_grad,
    F.silu: _silu_grad,
    F.relu: lambda z: (z > 0).to(z.dtype),
    torch.tanh: lambda z: 1.0 - torch.tanh(z).square(),
}


def derivative(block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``act'`` where ``block`` is a plain MLP block this module computes in closed form, else None."""
    from .cms import MLPBlock

    if type(block) is not MLPBlock or type(block.fc1) is not nn.Linear or type(block.fc2) is not nn.Linear:
        return None
    drop = block.dropout
    if not (isinstance(drop, nn.Dropout) and (drop.p == 0 or not drop.training)):
        return None
    return _DERIVATIVES.get(block.act)


def _hidden(w: dict, u: torch.Tensor) -> torch.Tensor:
    """``z = W1 u + b1`` for per-sequence weights ``w`` (B, ...) and inputs ``u`` (B, L, d)."""
    b1 = w.get("fc1.bias")
    return u @ w["fc1.weight"].mT if b1 is None else torch.baddbmm(b1.unsqueeze(1), u, w["fc1.weight"].mT)


def _forward(block, w: dict, u: torch.Tensor):
    """(z, a, f(u)) for per-sequence weights ``w`` (B, ...) and inputs ``u`` (B, L, d)."""
    b2 = w.get("fc2.bias")
    z = _hidden(w, u)
    a = block.act(z)
    out = a @ w["fc2.weight"].mT if b2 is None else torch.baddbmm(b2.unsqueeze(1), a, w["fc2.weight"].mT)
    return z, a, out


def chunk_step(block, act_grad, w: dict, prev, seg: torch.Tensor):
    """The generic ``_chunk_step`` of :mod:`nl_layers.cms_in_context` in closed form: (the chunk's
    outputs (B, L, d), the gradient of its summed pair losses per weight, the pairs' inputs)."""
    first = prev if prev is not None else seg[:, 0]
    seq = torch.cat([first[:, None], seg], dim=1)
    skip = 1 if prev is None else 0  # the first token of a sequence has no predecessor
    z, a, out = _forward(block, w, seq)
    keys = seq[:, skip:-1]
    r = (keys + out[:, skip:-1] - seg[:, skip:])  # (B, pairs, d)
    zk, ak = z[:, skip:-1], a[:, skip:-1]
    d = (r @ w["fc2.weight"]) * act_grad(zk)  # (B, pairs, hidden)
    grads = {"fc1.weight": d.mT @ keys, "fc2.weight": r.mT @ ak}
    if "fc1.bias" in w:
        grads["fc1.bias"] = d.sum(1)
    if "fc2.bias" in w:
        grads["fc2.bias"] = r.sum(1)
    return out[:, 1:], grads, keys


def directional(block, act_grad, w: dict, g: dict, keys: torch.Tensor) -> torch.Tensor:
    """``J g``: the derivative of ``f(keys)`` (B, n, d) along the weight direction ``g`` at ``w``."""
    z = _hidden(w, keys)
    dz = keys @ g["fc1.weight"].mT
    if "fc1.bias" in g:
        dz = dz + g["fc1.bias"].unsqueeze(1)
    out = block.act(z) @ g["fc2.weight"].mT + (act_grad(z) * dz) @ w["fc2.weight"].mT
    if "fc2.bias" in g:
        out = out + g["fc2.bias"].unsqueeze(1)
    return out
