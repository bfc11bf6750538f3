"""fla's gated chunked ops with one backward step of ours: for Hopper GPUs with Triton in [3.4.0, 3.7.1).

On those, Triton miscompiles one kernel of flash-linear-attention's gated backward,
``chunk_bwd_dqkwg`` with a gate g (fla issue #640), and fla-core 0.6.0 refuses to run it. The two
autograd Functions here run fla's own Triton kernels for everything else -- the forward of
``chunk_gated_delta_rule`` / ``chunk_simple_gla`` and every other step of their backward, in
fla's order -- and replace only that step by :func:`dqkwg`, a pure-torch, chunk-local, batched
computation of the same quantities (all chunks at once, no loop over chunks).

That step is fla's own kernel launched at K and V blocks of 32 (:func:`dqkwg_tiled`: the
miscompile is tied to fla's block width of 64), wherever it equals the torch step on this device;
:func:`tiled_step_ok` checks that once per shape and dtype, and the torch step runs otherwise.

They use fla's internal functions, so they are pinned to the fla-core version they were checked
against (:data:`TESTED_FLA_VERSION`); :func:`unavailable` says why they cannot run otherwise.

What ``chunk_bwd_dqkwg`` computes (and :func:`dqkwg` too), per chunk of BT = 64 tokens and head,
in fla's layout with a value-first state: S (V x K) the state at the chunk start (fla's ``h``),
dS' the gradient of the state at the chunk end (``dh``), v the values the state recurrence wrote
(for the delta rule fla's ``v_new``, the writes u - w S^T), dv the gradient of those, and
c_t = log a_1 + ... + log a_t the cumulative log-gate from the chunk start, stored by fla in base
2 (c_t / ln 2, so the gates are e_t = 2^(stored c_t) = exp(c_t)). With e_L the gate of the
chunk's last token (the last valid one in a partial last chunk) and scale s, the chunk computes

    o_t = s (e_t S q_t + sum_{r<=t} (e_t / e_r) (q_t . k_r) v_r)
    S'  = e_L S + sum_r (e_L / e_r) v_r k_r^T            (delta rule: v_r = u_r - S w_r)

and the step returns the gradients through these of q, k, w and of c (natural log units: fla's
``exp2`` of base-2 values is exp of c, and the kernel leaves out the ln 2), given do and dS':

    P      = s ((do v^T) o D),  D_tr = e_t / e_r for r <= t, else 0
    dq_t   = s e_t S^T do_t + sum_r P_tr k_r
    dk_r   = (e_L / e_r) dS'^T v_r + sum_t P_tr q_t
    dw_r   = -S^T dv_r                                   (delta rule only)
    dc_t   = q_t . dq_t - k_t . dk_t,  and at the chunk's last token also
             + e_L <S, dS'> + sum_r (e_L / e_r) k_r . (dS'^T v_r)

(the last two are dS'/de_L: e_L enters S' directly and through e_L / e_r). fla then turns dc into
the gradient of the per-token log-gates by a reverse cumulative sum within each chunk.

Example (the torch step alone needs no fla):
    >>> q = k = torch.randn(1, 70, 2, 8); v = do = torch.randn(1, 70, 2, 4)
    >>> h = dh = torch.randn(1, 2, 2, 4, 8); g = torch.zeros(1, 70, 2)  # 2 chunks, no decay
    >>> dq, dk, dw, dg = dqkwg(q, k, v, do, h, dh, g)
    >>> dq.shape, dw is None, dg.shape
    (torch.Size([1, 70, 2, 8]), True, torch.Size([1, 70, 2]))
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

__all__ = [
    "CHUNK", "TESTED_FLA_VERSION", "TILE", "dqkwg", "dqkwg_tiled", "gated_delta_rule", "simple_gla", "tiled_step_ok",
    "unavailable",
]

TESTED_FLA_VERSION = "0.6.0"
CHUNK = 64  # fla's chunk length for both ops
TILE = 32  # K and V block width at which fla's gated dqkwg kernel compiles correctly there (fla picks 64)


@functools.cache
def unavailable() -> str | None:
    """Why the Functions here cannot run (None when they can): fla's internals as of fla-core 0.6.0."""
    try:
        import fla
    except Exception as err:  # noqa: BLE001 -- any import failure means: not usable
        return f"flash-linear-attention cannot be imported ({type(err).__name__}: {err})"
    version = getattr(fla, "__version__", "unknown")
    if version != TESTED_FLA_VERSION:
        return (
            f"our replacement of fla's gated backward step is written against fla-core {TESTED_FLA_VERSION}'s "
            f"internal functions, found fla {version}"
        )
    try:
        _internals()
    except Exception as err:  # noqa: BLE001
        return f"fla-core {version}'s internal functions cannot be imported ({type(err).__name__}: {err})"
    return None


