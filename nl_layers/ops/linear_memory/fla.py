"""The linear memory on flash-linear-attention's Triton kernels (``pip install -e ".[kernels]"``, CUDA).

Our parameters map exactly onto fla-core's chunked ops, in fla's layout (B, T, H, D), with the
memory kept value-first (``state_v_first=True``: fla's [N, H, V, K] state is our (B, H, dv, dk) M):

    hebbian  M_t = a_t M_{t-1} + b_t v_t k_t^T, y_t = M_t q_t
             -> chunk_simple_gla(q, k, b*v, g=log_decay (None without decay), scale=1.0, ...)
    delta    M_t = a_t M_{t-1} + b_t (v_t - a_t M_{t-1} k_t) k_t^T, y_t = M_t q_t
             -> chunk_gated_delta_rule(q, k, v, g=log_decay, beta=b, scale=1.0, ...)
             -> without decay: chunk_delta_rule(q, k, v, beta=b, scale=1.0, initial_state=M_0^T, ...)
    dgd      the delta rule with beta = c_t = b_t / (1 + b_t ||k_t||^2)  (same kernels)

all with ``output_final_state=True``; the gated ones with ``initial_state=M_0, state_v_first=True``,
``chunk_delta_rule`` (no gate, no value-first state) with the state transposed in and out (its
[N, H, K, V] is our M^T). What fla-core 0.6.0 accepts, and so where this path is taken:

- q, k, v in float16/bfloat16, fla's tested dtypes (``chunk_delta_rule`` refuses float32; the
  gated kernels accept it but round their matmuls): float32 inputs stay on the torch path, which
  computes in float32. b, g and M_0 are passed to fla in float32.
- any T: fla masks the last partial chunk of 64 (fla's chunk; our ``chunk_size`` is not used).
- even dk and dv (fla's 16-bit backward asserts it: Triton miscompiles odd tails) and dk <= 256
  for the delta kernel (asserted in its state recurrence).
- on a Hopper GPU with Triton in [3.4.0, 3.7.1), fla-core refuses its gated backward (Triton
  miscompiles one kernel there, ``chunk_bwd_dqkwg`` with a gate: wrong results, fla issue #640).
  There the gated ops run as ``fla_gated``'s autograd Functions instead: fla's own kernels for the
  forward and the rest of the backward, that one step by fla's kernel at smaller blocks where it
  checks out on the device, else in torch. They use fla's internals, so only with fla-core 0.6.0
  (another version: the torch path, with the reason). The rules without decay have no gate and
  keep fla's public ops.

Long sequences at small batch: the delta rules (delta, dgd) cut each sequence into segments that
run side by side (``fla_split``: fla's context-parallel summaries and merge on one card, exact),
where ``fla_split.segment_count`` says the (sequence, head) programs would not fill the GPU (64K
tokens at batch 1). The hebbian rule always runs fla's kernel on the whole sequence: a segment
split of it was measured slower and removed (9.0 against 5.0 ms forward + backward at 1 x 64K on
an H100, where the direct call at 64K is within 1.28x of its tokens/s at 1K;
``benchmarks/results/layers/long_context_h100.md``). :func:`segments` overrides the count.

fla returns gradients for q, k, v, g, beta and M_0 (the initial state gets one); gradients of lr,
of k through c_t (dgd) and of v through b*v (hebbian) follow by autograd.

Example:
    >>> unsupported(torch.zeros(1, 4, 2, 8), 8, delta=True) is not None   # a CPU tensor
    True
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from . import fla_gated, fla_split

__all__ = [
    "FIX", "MAX_DELTA_HEAD_DIM", "available", "chunked", "gated_backward_miscompiled", "segments", "unsupported",
]

FIX = 'pip install -e ".[kernels]"'
MAX_DELTA_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16)
# Tests only: take fla_gated's Functions for every gated op, on any GPU (not only where needed).
_FORCE_OWN_GATED_BACKWARD = False


# None: fla_split.segment_count's choice; an int: that many segments for the delta rules (1: unsplit)
_SEGMENTS: int | None = None


@contextlib.contextmanager
def segments(count: int | None):
    """Within the block, cut every delta-rule sequence on fla into ``count`` segments (1: never;
    None: ``fla_split.segment_count``'s choice, the default). For benchmarks and tests.

    Example:
        >>> with segments(1):
        ...     pass   # the delta rules run unsplit here
    """
    global _SEGMENTS
    if count is not None and (not isinstance(count, int) or count < 1):
        raise ValueError(f"segments takes a count >= 1 or None, got {count!r}")
    before, _SEGMENTS = _SEGMENTS, count
    try:
        yield
    finally:
        _SEGMENTS = before


def _segment_count(k: torch.Tensor) -> int:
    """Segments for a delta-rule call on k (B, T, H, dk): 1 where the split cannot run."""
    if fla_split.unavailable() is not None or not fla_split.device_ok(k.device):
        return 1
    if _SEGMENTS is not None:
        return _SEGMENTS
    return fla_split.segment_count(k.shape[0], k.shape[1], k.shape[2], k.device)


# looked up once: torch.compile cannot trace importlib's find_spec inside a layer's forward
_INSTALLED = importlib.util.find_spec("fla") is not None


def available() -> bool:
    """Whether flash-linear-attention (the ``fla`` package of fla-core) can be imported."""
    return _INSTALLED


def unsupported(k: torch.Tensor, dv: int, *, delta: bool) -> str | None:
    """Why fla cannot compute the rule on these inputs (None when it can); k in any layout, dv = v's last dim."""
    if not available():
        return f"flash-linear-attention is not installed ({FIX})"
    if k.device.type != "cuda":
        return f"the inputs are on {k.device.type}; fla's Triton kernels need CUDA tensors (move q, k, v to a GPU)"
    if k.dtype not in _DTYPES:
        return f"fla's kernels take float16 or bfloat16 q, k, v, got {k.dtype} (cast them, e.g. under torch.autocast)"
    if delta and k.shape[-1] > MAX_DELTA_HEAD_DIM:
        return f"fla's delta-rule kernel takes head dims up to {MAX_DELTA_HEAD_DIM}, got dk={k.shape[-1]}"
    if k.shape[-1] % 2 or dv % 2:
        return f"fla's 16-bit kernels need even head dims, got dk={k.shape[-1]}, dv={dv}"
    if gated_backward_miscompiled(k.device):
        problem = fla_gated.unavailable()
        if problem is not None:
            return (
                "fla's gated backward is wrong on Hopper GPUs with Triton >= 3.4.0, < 3.7.1, and our replacement "
                f"of its faulty step cannot run: {problem} (upgrade triton, or install "
                f"fla-core=={fla_gated.TESTED_FLA_VERSION})"
            )
    return None


def gated_backward_miscompiled(device: torch.device) -> bool:
    """Whether fla's gated ``chunk_bwd_dqkwg`` is miscompiled on this device (Hopper, Triton in [3.4.0, 3.7.1))."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] == 9 and (3, 4, 0) <= _triton_version() < (3, 7, 1)


def _triton_version() -> tuple[int, ...]:
    import triton

    parts = []
    for part in triton.__version__.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def chunked(q, k, v, b, log_decay, initial_state, *, delta: bool):
    """The linear memory by fla's chunked kernels, (B, T, H, D) layout.

    Args:
        q, k: (B, T, H, dk); v: (B, T, H, dv), float16 or bfloat16 on CUDA.
        b: step sizes (B, T, H) (c_t for dgd); log_decay: (B, T, H) or None.
        initial_state: M_0 (B, H, dv, dk) or None; delta: delta/dgd if True, hebbian if False.

    Returns:
        (y, M_T) in q's dtype: y (B, T, H, dv), M_T (B, H, dv, dk).
    """
    g = log_decay.float() if log_decay is not None else None
    m0 = initial_state.float() if initial_state is not None else None
    own = _FORCE_OWN_GATED_BACKWARD or gated_backward_miscompiled(k.device)
    if delta:
        count = _segment_count(k)
        if count > 1:
            gates = g if g is not None else torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)
            y, m = fla_split.gated_delta_rule(q, k, v, gates, b.float(), m0, segments=count)
            return y.to(q.dtype), m.to(q.dtype)
        if g is None:
            from fla.ops.delta_rule import chunk_delta_rule

            m0_kv = m0.transpose(-1, -2).contiguous() if m0 is not None else None
            y, m = chunk_delta_rule(q, k, v, b.float(), scale=1.0, initial_state=m0_kv, output_final_state=True)
            return y.to(q.dtype), m.transpose(-1, -2).to(q.dtype)
        if own:
            y, m = fla_gated.gated_delta_rule(q, k, v, g, b.float(), m0)
        else:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            y, m = chunk_gated_delta_rule(
                q, k, v, g, b.float(), scale=1.0, initial_state=m0, output_final_state=True, state_v_first=True
            )
    else:
        bv = (b.float()[..., None] * v.float()).to(v.dtype)
        if own and g is not None:
            y, m = fla_gated.simple_gla(q, k, bv, g, m0)
        else:
            from fla.ops.simple_gla import chunk_simple_gla

            y, m = chunk_simple_gla(
                q, k, bv, g=g, scale=1.0, initial_state=m0, output_final_state=True, state_v_first=True
            )
    return y.to(q.dtype), m.to(q.dtype)
