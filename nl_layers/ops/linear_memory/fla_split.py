"""The delta rules on long sequences at small batch: segments side by side on one GPU (exact).

fla's chunked delta-rule kernels run the state recurrence across chunks of 64 tokens with one
program per (sequence, head, value block). At batch 1, T = 64K and 8 heads that is a handful of
programs, each walking 1,024 chunks in turn, while a GPU has 132 SMs: the 64K call runs at 0.5-0.6x
the tokens/s of the same tokens as 64 sequences of 1K (H100). Here each sequence is cut into S
segments that run as S sequences, and only S - 1 small products are left in sequence.

Within a segment the memory is affine in the memory it starts from (value-first, V x K):

    M_end(s) = M_start(s) P_s^T + L_s,

where L_s is the memory the segment writes from a zero memory and P_s (K x K) is the product of
its tokens' transitions a_t (I - b_t k_t k_t^T). So:

1. every chunk-local quantity (fla's WY representation w, u) is computed for all tokens at once;
2. a pre-scan gives (L_s, P_s) for every segment, all segments side by side
   (fla's context-parallel summary kernel, ``chunk_cp_fwd_kernel_h``);
3. a merge walks the S summaries: M_start(s + 1) = M_end(s) (fla's intra-card merge kernel);
4. the state recurrence runs on all S segments side by side from those starting memories, and
   the outputs follow chunk by chunk, as in fla's own forward.

The backward is the same in reverse: the gradient of a segment's end memory is affine in the
gradient of the next segment's, so a backward pre-scan, a merge from the last segment to the
first, and fla's backward state recurrence on all segments side by side give every gradient.
Nothing is approximated: the result equals the unsplit call up to float rounding (fp32 states,
the summaries composed in fp32). The rest of the backward is fla's, with the one step that Triton
miscompiles on Hopper (fla issue #640) replaced as in :mod:`.fla_gated`.

It uses fla-core 0.6.0's internal functions (its context-parallel kernels for training across
GPUs, here used within one card), so it runs only with that version (:func:`unavailable`).

Example (CUDA and fla-core 0.6.0; segments=4 cuts each sequence in four):
    >>> q, k = (torch.nn.functional.normalize(torch.randn(1, 8192, 8, 64, device="cuda"), dim=-1).bfloat16()
    ...         for _ in range(2))                                            # doctest: +SKIP
    >>> v = torch.randn(1, 8192, 8, 64, device="cuda").bfloat16()            # doctest: +SKIP
    >>> g = -torch.rand(1, 8192, 8, device="cuda") * 0.01                    # doctest: +SKIP
    >>> beta = torch.rand(1, 8192, 8, device="cuda")                         # doctest: +SKIP
    >>> y, m = gated_delta_rule(q, k, v, g, beta, None, segments=4)          # doctest: +SKIP
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import fla_gated

__all__ = ["MIN_SEGMENT", "PAIRS_PER_SM", "SPLIT_BELOW", "device_ok", "gated_delta_rule", "segment_count", "unavailable"]

CHUNK = fla_gated.CHUNK
#: shortest segment worth a sequence of its own (32 of fla's chunks)
MIN_SEGMENT = 2048
#: (sequence, head) pairs per SM the split aims for (each pair is two or more programs: value blocks)
PAIRS_PER_SM = 0.5
#: the split runs only where batch * heads * SPLIT_BELOW <= the SMs (fewer pairs than an eighth of them)
SPLIT_BELOW = 8


@functools.cache
def unavailable() -> str | None:
    """Why the split cannot run (None when it can): it needs fla-core 0.6.0's internals."""
    problem = fla_gated.unavailable()
    if problem is not None:
        return problem
    try:
        _internals()
    except Exception as err:  # noqa: BLE001 -- any import failure means: not usable
        return f"fla-core's context-parallel kernels cannot be imported ({type(err).__name__}: {err})"
    return None