@functools.cache
def _internals():
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
    from fla.ops.common.chunk_h import chunk_bwd_dh, chunk_fwd_h
    from fla.ops.common.chunk_o import chunk_bwd_dv, chunk_bwd_dv_local
    from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_fwd
    from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd, recompute_w_u_fwd
    from fla.ops.simple_gla.chunk import chunk_simple_gla_fwd
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2

    return dict(
        chunk_gated_delta_rule_bwd_dhu=chunk_gated_delta_rule_bwd_dhu,
        chunk_gated_delta_rule_fwd_h=chunk_gated_delta_rule_fwd_h,
        chunk_bwd_dh=chunk_bwd_dh,
        chunk_fwd_h=chunk_fwd_h,
        chunk_bwd_dv=chunk_bwd_dv,
        chunk_bwd_dv_local=chunk_bwd_dv_local,
        chunk_gated_delta_rule_fwd=chunk_gated_delta_rule_fwd,
        prepare_wy_repr_bwd=prepare_wy_repr_bwd,
        recompute_w_u_fwd=recompute_w_u_fwd,
        chunk_simple_gla_fwd=chunk_simple_gla_fwd,
        chunk_local_cumsum=chunk_local_cumsum,
        RCP_LN2=RCP_LN2,
    )


# ---------------------------------------------------------------------------------------------
# the replaced step, in torch


def _to_chunks(x: torch.Tensor, n: int, bt: int) -> torch.Tensor:
    """(B, T, H, D) -> float32 (B, n, H, bt, D), time zero-padded to n * bt."""
    bsz, t, h, d = x.shape
    x = F.pad(x.float(), (0, 0, 0, 0, 0, n * bt - t))
    return x.view(bsz, n, bt, h, d).transpose(2, 3)


def _from_chunks(x: torch.Tensor, t: int) -> torch.Tensor:
    """(B, n, H, bt, D) -> contiguous (B, t, H, D), padding dropped (fla's kernels take contiguous tensors)."""
    bsz, n, h, bt, d = x.shape
    return x.transpose(2, 3).reshape(bsz, n * bt, h, d)[:, :t].contiguous()


