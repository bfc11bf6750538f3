"""Linear associative memory ops: gated linear attention, Gated DeltaNet and Longhorn (DGD).

The memory is a matrix M in R^{dv x dk} per head. Each token writes a key/value pair and reads
y_t = M_t q_t after its own write. With a decay a_t = exp(log_decay_t) in (0, 1] and a step b_t > 0:

    hebbian:  M_t = a_t M_{t-1} + b_t v_t k_t^T                           (gated linear attention)
    delta:    M_t = a_t M_{t-1} + b_t (v_t - a_t M_{t-1} k_t) k_t^T       (Gated DeltaNet)
            = M_{t-1} a_t (I - b_t k_t k_t^T) + b_t v_t k_t^T
    dgd:      the delta rule with b_t -> c_t = b_t / (1 + b_t ||k_t||^2)   (Longhorn: the closed-form
              step on 1/2||M k - v||^2 + 1/(2 b)||M - a M_{t-1}||^2)

The delta rules are Gated DeltaNet's (Yang et al. 2024): decay first, then the delta step on the
decayed memory. That is the rule a library kernel computes exactly (flash-linear-attention's
``chunk_gated_delta_rule``), so the GPU path and the torch forms give the same numbers.

Three implementations that agree to rounding, outputs and every gradient:
``linear_memory_recurrent`` (token by token, the reference), and ``linear_memory_chunked`` with
``impl="torch"`` (pure torch, chunks in parallel, one matmul per chunk in the sequential loop) or
``impl="fla"`` (flash-linear-attention's Triton kernels: CUDA, float16/bfloat16; on Hopper GPUs
with Triton < 3.7.1 one step of the gated backward in torch, see ``fla_gated``; the delta rules on
long sequences at small batch cut into segments side by side, exactly, see ``fla_split``);
``impl="auto"`` takes fla where it applies and torch elsewhere.

References: Katharopoulos et al. 2020 (linear attention); Yang et al. 2024 (DeltaNet, Gated
DeltaNet); Liu et al. 2024 (Longhorn); Behrouz et al. 2025 (Nested Learning, section 5).

Example:
    >>> import torch.nn.functional as F
    >>> q = k = F.normalize(torch.randn(1, 2, 63, 8), dim=-1); v = torch.randn(1, 2, 63, 8)
    >>> y1, m1 = linear_memory_chunked(q, k, v, rule="delta", lr=0.5, chunk_size=16)
    >>> y2, m2 = linear_memory_recurrent(q, k, v, rule="delta", lr=0.5)
    >>> bool(torch.allclose(y1, y2, atol=1e-5)) and bool(torch.allclose(m1, m2, atol=1e-5))
    True
"""

from __future__ import annotations

import torch

from ..._checks import check_choice, check_positive_int
from . import fla as _fla
from .chunked import chunked as _chunked_torch
from .naive import recurrent as _recurrent
from .rules import RULES, is_delta, step_sizes
from .validate import LAYOUTS, check_inputs

__all__ = ["IMPLS", "LAYOUTS", "RULES", "linear_memory_chunked", "linear_memory_recurrent", "resolve_impl"]

IMPLS = ("auto", "torch", "fla")


def _swap(*tensors):
    """Views with dims 1 and 2 (heads and time) swapped; floats and None pass through."""
    return [t.transpose(1, 2) if isinstance(t, torch.Tensor) else t for t in tensors]


