"""deepopt under torch.distributed: DTensor (FSDP2) parameters and distributed checkpoints.

**Policy.** Element-wise levels (momentum, Adam's moments, the diagonal preconditioner) act on
each rank's local shard of a DTensor parameter: no communication, no extra memory. A chain with
any level that needs the whole tensor (Newton-Schulz in MuonMemory/M3/DeepMomentum, delta
momentum's matrix decay, DeepMomentum's per-tensor normalization, M3's RMS matching, DGD) runs on
the **full** tensors instead: the parameter, its gradient and its state are all-gathered, every
rank computes the same step redundantly, and each rank keeps its own shard of the result. That
is one all-gather of (1 + number of state buffers + 1) tensors per such parameter per step and a
transient full copy of one parameter at a time. It is exact (the step does not depend on the
sharding, so a checkpoint resumes exactly at any world size) and never silently degrades to an
element-wise rule. Spreading the orthogonalizations of different matrices across ranks (as
distributed Muon implementations do) would cut the redundant compute; it is not done here.

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

__all__ = ["is_dtensor", "needs_full_tensors", "on_full_tensors", "get_state_dict", "set_state_dict", "save",
           "load", "all_reduce_mean"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def needs_full_tensors(chain: Any, params: Sequence[Tensor]) -> bool:
    """True when ``chain`` has a non-element-wise level and some parameter is a DTensor."""
    if not any(is_dtensor(p) for p in params):
        return False
    return not all(getattr(lvl, "elementwise", False) for lvl in chain.levels)


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