@functools.cache
def _internals():
    from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_fwd_o
    from fla.ops.cp.chunk_bwd import chunk_cp_bwd_kernel_dh
    from fla.ops.cp.chunk_fwd import chunk_cp_fwd_kernel_h
    from fla.ops.cp.chunk_merge import chunk_cp_fwd_bwd_kernel_merge
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra

    return dict(
        chunk_bwd_dqkwg=chunk_bwd_dqkwg,
        chunk_fwd_o=chunk_fwd_o,
        chunk_cp_bwd_kernel_dh=chunk_cp_bwd_kernel_dh,
        chunk_cp_fwd_kernel_h=chunk_cp_fwd_kernel_h,
        merge_kernel=chunk_cp_fwd_bwd_kernel_merge,
        chunk_gated_delta_rule_fwd_intra=chunk_gated_delta_rule_fwd_intra,
        **fla_gated._internals(),
    )


def device_ok(device: torch.device) -> bool:
    """Whether the split runs on this device: CUDA of compute capability >= 8.0 (the summaries are
    composed in TF32x3, fla's requirement for its context-parallel kernels)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def segment_count(batch: int, length: int, heads: int, device: torch.device) -> int:
    """How many segments each sequence is cut into (1: none).

    Only where ``batch * heads`` is at most an eighth of the SMs (at 64K tokens per call on an H100,
    132 SMs, 8 heads: T = 64K, batch 1): there the unsplit call keeps 0.61x of its 1K tokens/s and
    the split 0.71x; at T = 16K (batch 4, 32 pairs) the unsplit call keeps 0.92x and a split into 4
    ran slower (0.75x). Then a power of two, the fewest that give ``PAIRS_PER_SM`` (sequence, head)
    pairs per SM, with segments of at least ``MIN_SEGMENT`` tokens (16 at T = 64K; 8 timed the
    same). 1 off CUDA. Measured: ``benchmarks/results/layers/long_context_h100.md``.
    """
    if device.type != "cuda" or length < 2 * MIN_SEGMENT:
        return 1
    sms = sm_count(device)
    if batch * heads * SPLIT_BELOW > sms:
        return 1
    count = 1
    while batch * heads * count < PAIRS_PER_SM * sms and length // (2 * count) >= MIN_SEGMENT:
        count *= 2
    return count


def sm_count(device: torch.device) -> int:
    """The SMs of a CUDA device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


# ---------------------------------------------------------------------------------------------
# layout: (B, T, H, D) <-> (B * S, L, H, D), L a multiple of the chunk, the tail padded


