"""Pure-torch references of the fused kernels, one tensor (row) at a time, float32 math.

Each function does what its kernel in :mod:`deepopt.kernels.triton_kernels` does to one row,
with the same per-row scalars, and updates its tensors in place (results cast back to their
storage dtype). Tests check kernel == reference (outputs and state) and reference == the chain's
foreach path, so the kernels agree with the level definitions in :mod:`deepopt.levels`.

Notation: ``decay = 1 - lr wd`` (decoupled decay) or 1; ``coupled`` adds ``wd p`` to the gradient.

Example:
    >>> import torch
    >>> from deepopt.kernels import reference as ref
    >>> p, g, buf = torch.ones(3), torch.ones(3), torch.zeros(3)
    >>> ref.momentum(p, g, buf, None, first=True, a=0.9, c_g=1.0, lr=0.1, decay=1.0, wd=0.0)
    >>> p
    tensor([0.9000, 0.9000, 0.9000])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["momentum", "apply", "adam", "precond_momentum", "delta", "m3_write", "m3_read", "deep", "tanh"]


def _f(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32)


def _grad(p: Tensor, g: Tensor, wd: float, coupled: bool) -> Tensor:
    return _f(g) + wd * _f(p) if coupled else _f(g)


def _step(p: Tensor, d: Tensor, lr: float, decay: float) -> None:
    p.copy_(_f(p) * decay - lr * d)


def tanh(x: Tensor) -> Tensor:
    """tanh as the kernels compute it (through exp, stable for large |x|)."""
    t = torch.exp(-2.0 * x.abs())
    y = (1.0 - t) / (1.0 + t)
    return torch.where(x < 0, -y, y)


def momentum(p: Tensor, g: Tensor, buf: Tensor, out: Tensor | None, *, first: bool, a: float, c_g: float,
             lr: float, decay: float, wd: float, ema: bool = False, nesterov: bool = False,
             coupled: bool = False) -> None:
    """sgd: buf = g (first) or a buf + c_g g; ema: buf = buf + c_g (g - buf). d = buf, or the
    look-ahead g + a buf (sgd) / g + a (buf - g) (ema). p = decay p - lr d, or out = d."""
    x = _grad(p, g, wd, coupled)
    b = _f(buf)
    if ema:
        new = b + c_g * (x - b)
        d = x + a * (new - x) if nesterov else new
    else:
        new = x.clone() if first else a * b + c_g * x
        d = x + a * new if nesterov else new
    buf.copy_(new)
    if out is not None:
        out.copy_(d)
    else:
        _step(p, d, lr, decay)


def apply(p: Tensor, o: Tensor, *, alpha: float, decay: float) -> None:
    """p = decay p - alpha o."""
    p.copy_(_f(p) * decay - alpha * _f(o))


def adam(p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, s1: float, s2: float, c_m: float, c_g: float,
         c_v: float, c_g2: float, eps: float, decay: float, wd: float, coupled: bool = False) -> None:
    """m = c_m m + c_g g; v = c_v v + c_g2 g^2; p = decay p - s1 m / (sqrt(v) s2 + eps)."""
    x = _grad(p, g, wd, coupled)
    nm = c_m * _f(m) + c_g * x
    nv = c_v * _f(v) + c_g2 * x * x
    m.copy_(nm)
    v.copy_(nv)
    p.copy_(_f(p) * decay - s1 * nm / (nv.sqrt() * s2 + eps))


def precond_momentum(p: Tensor, g: Tensor, v: Tensor, buf: Tensor, acc: Tensor | None, *, first: bool,
                     boundary: bool, inv_chunk: float, den_scale: float, b2: float, eps: float, a: float,
                     c_g: float, lr: float, decay: float, wd: float, nesterov: bool = False,
                     coupled: bool = False) -> None:
    """v <- b2 v + (1 - b2) g^2 (periodic: through acc, at boundaries with acc/chunk);
    x = g / (sqrt(v) den_scale + eps); buf = x (first) or a buf + c_g x; p = decay p - lr read."""
    x = _grad(p, g, wd, coupled)
    nv = _f(v)
    if acc is not None:
        s = _f(acc) + x * x
        if boundary:
            nv = b2 * nv + (1.0 - b2) * (s * inv_chunk)
            s = torch.zeros_like(s)
        acc.copy_(s)
    else:
        nv = b2 * nv + (1.0 - b2) * x * x
    v.copy_(nv)
    y = x / (nv.sqrt() * den_scale + eps)
    new = y if first else a * _f(buf) + c_g * y
    buf.copy_(new)
    _step(p, y + a * new if nesterov else new, lr, decay)


def delta(p: Tensor, g: Tensor, buf: Tensor, f: Tensor | None, *, first: bool, a: float, lam: float, lr: float,
          decay: float, wd: float, nesterov: bool = False, coupled: bool = False) -> None:
    """buf = g (first) or a buf - lam F/||g||^2 + g with F = <buf, g> g (vectors, ``f`` None) or
    ``f`` (matrices: buf G^T G); p = decay p - lr read."""
    x = _grad(p, g, wd, coupled)
    b = _f(buf)
    if first:
        new = x.clone()
    else:
        sq = float((x * x).sum())
        coef = lam * (float((b * x).sum()) if f is None else 1.0) / sq if sq > 0 else 0.0
        new = a * b - coef * (x if f is None else _f(f)) + x
    buf.copy_(new)
    _step(p, x + a * new if nesterov else new, lr, decay)


def m3_write(p: Tensor, g: Tensor, v: Tensor, ms: Sequence[Tensor], accs: Sequence[Tensor | None], *,
             den_scale: float, levels: Sequence[tuple[float, float, bool, float]], c_v: float, c_g2: float,
             eps: float, lr: float, decay: float, wd: float, step: bool, coupled: bool = False) -> None:
    """v = c_v v + c_g2 g^2; level i with (c_m, c_g, boundary, w): fast m = c_m m + c_g g, slow
    acc += g and at a boundary m = c_m m + c_g acc, acc = 0. ``step``: p = decay p - lr sum w m / den."""
    x = _grad(p, g, wd, coupled)
    nv = c_v * _f(v) + c_g2 * x * x
    v.copy_(nv)
    num = torch.zeros_like(x)
    for m, acc, (c_m, c_g, hit, w) in zip(ms, accs, levels):
        nm = _f(m)
        if acc is None:
            nm = c_m * nm + c_g * x
        else:
            s = _f(acc) + x
            if hit:
                nm = c_m * nm + c_g * s
                s = torch.zeros_like(s)
            acc.copy_(s)
        m.copy_(nm)
        num = num + w * nm
    if step:
        _step(p, num / (nv.sqrt() * den_scale + eps), lr, decay)


def m3_read(p: Tensor, v: Tensor, os: Sequence[Tensor], *, den_scale: float, weights: Sequence[float],
            eps: float, lr: float, decay: float, target: float | None) -> None:
    """d = sum w_i O_i / (sqrt(v) den_scale + eps), scaled to RMS ``target``; p = decay p - lr d."""
    num = sum(w * _f(o) for w, o in zip(weights, os))
    d = num / (_f(v).sqrt() * den_scale + eps)
    if target is not None:
        d = d * (target / (float(d.square().mean().sqrt()) + 1e-30))
    _step(p, d, lr, decay)


def deep(p: Tensor, g: Tensor, bias: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, out: Tensor | None, *,
         a: float, eta: float, lr: float, decay: float, wd: float, sign: bool = False,
         coupled: bool = False) -> None:
    """Deep momentum (see :mod:`deepopt.levels.deep`): with k = u/rms(u), h_j = tanh(w1_j k + b1_j),
    bias = a bias + u, w2 = a w2 + eta mean(u h), w1 += eta w2 mean(u (1-h^2) k),
    b1 += eta w2 mean(u (1-h^2)); read m = bias + tanh(w1 k + b1) @ w2 (new memory);
    p = decay p - lr sigma(m), or out = m."""
    u = _grad(p, g, wd, coupled).reshape(-1)
    n = u.numel()
    k = u / (float((u * u).sum() / n) ** 0.5 + 1e-30)
    fw1, fb1, fw2 = _f(w1), _f(b1), _f(w2)
    nb = a * _f(bias).reshape(-1) + u
    if eta != 0:
        h = tanh(k[:, None] * fw1 + fb1)
        dh = u[:, None] * (1 - h * h)
        nw2 = a * fw2 + eta * (u[:, None] * h).sum(0) / n
        nw1 = fw1 + eta * fw2 * (dh * k[:, None]).sum(0) / n
        nb1 = fb1 + eta * fw2 * dh.sum(0) / n
    else:
        nw1, nb1, nw2 = fw1, fb1, a * fw2
    bias.copy_(nb.reshape(bias.shape))
    w1.copy_(nw1)
    b1.copy_(nb1)
    w2.copy_(nw2)
    d = nb + tanh(k[:, None] * nw1 + nb1) @ nw2
    if sign:
        d = d.sign()
    if out is not None:
        out.copy_(d.reshape(out.shape))
    else:
        _step(p, d.reshape(p.shape), lr, decay)


def bias_correction(beta: float, t: int) -> float:
    """``1 - beta^t`` (1 for t = 0 is never used: callers skip levels without writes)."""
    return 1.0 - math.pow(beta, t)