def dqkwg(q, k, v, do, h, dh, g, *, w=None, dv=None, scale=1.0, chunk_size=CHUNK):
    """Gradients of q, k, w and of the cumulative log-gate within one chunk: fla's ``chunk_bwd_dqkwg``.

    The mathematics is in the module docstring; all chunks and heads are computed at once in
    float32 (autocast off), whatever the input dtypes.

    Args:
        q, k: (B, T, H, K); v, do: (B, T, H, V) (v: the values written, fla's ``v_new`` for the
            delta rule); any T (the last chunk may be partial).
        h, dh: (B, NT, H, V, K), NT = ceil(T / chunk_size): value-first chunk-start states and
            gradients of the chunk-end states (fla's ``h`` and ``dh`` with ``state_v_first=True``).
        g: (B, T, H) cumulative log-gates from each chunk's start, in base 2 (fla's g after its
            ``chunk_local_cumsum(..., scale=RCP_LN2)``).
        w, dv: (B, T, H, K) and (B, T, H, V) for the delta rule (dw = -dv S), or both None.
        scale: the output scale (fla's ``scale``).

    Returns:
        (dq, dk, dw, dg): dq, dk (B, T, H, K) float32; dw like w (None without w); dg (B, T, H)
        float32, the gradient of the cumulative gates in natural-log units.
    """
    bsz, t, nh, _ = q.shape
    bt = chunk_size
    n = -(-t // bt)
    if h.shape[:3] != (bsz, n, nh) or dh.shape != h.shape:
        raise ValueError(
            f"h, dh must be (B, NT, H, V, K) = ({bsz}, {n}, {nh}, V, K), got {tuple(h.shape)}, {tuple(dh.shape)}"
        )
    if (w is None) != (dv is None):
        raise ValueError("pass both w and dv (delta rule) or neither")
    device = q.device
    with torch.autocast(device.type, enabled=False):
        qc, kc, vc, doc = (_to_chunks(x, n, bt) for x in (q, k, v, do))
        # gates: pad the last chunk with its last valid value, so index bt-1 of every chunk holds e_L
        gp = torch.cat([g.float(), g[:, -1:].float().expand(bsz, n * bt - t, nh)], 1)
        gc = gp.view(bsz, n, bt, nh).transpose(2, 3)  # (B, n, H, bt), base 2
        g_last = gc[..., -1:]  # (B, n, H, 1)
        s, ds = h.float(), dh.float()  # (B, n, H, V, K)

        causal = torch.ones(bt, bt, dtype=torch.bool, device=device).tril()
        diff = torch.where(causal, gc[..., :, None] - gc[..., None, :], float("-inf"))  # c_t - c_r, t >= r
        p = (doc @ vc.transpose(-1, -2)) * torch.exp2(diff) * scale  # P, (B, n, H, bt, bt)

        dq_state = (doc @ s) * (torch.exp2(gc) * scale)[..., None]  # s e_t S^T do_t
        dk_state = (vc @ ds) * torch.exp2(g_last - gc)[..., None]  # (e_L / e_r) dS'^T v_r
        dq = dq_state + p @ kc
        dk = dk_state + p.transpose(-1, -2) @ qc
        dgc = (dq * qc).sum(-1) - (dk * kc).sum(-1)  # (B, n, H, bt)
        dg_last = torch.exp2(g_last[..., 0]) * (s * ds).sum((-1, -2)) + (dk_state * kc).sum((-1, -2))
        ends = (torch.arange(1, n + 1, device=device) * bt).clamp(max=t) - 1  # last valid token of each chunk
        is_last = torch.zeros(n * bt, dtype=torch.float32, device=device).index_fill_(0, ends, 1.0)
        dgc = dgc + is_last.view(n, bt)[None, :, None, :] * dg_last[..., None]
        dg = dgc.transpose(2, 3).reshape(bsz, n * bt, nh)[:, :t].contiguous()

        dw = None
        if w is not None:
            dw = _from_chunks(-(_to_chunks(dv, n, bt) @ s), t).to(w.dtype)
    return _from_chunks(dq, t), _from_chunks(dk, t), dw, dg


# ---------------------------------------------------------------------------------------------
# fla's own kernel for the step, at blocks of 32 (checked against the torch step once per shape)


def dqkwg_tiled(q, k, v, do, h, dh, g, *, w=None, dv=None, scale=1.0, tile=TILE):
    """fla's ``chunk_bwd_kernel_dqkwg`` itself, launched with K and V blocks of ``tile``.

    The miscompile behind fla issue #640 is tied to fla's Hopper block width of 64 (at K = 64):
    at blocks of 32 (and of 128) the same kernel computes the right gradients. Arguments and
    results as :func:`dqkwg` (dq, dk in q's dtype); fla's tensors, CUDA only. Whether the compiled
    kernel is right on this device is checked, not assumed: see :func:`tiled_step_ok`.
    """
    import triton
    from fla.ops.common.chunk_o import chunk_bwd_kernel_dqkwg

    bsz, t, nh, dk = k.shape
    d_v = v.shape[-1]
    bk = min(max(triton.next_power_of_2(dk), 16), tile)
    bv = min(max(triton.next_power_of_2(d_v), 16), tile)
    nk, n = triton.cdiv(dk, bk), triton.cdiv(t, CHUNK)
    dq, dk_ = torch.empty_like(q), torch.empty_like(k)
    dw = torch.empty_like(w) if w is not None else None
    dg = torch.empty(nk, *g.shape, dtype=torch.float32, device=g.device)
    with _device_guard(q):
        chunk_bwd_kernel_dqkwg[(nk * n, bsz * nh)](
            q=q, k=k, v=v, g=g, g_gamma=None, h=h, do=do, dh=dh, dq=dq, dk=dk_, dw=dw, dv=dv, dg=dg,
            cu_seqlens=None, chunk_indices=None, scale=scale, B=bsz, T=t, H=nh, HV=nh, K=dk, V=d_v,
            BT=CHUNK, BK=bk, BV=bv, STATE_V_FIRST=True,
        )
    return dq, dk_, dw, dg.sum(0)


_TILED_OK: dict = {}
_TILED_TOL = 3e-2  # ||a - b|| / ||b|| of 16-bit kernel outputs against the float32 torch step; the miscompile gives ~0.5


def tiled_step_ok(q, v, h, dh, w) -> bool:
    """Whether :func:`dqkwg_tiled` equals :func:`dqkwg` on this device, for these dims and dtypes.

    Checked once per (device, K, V, dtypes, delta or not) on random inputs with a partial last
    chunk, and remembered; while a CUDA graph is being captured an unchecked case counts as not
    ok (the check reads values on the host), so the torch step runs.
    """
    key = (q.device, q.shape[-1], v.shape[-1], q.dtype, h.dtype, dh.dtype, w is not None)
    if key not in _TILED_OK:
        if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        _TILED_OK[key] = _check_tiled(*key)
    return _TILED_OK[key]


def _check_tiled(device, dk, d_v, dtype, h_dtype, dh_dtype, delta) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)
    t, nh, n = 2 * CHUNK + 37, 2, 3

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device).to(dt)

    q, k = (F.normalize(torch.randn(1, t, nh, dk, generator=gen, device=device), dim=-1).to(dtype) for _ in range(2))
    v, do = rand(1, t, nh, d_v), rand(1, t, nh, d_v)
    h, dh = rand(1, n, nh, d_v, dk, dt=h_dtype), rand(1, n, nh, d_v, dk, dt=dh_dtype)
    g = F.logsigmoid(torch.randn(1, t, nh, generator=gen, device=device) + 3)
    g = _internals()["chunk_local_cumsum"](g, chunk_size=CHUNK, scale=_internals()["RCP_LN2"])
    w, dv = (rand(1, t, nh, dk), rand(1, t, nh, d_v)) if delta else (None, None)
    ours = dqkwg_tiled(q, k, v, do, h, dh, g, w=w, dv=dv)
    ref = dqkwg(q, k, v, do, h, dh, g, w=w, dv=dv)
    for a, r in zip(ours, ref):
        if r is not None and not float((a.float() - r.float()).norm() / r.float().norm()) < _TILED_TOL:
            return False
    return True


