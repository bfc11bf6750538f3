"""Argument checks of the linear-memory ops: clear errors that name the parameter.

Two layouts: ``"bhtd"`` (batch, heads, time, dim), the public default, and ``"bthd"``
(batch, time, heads, dim), the layout of a projection output and of flash-linear-attention.
Step sizes and log-decays are (batch, heads, time) or (batch, time, heads) to match; the memory
state is always (batch, heads, dv, dk).

Example:
    >>> q = torch.randn(2, 3, 5, 4)
    >>> check_inputs(q, q, torch.randn(2, 3, 5, 6), 1.0, None, None, "bhtd")
    (2, 3, 5, 4, 6)
"""

from __future__ import annotations

import torch

__all__ = ["LAYOUTS", "check_inputs"]

LAYOUTS = ("bhtd", "bthd")
_NAMES = {"bhtd": "(batch, heads, time, dim)", "bthd": "(batch, time, heads, dim)"}


def check_inputs(q, k, v, lr, log_decay, initial_state, layout: str):
    """Check shapes and dtypes; return (batch, heads, time, dk, dv)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor {_NAMES[layout]}, got {getattr(t, 'shape', t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must share its first three dims with k: {tuple(v.shape)} vs {tuple(k.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if layout == "bhtd":
        b, h, t, dk = k.shape
    else:
        b, t, h, dk = k.shape
    dv = v.shape[-1]
    gate_shape = tuple(k.shape[:3])
    for name, g in (("lr", lr), ("log_decay", log_decay)):
        if isinstance(g, torch.Tensor) and tuple(g.shape) != gate_shape:
            raise ValueError(f"{name} must be a float or a tensor of shape {gate_shape}, got {tuple(g.shape)}")
    if isinstance(lr, torch.Tensor) and not lr.is_floating_point():
        raise TypeError(f"lr must be a float or a floating-point tensor, got {lr.dtype}")
    if not isinstance(lr, torch.Tensor) and not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a float or a tensor of shape {gate_shape}, got {type(lr).__name__}")
    if log_decay is not None and not isinstance(log_decay, torch.Tensor):
        raise TypeError(f"log_decay must be None or a tensor of log-gates (<= 0) of shape {gate_shape}")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, dv, dk):
        raise ValueError(f"initial_state must have shape {(b, h, dv, dk)}, got {tuple(initial_state.shape)}")
    return b, h, t, dk, dv