def linear_memory_recurrent(
    q, k, v, *, rule="delta", lr=1.0, log_decay=None, initial_state=None, layout="bhtd"
):
    """Token-by-token reference of the linear memory rules (in q's dtype).

    Args:
        q, k: (B, H, T, dk); v: (B, H, T, dv) (``layout="bthd"``: (B, T, H, D)).
        rule: "hebbian", "delta" or "dgd".
        lr: step size b_t, a float or a (B, H, T) tensor ((B, T, H) for "bthd").
        log_decay: None (a_t = 1) or a tensor of log a_t <= 0, shaped like a tensor lr.
        initial_state: M_0 of shape (B, H, dv, dk); zeros when None.
        layout: "bhtd" or "bthd", the layout of q, k, v, lr, log_decay and of y.

    Returns:
        (y, M_T): y (B, H, T, dv) (or (B, T, H, dv)) with y_t = M_t q_t, and the final memory.

    Example:
        >>> q = k = torch.randn(1, 2, 5, 4); v = torch.randn(1, 2, 5, 3)
        >>> y, m = linear_memory_recurrent(q, k, v, rule="hebbian")
        >>> y.shape, m.shape
        (torch.Size([1, 2, 5, 3]), torch.Size([1, 2, 3, 4]))
    """
    check_choice(rule, "rule", RULES)
    check_choice(layout, "layout", LAYOUTS)
    check_inputs(q, k, v, lr, log_decay, initial_state, layout)
    if layout == "bthd":
        q, k, v, lr, log_decay = _swap(q, k, v, lr, log_decay)
    b = step_sizes(rule, k, lr, q.dtype)
    y, m = _recurrent(q, k, v, b, log_decay, initial_state, delta=is_delta(rule))
    return (y.transpose(1, 2) if layout == "bthd" else y), m


def resolve_impl(impl: str, k: torch.Tensor, rule: str, dv: int | None = None) -> str:
    """The implementation ``linear_memory_chunked`` runs: "torch" or "fla".

    "auto" is fla when it is installed and applies (CUDA, float16/bfloat16, head dims in range:
    see ``nl_layers.ops.linear_memory.fla``), else torch; "fla" raises a RuntimeError naming the
    fix when it cannot run. ``dv`` is the value head dim (default: k's).

    Example:
        >>> resolve_impl("auto", torch.zeros(1, 1, 4, 8), "delta")   # CPU tensors
        'torch'
    """
    check_choice(impl, "impl", IMPLS)
    if impl == "torch":
        return "torch"
    reason = _fla.unsupported(k, k.shape[-1] if dv is None else dv, delta=is_delta(rule))
    if reason is None:
        return "fla"
    if impl == "fla":
        raise RuntimeError(f'impl="fla" cannot run: {reason}; or pass impl="auto"/"torch" for the pure-torch path')
    return "torch"


def linear_memory_chunked(
    q, k, v, *, rule="delta", lr=1.0, log_decay=None, chunk_size=64, initial_state=None, impl="auto",
    layout="bhtd",
):
    """Chunked parallel form of :func:`linear_memory_recurrent` (same arguments, same results).

    Args:
        chunk_size: chunk length of the torch path (fla uses its own chunks of 64).
        impl: "auto" (fla where it applies, else torch), "torch" or "fla" (see :func:`resolve_impl`).
        Others as :func:`linear_memory_recurrent`.

    Any length T works. The torch path computes in float32 (float64 for float64 inputs) and casts
    the results back to q's dtype; the fla path takes float16/bfloat16 on CUDA and also returns
    q's dtype. Gradients flow to q, k, v, a tensor lr, log_decay and initial_state.

    Example:
        >>> q = k = torch.nn.functional.normalize(torch.randn(2, 3, 100, 16), dim=-1)
        >>> y, m = linear_memory_chunked(q, k, torch.randn(2, 3, 100, 8), rule="dgd", impl="torch")
        >>> y.shape, m.shape
        (torch.Size([2, 3, 100, 8]), torch.Size([2, 3, 8, 16]))
    """
    check_choice(rule, "rule", RULES)
    check_positive_int(chunk_size, "chunk_size")
    check_choice(layout, "layout", LAYOUTS)
    check_inputs(q, k, v, lr, log_decay, initial_state, layout)
    delta = is_delta(rule)
    if resolve_impl(impl, k, rule, v.shape[-1]) == "fla":  # fla's layout is (B, T, H, D)
        if layout == "bhtd":
            q, k, v, lr, log_decay = _swap(q, k, v, lr, log_decay)
        b = step_sizes(rule, k, lr, torch.float32)
        y, m = _fla.chunked(q, k, v, b, log_decay, initial_state, delta=delta)
        return (y.transpose(1, 2) if layout == "bhtd" else y), m
    if layout == "bthd":  # the torch path's layout is (B, H, T, D)
        q, k, v, lr, log_decay = _swap(q, k, v, lr, log_decay)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    b = step_sizes(rule, k, lr, dtype)
    y, m = _chunked_torch(q, k, v, b, log_decay, initial_state, delta=delta, chunk_size=chunk_size)
    return (y.transpose(1, 2) if layout == "bthd" else y), m