def _step(q, k, v, do, h, dh, g, *, w=None, dv=None):
    """fla's kernel at blocks of 32 where it checked out on this device, else the torch step."""
    fn = dqkwg_tiled if tiled_step_ok(q, v, h, dh, w) else dqkwg
    return fn(q, k, v, do, h, dh, g, w=w, dv=dv, scale=1.0)


# ---------------------------------------------------------------------------------------------
# the Functions: fla's kernels around our step


def _device_guard(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _contiguous(*tensors):
    return [t.contiguous() if isinstance(t, torch.Tensor) else t for t in tensors]


class _GatedDeltaRule(torch.autograd.Function):
    """fla's chunk_gated_delta_rule (scale 1, value-first state, final state out), our dqkwg step."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, m0):
        fla = _internals()
        q, k, v, g, beta, m0 = _contiguous(q, k, v, g, beta, m0)
        with _device_guard(q):
            gc, o, a, m_t, _, _ = fla["chunk_gated_delta_rule_fwd"](
                q=q, k=k, v=v, g=g, beta=beta, scale=1.0, initial_state=m0, output_final_state=True,
                state_v_first=True, chunk_size=CHUNK,
            )
        ctx.save_for_backward(q, k, v, gc, beta, a, m0)
        ctx.g_dtype = g.dtype
        return o.to(q.dtype), m_t

    @staticmethod
    def backward(ctx, do, dm_t):
        fla = _internals()
        q, k, v, gc, beta, a, m0 = ctx.saved_tensors
        do, dm_t = _contiguous(do, dm_t)
        with _device_guard(q):
            w, u = fla["recompute_w_u_fwd"](k=k, v=v, beta=beta, A=a, g=gc)
            h, v_new, _ = fla["chunk_gated_delta_rule_fwd_h"](
                k=k, w=w, u=u, g=gc, initial_state=m0, output_final_state=False, state_v_first=True, chunk_size=CHUNK
            )
            dv = fla["chunk_bwd_dv_local"](q=q, k=k, g=gc, do=do, scale=1.0, chunk_size=CHUNK)
            dh, dm0, dv = fla["chunk_gated_delta_rule_bwd_dhu"](
                q=q, k=k, w=w, g=gc, h0=m0, dht=dm_t, do=do, dv=dv, scale=1.0, state_v_first=True, chunk_size=CHUNK
            )
            dq, dk, dw, dg = _step(q, k, v_new, do, h, dh, gc, w=w, dv=dv)
            dk_wy, dv, dbeta, dg_wy = fla["prepare_wy_repr_bwd"](k=k, v=v, beta=beta, g=gc, A=a, dw=dw, du=dv)
            dk = dk + dk_wy
            dg = fla["chunk_local_cumsum"](dg + dg_wy, chunk_size=CHUNK, reverse=True)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(ctx.g_dtype), dbeta.to(beta.dtype), dm0


class _SimpleGLA(torch.autograd.Function):
    """fla's chunk_simple_gla with a gate g (scale 1, value-first state, final state out), our dqkwg step."""

    @staticmethod
    def forward(ctx, q, k, v, g, m0):
        fla = _internals()
        q, k, v, g, m0 = _contiguous(q, k, v, g, m0)
        with _device_guard(q):
            gc = fla["chunk_local_cumsum"](g, chunk_size=CHUNK, scale=fla["RCP_LN2"])
            o, m_t = fla["chunk_simple_gla_fwd"](
                q=q, k=k, v=v, g=gc, g_gamma=None, scale=1.0, initial_state=m0, output_final_state=True,
                state_v_first=True, chunk_size=CHUNK,
            )
        ctx.save_for_backward(q, k, v, gc, m0)
        ctx.g_dtype = g.dtype
        return o.to(q.dtype), m_t

    @staticmethod
    def backward(ctx, do, dm_t):
        fla = _internals()
        q, k, v, gc, m0 = ctx.saved_tensors
        do, dm_t = _contiguous(do, dm_t)
        none = dict(g_gamma=None, gk=None, gv=None)
        with _device_guard(q):
            h, _ = fla["chunk_fwd_h"](
                k=k, v=v, g=gc, **none, h0=m0, output_final_state=False, state_v_first=True, chunk_size=CHUNK,
                states_in_fp32=True,
            )
            dh, dm0 = fla["chunk_bwd_dh"](
                q=q, k=k, v=v, g=gc, **none, do=do, h0=m0, dht=dm_t, scale=1.0, state_v_first=True,
                chunk_size=CHUNK, states_in_fp32=True,
            )
            dq, dk, _, dg = _step(q, k, v, do, h, dh, gc)
            dv = fla["chunk_bwd_dv"](
                q=q, k=k, g=gc, g_gamma=None, do=do, dh=dh, scale=1.0, state_v_first=True, chunk_size=CHUNK
            )
            dg = fla["chunk_local_cumsum"](dg, chunk_size=CHUNK, reverse=True)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(ctx.g_dtype), dm0


@torch.compiler.disable  # as fla's public ops: Triton launches inside, graph break under torch.compile
def gated_delta_rule(q, k, v, g, beta, initial_state):
    """``chunk_gated_delta_rule(q, k, v, g, beta, scale=1.0, initial_state, output_final_state=True,
    state_v_first=True)`` with our backward step; (B, T, H, D) layout, returns (o, final_state float32)."""
    return _GatedDeltaRule.apply(q, k, v, g, beta, initial_state)


@torch.compiler.disable
def simple_gla(q, k, v, g, initial_state):
    """``chunk_simple_gla(q, k, v, g, scale=1.0, initial_state, output_final_state=True,
    state_v_first=True)`` with our backward step (g required); returns (o, final_state float32)."""
    return _SimpleGLA.apply(q, k, v, g, initial_state)