def _segment_length(t: int, segments: int) -> int:
    length = -(-t // segments)
    return -(-length // CHUNK) * CHUNK


def _cut(x: torch.Tensor, segments: int, length: int) -> torch.Tensor:
    """(B, T, ...) -> contiguous (B * S, L, ...), padded with zeros at the end of each sequence."""
    pad = segments * length - x.shape[1]
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    return x.reshape(x.shape[0] * segments, length, *x.shape[2:]).contiguous()


def _join(x: torch.Tensor, batch: int, t: int) -> torch.Tensor:
    """(B * S, L, ...) -> (B, T, ...): the inverse of ``_cut``."""
    return x.reshape(batch, -1, *x.shape[2:])[:, :t]


_OFFSETS: dict = {}


def _merge_offsets(batch: int, segments: int, device: torch.device):
    """The merge kernel's index tensors for B sequences of S segments (made once per shape: a graph
    capture cannot copy them from the host)."""
    key = (batch, segments, device)
    if key not in _OFFSETS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "the segmented delta rule meets a new (batch, segments) shape during CUDA graph capture: "
                "run the step once eagerly before capturing it"
            )
        seq = [i * segments for i in range(batch + 1)]
        init = [i * (segments - 1) for i in range(batch + 1)]
        _OFFSETS[key] = (
            torch.tensor(seq, dtype=torch.int32, device=device),
            torch.tensor(init, dtype=torch.int32, device=device),
            torch.arange(batch, dtype=torch.int32, device=device),
        )
    return _OFFSETS[key]


def _merge(summaries: torch.Tensor, start: torch.Tensor | None, batch: int, segments: int) -> torch.Tensor:
    """Walk each sequence's segment summaries: x_{s+1} = x_s P_s^T + L_s (value-first x).

    summaries: (B * S, H, K, V + K) float32, fla's [L^T | P] per segment (only the first S - 1 of
    each sequence are read); start: (B, H, V, K) or None (zeros). Returns (B * S, H, V, K) float32:
    the state entering each segment (``start`` for the first).
    """
    import triton

    fla = _internals()
    _, nh, dk, vk = summaries.shape
    dv = vk - dk
    seq, init, ids = _merge_offsets(batch, segments, summaries.device)
    merged = summaries.new_empty(batch * (segments - 1), nh, dv, dk)
    start32 = start.float().contiguous() if start is not None else None
    fla["merge_kernel"][lambda meta: (triton.cdiv(dv, meta["BV"]), batch, nh)](
        h=merged, ag_hm=summaries, num_ranks=segments, rank=0, seq_offsets=seq, init_offsets=init,
        h0_seq_ids=ids, h0=start32, h_seq_idx=None, HV=nh, K=dk, V=dv, BK=triton.next_power_of_2(dk),
        FORWARD=True, IS_INTRACARD=True, N=batch, STATE_V_FIRST=True,
    )
    first = start32 if start32 is not None else merged.new_zeros(batch, nh, dv, dk)
    states = torch.cat([first[:, None], merged.view(batch, segments - 1, nh, dv, dk)], 1)
    return states.view(batch * segments, nh, dv, dk)


def _forward_summaries(k, w, u, gc):
    """[L^T | P] of every segment (B * S, H, K, V + K), from a zero memory: fla's forward pre-scan."""
    import triton

    fla = _internals()
    n, length, nh, dk = k.shape
    dv = u.shape[-1]
    bv = 32 if dk <= 64 else 64
    hm = k.new_empty(n, nh, dk, dv + dk, dtype=torch.float32)
    fla["chunk_cp_fwd_kernel_h"][(triton.cdiv(dv, bv) + triton.cdiv(dk, bv), nh, n)](
        k=k, v=u, w=w, g=gc, gk=None, bg=None, u=u, hm=hm, cu_seqlens=None, T=length, H=nh, HV=nh, K=dk, V=dv,
        BT=CHUNK, BV=bv, BK=triton.next_power_of_2(dk), MULTI_SEQS=True,
    )
    return hm


def _backward_summaries(q, k, w, do, dv, gc, batch: int, segments: int):
    """The backward summaries [dL | dP] of every segment but each sequence's first (its are not
    read), reversed within each sequence for the merge: (B * S, H, K, V + K)."""
    import triton

    fla = _internals()
    n, length, nh, dk = k.shape
    d_v = do.shape[-1]
    bv = 32 if dk <= 64 else 64
    grid = (triton.cdiv(d_v, bv) + triton.cdiv(dk, bv), nh)
    dhm = k.new_zeros(batch, segments, nh, dk, d_v + dk, dtype=torch.float32)
    for b in range(batch):
        for s in range(1, segments):  # the kernel summarises one sequence: one launch per segment
            i = b * segments + s
            fla["chunk_cp_bwd_kernel_dh"][grid](
                q=q[i], k=k[i], w=w[i], g=gc[i], gk=None, do=do[i], dhm=dhm[b, s], dv=dv[i], cu_seqlens=None,
                scale=1.0, T=length, H=nh, HV=nh, K=dk, V=d_v, BT=CHUNK, BV=bv, BK=triton.next_power_of_2(dk),
                USE_BG=False,
            )
    return dhm.flip(1).reshape(n, nh, dk, d_v + dk)


def _dqkwg(q, k, v_new, do, h, dh, gc, w, dv):
    """fla's ``chunk_bwd_dqkwg`` with a gate, or our step where Triton miscompiles it (Hopper)."""
    from .fla import gated_backward_miscompiled

    if gated_backward_miscompiled(q.device):
        return fla_gated._step(q, k, v_new, do, h, dh, gc, w=w, dv=dv)
    return _internals()["chunk_bwd_dqkwg"](
        q=q, k=k, v=v_new, w=w, g=gc, h=h, dv=dv, do=do, dh=dh, scale=1.0, state_v_first=True, chunk_size=CHUNK
    )


class _SegmentedGatedDeltaRule(torch.autograd.Function):
    """chunk_gated_delta_rule (scale 1, value-first state, final state out) with S segments side by side."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, m0, segments):
        fla = _internals()
        batch, t = q.shape[:2]
        length = _segment_length(t, segments)
        q, k, v, g, beta = (_cut(x, segments, length) for x in (q, k, v, g, beta))
        with fla_gated._device_guard(q):
            gc = fla["chunk_local_cumsum"](g, chunk_size=CHUNK, scale=fla["RCP_LN2"])
            w, u, a = fla["chunk_gated_delta_rule_fwd_intra"](k=k, v=v, g=gc, beta=beta, chunk_size=CHUNK)
            starts = _merge(_forward_summaries(k, w, u, gc), m0, batch, segments)
            h, v_new, ends = fla["chunk_gated_delta_rule_fwd_h"](
                k=k, w=w, u=u, g=gc, initial_state=starts, output_final_state=True, state_v_first=True,
                chunk_size=CHUNK,
            )
            o = fla["chunk_fwd_o"](q=q, k=k, v=v_new, h=h, g=gc, scale=1.0, state_v_first=True, chunk_size=CHUNK)
        ctx.save_for_backward(q, k, v, gc, beta, a, starts)
        ctx.meta = (batch, t, segments, g.dtype, m0 is not None)
        m_t = ends.view(batch, segments, *ends.shape[1:])[:, -1]
        return _join(o, batch, t).to(q.dtype), m_t

    @staticmethod
    def backward(ctx, do, dm_t):
        fla = _internals()
        q, k, v, gc, beta, a, starts = ctx.saved_tensors
        batch, t, segments, g_dtype, has_m0 = ctx.meta
        length = q.shape[1]
        do = _cut(do, segments, length)
        nh, d_v, dk = starts.shape[1:]
        with fla_gated._device_guard(q):
            w, u = fla["recompute_w_u_fwd"](k=k, v=v, beta=beta, A=a, g=gc)
            h, v_new, _ = fla["chunk_gated_delta_rule_fwd_h"](
                k=k, w=w, u=u, g=gc, initial_state=starts, output_final_state=False, state_v_first=True,
                chunk_size=CHUNK,
            )
            dv = fla["chunk_bwd_dv_local"](q=q, k=k, g=gc, do=do, scale=1.0, chunk_size=CHUNK)
            # gradients of each segment's end memory, from the last segment back to the first
            end = dm_t.float() if dm_t is not None else None
            reverse = _merge(_backward_summaries(q, k, w, do, dv, gc, batch, segments), end, batch, segments)
            dht = reverse.view(batch, segments, nh, d_v, dk).flip(1).reshape(batch * segments, nh, d_v, dk)
            dh, dstarts, dv = fla["chunk_gated_delta_rule_bwd_dhu"](
                q=q, k=k, w=w, g=gc, h0=starts, dht=dht.contiguous(), do=do, dv=dv, scale=1.0, state_v_first=True,
                chunk_size=CHUNK,
            )
            dq, dk_, dw, dg = _dqkwg(q, k, v_new, do, h, dh, gc, w, dv)
            dk_wy, dv, dbeta, dg_wy = fla["prepare_wy_repr_bwd"](k=k, v=v, beta=beta, g=gc, A=a, dw=dw, du=dv)
            dk_ = dk_ + dk_wy
            dg = fla["chunk_local_cumsum"](dg + dg_wy, chunk_size=CHUNK, reverse=True)
        dm0 = dstarts.view(batch, segments, nh, d_v, dk)[:, 0] if has_m0 else None
        grads = (_join(x, batch, t) for x in (dq, dk_, dv, dg, dbeta))
        dq, dk_, dv, dg, dbeta = grads
        return dq.to(q.dtype), dk_.to(k.dtype), dv.to(v.dtype), dg.to(g_dtype), dbeta.to(beta.dtype), dm0, None


@torch.compiler.disable  # Triton launches inside, as fla's public ops: a graph break under torch.compile
def gated_delta_rule(q, k, v, g, beta, initial_state, *, segments: int):
    """``chunk_gated_delta_rule(q, k, v, g, beta, scale=1.0, initial_state, output_final_state=True,
    state_v_first=True)`` with each sequence cut into ``segments`` segments side by side.

    q, k: (B, T, H, K); v: (B, T, H, V) in float16/bfloat16 on CUDA; g: log-decays (B, T, H)
    (zeros for the rule without decay); beta: (B, T, H); initial_state: (B, H, V, K) or None.
    Returns (o in q's dtype, the final state (B, H, V, K) in float32).
    """
    if segments < 2:
        raise ValueError(f"segments must be >= 2 (1 is the unsplit call), got {segments}")
    return _SegmentedGatedDeltaRule.apply(q, k, v, g, beta, initial_state, segments)
