"""The hebbian memory of a long sequence as segments that run side by side (exact).

For the hebbian rule (gated linear attention) the memory at the end of a segment is affine in the
memory before it, with one scalar factor per head:

    M_end(s) = A_s M_end(s-1) + M_loc(s),      A_s = prod_{t in s} a_t,
    y_t      = y_loc_t + (prod_{u in s, u <= t} a_u) M_end(s-1) q_t      (t in segment s),

where ``y_loc`` and ``M_loc(s)`` are the segment's outputs and memory from a zero memory. So one call
of a chunked kernel on ``B * S`` sequences of length ``T / S``, a scan over the ``S`` segment states
and one batched product give the same result as the call on the whole sequence, up to float
rounding. Why: fla's chunked kernels run the state recurrence across chunks with one program per
(sequence, head, value block); at batch 1, T = 64K and 8 heads that is 8 programs walking 1,024
chunks in turn on a GPU of 132 SMs, and the same tokens as 32 segments of 2K are 256 programs
walking 32 chunks each. The delta rules have no such cheap correction (a segment's transition is a
``dk x dk`` matrix product over its tokens, as costly as the segment itself), so they are not cut.

Example (``op`` any chunked hebbian op in the (B, T, H, D) layout; here the token-by-token one):
    >>> import torch
    >>> from nl_layers.ops.linear_memory.naive import recurrent
    >>> def op(q, k, v, g, m0):  # (B, T, H, D) <-> the reference's (B, H, T, D)
    ...     t = lambda x: None if x is None else x.transpose(1, 2)
    ...     y, m = recurrent(t(q), t(k), t(v), torch.ones_like(g.transpose(1, 2)), t(g), m0, delta=False)
    ...     return y.transpose(1, 2), m
    >>> q, k, v = (torch.randn(1, 40, 2, 4, dtype=torch.float64) for _ in range(3))
    >>> g = -torch.rand(1, 40, 2, dtype=torch.float64)
    >>> y, m = segmented(op, q, k, v, g, None, segments=4, multiple=8)
    >>> y0, m0 = op(q, k, v, g, None)
    >>> torch.allclose(y, y0) and torch.allclose(m, m0)
    True
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["MIN_SEGMENT", "segment_count", "segmented"]

#: shortest segment worth a program of its own (fla's chunk is 64 tokens: 32 chunks)
MIN_SEGMENT = 2048


def segment_count(batch: int, length: int, heads: int, device: torch.device) -> int:
    """How many segments each sequence is cut into on ``device`` (1: none): a power of two, the
    fewest that give at least two (sequence, head) programs per SM, with segments of at least
    ``MIN_SEGMENT`` tokens; 1 on the CPU and wherever ``batch * heads`` already fills the SMs."""
    if device.type != "cuda" or length < 2 * MIN_SEGMENT:
        return 1
    sms = _sm_count(device)
    count = 1
    while batch * heads * count < 2 * sms and length // (2 * count) >= MIN_SEGMENT:
        count *= 2
    return count


def _sm_count(device: torch.device) -> int:
    """The SMs of a CUDA device (both calls fold to constants under torch.compile)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def segmented(op: Callable, q, k, v, log_decay, initial_state, *, segments: int, multiple: int = 64):
    """The hebbian memory by ``op`` on ``segments`` segments of each sequence (module doc).

    Args:
        op: ``op(q, k, v, log_decay, initial_state) -> (y, M_T)``, the hebbian memory with the step
            folded into v (``b_t v_t``), in the (B, T, H, D) layout, M_T (B, H, dv, dk) in float32
            or wider; it is called once on ``B * segments`` sequences with no initial state.
        q, k: (B, T, H, dk); v: (B, T, H, dv) (already times the step); log_decay: (B, T, H) or None.
        initial_state: M_0 (B, H, dv, dk) or None.
        segments: the number of segments (``segment_count``); multiple: each segment's length is
            rounded up to it (the kernel's chunk); the last segment is padded with tokens that write
            nothing and do not decay (k = v = 0, log_decay = 0), cut from ``y`` again.

    Returns:
        (y, M_T): y (B, T, H, dv) in q's dtype; M_T (B, H, dv, dk) in float32 (float64 for float64 q).
    """
    bsz, t, h, dk = k.shape
    dv = v.shape[-1]
    length = -(-t // segments)
    length = -(-length // multiple) * multiple
    pad = length * segments - t
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        log_decay = F.pad(log_decay, (0, 0, 0, pad)) if log_decay is not None else None

    def cut(x):
        return x.reshape(bsz * segments, length, *x.shape[2:])

    y, local = op(cut(q), cut(k), cut(v), cut(log_decay) if log_decay is not None else None, None)
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    local = local.to(wide).reshape(bsz, segments, h, dv, dk)
    m = initial_state.to(wide) if initial_state is not None else local.new_zeros(bsz, h, dv, dk)
    if log_decay is not None:
        within = log_decay.to(wide).reshape(bsz, segments, length, h).cumsum(2)  # log prod_{u <= t} a_u
        total = within[:, :, -1].exp()  # A_s: (B, S, H)
    starts = []
    for s in range(segments):  # the scan over the segments' memories (S small: tens)
        starts.append(m)
        m = (total[:, s, :, None, None] * m if log_decay is not None else m) + local[:, s]
    start = torch.stack(starts, 1)  # M_end(s - 1): (B, S, H, dv, dk)
    carry = torch.einsum("bshvk,bslhk->bslhv", start, q.to(wide).reshape(bsz, segments, length, h, dk))
    if log_decay is not None:
        carry = carry * within.exp()[..., None]
    out = y.to(wide).reshape(bsz, segments, length, h, dv) + carry
    return out.reshape(bsz, segments * length, h, dv)[:, :t].to(q.dtype), m
