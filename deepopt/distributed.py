"""deepopt under torch.distributed: DTensor (FSDP2) parameters and distributed checkpoints.

**Policy.** Element-wise levels (momentum, Adam's moments, the diagonal preconditioner) act on
each rank's local shard of a DTensor parameter: no communication, no extra memory.

**Newton-Schulz spread over ranks** (default for DTensor parameters on a mesh of size > 1; MuonMemory,
M3). A chain whose only non-element-wise parts are Newton-Schulz read-outs and reductions that
DTensor computes itself (M3's RMS matching: one scalar all-reduce per matrix) runs on the DTensors
as they are; each Newton-Schulz input ``X_i`` (``m_i x n_i``, sharded by rows, ``Shard(0)``) goes to
one owner rank, which orthogonalizes it, and every rank receives its rows of ``NS(X_i)`` back:

    owner(i): matrices sorted by cost ns_flops(m_i, n_i) (descending, ties by index), each given
              to the rank with the least cost so far (ties: the lowest rank)
    gather:   rank r sends rows [r c_i, r c_i + k_r) of X_i (in the NS dtype, c_i = ceil(m_i / W)),
              all matrices in one all_to_all_single
    NS:       the owner runs its share as one process would: one matrix at a time on CPU (the
              foreach step), batched by shape on CUDA (the fused step's newton_schulz_many)
    scatter:  the owner sends rank r its rows of NS(X_i) (a second all_to_all_single)

The assignment depends only on the shapes and their order in the chain's parameter list, not on
the sharding. It is made per call (per param group and chain; M3 makes one for its fast and one
for its slow read-outs), so a group with a single matrix always gives it to the first rank. The owner runs what the single-process step
runs on the same input, so the spread step equals it: bit for bit for MuonMemory and M3 in the
two-process CPU gloo test (float32 parameters, bf16 Newton-Schulz; M3's RMS matching sums its
squares shard by shard, so the test allows 1e-6). On CUDA the owner batches its share by shape
where one process batches all matrices of a shape; a CPU test of that path agrees within the bf16
tolerance (1e-2; observed 0). Multi-GPU equality and timing are not measured here.

Exchange per step, for ``W`` ranks: two ``all_to_all_single`` calls per chain (per mesh and NS
dtype), carrying matrix ``i``'s input once to its owner and its output once back: ``2 (W-1) c_i n_i ~ 2 (W-1)/W m_i n_i`` elements of the NS dtype (bf16) over the group;
parameters, gradients and state never leave their shards. The replicated form instead has every
rank all-gather the parameter, the gradient and each state buffer (``(W-1)/W`` of each, in their
own dtype). Other placements than ``Shard(0)`` on a 1-D mesh gather the full input on every rank
(correct, not spread). Opt out per param group with ``distributed_ns="replicate"``.

**Replicated form.** Any other chain with a level that needs the whole tensor (delta momentum's
matrix decay, DeepMomentum's per-tensor normalization, DGD; every chain with
``distributed_ns="replicate"``) runs on the **full** tensors: the parameter, its gradient and its
state are all-gathered, every rank computes the same step redundantly, and each rank keeps its
own shard of the result. That is one all-gather of (1 + number of state buffers + 1) tensors per
such parameter per step and a transient full copy of one parameter at a time. It is exact (the
step does not depend on the sharding, so a checkpoint resumes exactly at any world size) and
never silently degrades to an element-wise rule.

**Checkpoints.** :func:`get_state_dict`/:func:`set_state_dict` wrap
``torch.distributed.checkpoint.state_dict`` and :func:`save`/:func:`load` write and read them
with ``torch.distributed.checkpoint`` (DCP), which reshards on load: save at world size 2, resume
at 1 or 2.

Example (inside an initialized process group):
    >>> from torch.distributed.fsdp import fully_shard                     # doctest: +SKIP
    >>> fully_shard(model); opt = deepopt.MuonMemory(model.parameters())    # doctest: +SKIP
    >>> deepopt.distributed.save(model, opt, "ckpt/step100")               # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["is_dtensor", "needs_full_tensors", "on_full_tensors", "orthogonalize_many", "ns_owners",
           "DISTRIBUTED_NS", "get_state_dict", "set_state_dict", "save", "load", "all_reduce_mean"]

#: values of the param-group key ``distributed_ns`` (absent: ``"spread"``)
DISTRIBUTED_NS = ("spread", "replicate")


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    if type(t) is Tensor or type(t) is nn.Parameter:  # the usual answer, without the import machinery
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def distributed_ns(group: Any) -> str:
    """The group's ``distributed_ns`` (``"spread"`` when absent); ValueError for another value."""
    mode = group.get("distributed_ns", "spread") if group is not None else "spread"
    if mode not in DISTRIBUTED_NS:
        raise ValueError(f"invalid distributed_ns: {mode!r}; use one of {DISTRIBUTED_NS}")
    return mode


def needs_full_tensors(chain: Any, params: Sequence[Tensor], group: Any = None) -> bool:
    """True when some parameter is a DTensor and ``chain`` has a non-element-wise level, unless
    every such level spreads its Newton-Schulz (``ns_spread``) and the group does not opt out."""
    if not any(is_dtensor(p) for p in params):
        return False
    levels = [lvl for lvl in chain.levels if not getattr(lvl, "elementwise", False)]
    if not levels:
        return False
    return distributed_ns(group) == "replicate" or not all(getattr(lvl, "ns_spread", False) for lvl in levels)


def ns_owners(shapes: Sequence[tuple[int, int]], world: int) -> list[int]:
    """The rank that orthogonalizes each ``(rows, cols)`` matrix: greedy by Newton-Schulz flops.

    Example:
        >>> ns_owners([(8, 8), (64, 64), (8, 8), (16, 64)], 2)
        [1, 0, 1, 1]
    """
    from .levels.orthogonal.batched import ns_flops

    cost = [ns_flops(m, n) for m, n in shapes]
    load = [0.0] * world
    owners = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-cost[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += cost[i]
    return owners


def _spreadable(x: Any) -> bool:
    from torch.distributed.tensor import Shard

    return (x.device_mesh.ndim == 1 and len(x.placements) == 1 and type(x.placements[0]) is Shard
            and x.placements[0].dim == 0)


def orthogonalize_many(xs: Sequence[Tensor], fn: Callable[[Tensor], Tensor], dtype: torch.dtype | None = None,
                       many: Callable[[list[Tensor]], list[Tensor]] | None = None) -> list[Tensor]:
    """``fn`` (one matrix's Newton-Schulz) on each ``x`` viewed as ``(shape[0], -1)``, in ``x``'s shape.

    Plain tensors: ``fn`` on each, here. DTensors sharded by rows on a 1-D mesh of ``W > 1`` ranks:
    spread as the module docstring describes (the inputs cast to ``dtype`` before they travel; the
    outputs are DTensors of the inputs' placements); the owner runs ``many`` on its whole share
    where given (e.g. :func:`~deepopt.levels.orthogonal.newton_schulz_many`, batched by shape),
    else ``fn`` on each matrix. Other DTensors: ``fn`` on the full tensor.

    Example:
        >>> import torch
        >>> o = orthogonalize_many([torch.eye(3) * 2], lambda m: m / m.norm())
        >>> o[0].shape
        torch.Size([3, 3])
    """
    outs: list[Any] = [None] * len(xs)
    spread = []
    for i, x in enumerate(xs):
        if not is_dtensor(x):
            outs[i] = fn(x.reshape(x.shape[0], -1)).reshape(x.shape)
        elif _spreadable(x) and x.device_mesh.size() > 1:
            spread.append(i)
        else:
            o = fn(x.full_tensor().reshape(x.shape[0], -1)).reshape(x.shape)
            outs[i] = _as_dtensor(_shard_of(o, x), x)
    by_mesh: dict[tuple, list[int]] = {}  # one exchange per mesh and travelling dtype
    for i in spread:
        by_mesh.setdefault((id(xs[i].device_mesh), dtype or xs[i].dtype), []).append(i)
    for idx in by_mesh.values():
        for i, o in zip(idx, _spread([xs[i] for i in idx], fn, dtype, many)):
            outs[i] = o
    return outs


def _as_dtensor(local: Tensor, like: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def _spread(xs: Sequence[Any], fn: Callable[[Tensor], Tensor], dtype: torch.dtype | None,
            many: Callable[[list[Tensor]], list[Tensor]] | None) -> list[Any]:
    """Two ``all_to_all_single`` calls: every rank's rows of each input to its owner, and every
    owner's output rows back, each padded to ``c_i = ceil(m_i / W)`` rows."""
    import torch.distributed as dist

    pg = xs[0].device_mesh.get_group()
    world, me = dist.get_world_size(pg), dist.get_rank(pg)
    shapes = [(x.shape[0], x.numel() // x.shape[0]) for x in xs]
    owners = ns_owners(shapes, world)
    rows = [-(-m // world) for m, _ in shapes]
    size = [c * n for c, (_, n) in zip(rows, shapes)]  # one rank's padded block of matrix i
    by_owner = [[i for i, o in enumerate(owners) if o == r] for r in range(world)]
    locals_ = [x.to_local() for x in xs]
    dt = dtype or locals_[0].dtype
    device = locals_[0].device
    send = torch.zeros(sum(size), dtype=dt, device=device)
    at = 0
    for r in range(world):  # grouped by destination
        for i in by_owner[r]:
            k = locals_[i].shape[0]
            if k != max(0, min(rows[i], shapes[i][0] - me * rows[i])):
                raise RuntimeError(f"deepopt.distributed: unexpected shard of {tuple(xs[i].shape)} ({k} rows on "
                                   f"rank {me}); use distributed_ns='replicate'")
            send[at:at + size[i]].view(rows[i], shapes[i][1])[:k] = locals_[i].reshape(k, shapes[i][1])
            at += size[i]
    mine = by_owner[me]
    block = sum(size[i] for i in mine)
    recv = torch.empty(world * block, dtype=dt, device=device)
    dist.all_to_all_single(recv, send, [block] * world, [sum(size[i] for i in b) for b in by_owner], group=pg)
    ins, at = [], 0
    offsets = {}
    for i in mine:
        offsets[i] = at
        at += size[i]
    for i in mine:
        parts = [recv[r * block + offsets[i]: r * block + offsets[i] + size[i]].view(rows[i], -1) for r in range(world)]
        ins.append(torch.cat(parts)[:shapes[i][0]])
    outs = many(ins) if many is not None else [fn(x) for x in ins]
    back = torch.zeros(world * block, dtype=dt, device=device)  # to each rank its rows of my outputs
    for i, o in zip(mine, outs):
        padded = torch.zeros(world * rows[i], shapes[i][1], dtype=dt, device=device)
        padded[:shapes[i][0]] = o
        for r, piece in enumerate(padded.chunk(world)):
            back[r * block + offsets[i]: r * block + offsets[i] + size[i]].copy_(piece.reshape(-1))
    got = torch.empty(sum(size), dtype=dt, device=device)
    dist.all_to_all_single(got, back, [sum(size[i] for i in b) for b in by_owner], [block] * world, group=pg)
    result: list[Any] = [None] * len(xs)
    at = 0
    for r in range(world):
        for i in by_owner[r]:
            k = locals_[i].shape[0]
            local = got[at:at + size[i]].view(rows[i], -1)[:k].reshape(locals_[i].shape)
            result[i] = _as_dtensor(local, xs[i])
            at += size[i]
    return result


def _full(t: Any) -> Any:
    return t.full_tensor() if is_dtensor(t) else t


def _shard_of(full: Tensor, like: Tensor) -> Tensor:
    """This rank's local shard of ``full`` laid out as the DTensor ``like``, without communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def on_full_tensors(step: Callable[[list[Tensor], list[Tensor], list[dict]], None], params: Sequence[Tensor],
                    grads: Sequence[Tensor], states: Sequence[dict]) -> None:
    """Run ``step(full_params, full_grads, full_states)`` (which updates its arguments in place)
    on all-gathered copies of DTensor parameters, gradients and states, then write every rank's
    shard of the results back. Plain tensors pass through untouched."""
    full_p = [_full(p).detach().clone() if is_dtensor(p) else p for p in params]
    for p, fp in zip(params, full_p):
        if fp is not p:
            fp.source = p  # levels that key state by parameter identity (DGD's inputs) look through
    full_g = [_full(g) for g in grads]
    full_s = [{k: _full(v) for k, v in s.items()} for s in states]
    step(full_p, full_g, full_s)
    for p, fp in zip(params, full_p):
        if is_dtensor(p):
            p.to_local().copy_(_shard_of(fp, p))
    for s, fs in zip(states, full_s):
        for k, v in s.items():
            if is_dtensor(v):
                v.to_local().copy_(_shard_of(fs[k], v))
            elif fs[k] is not v:
                s[k] = fs[k]


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over the default process group (``t`` itself outside one). In place."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t.div_(dist.get_world_size())
    return t


# ---------------------------------------------------------------------- checkpoints
def get_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` keyed by parameter names, DTensors for sharded state."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def set_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a :func:`get_state_dict` dict (any world size) into ``model`` and ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def save(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Write model and optimizer to the DCP checkpoint directory ``path`` (every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(get_state_dict(model, optimizer), checkpoint_id=path)


def load(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Read a DCP checkpoint written by :func:`save` at any world size (resharding as needed)."""
    import torch.distributed.checkpoint as dcp

    state = get_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, state)
