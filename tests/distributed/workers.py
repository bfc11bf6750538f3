"""Process bodies for the two-process (gloo, CPU) tests: DDP and FSDP2 against one process."""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.distributed as dist
from torch import nn

import deepopt

LR = {"MomentumMemory": 0.05, "AdamMemory": 3e-3, "MuonMemory": 0.02, "PreconditionedMomentum": 1e-3,
      "DeltaMomentum": 0.05, "DeepMomentum": 0.05, "M3": 3e-3, "DGD": 0.1}
#: float64 Newton-Schulz so that the comparison is about sharding, not bf16 rounding
EXTRA = {"MuonMemory": {"ns_dtype": None}, "M3": {"ns_dtype": None}}
STEPS = 4


def model_fn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.LayerNorm(10), nn.Linear(10, 3)).double()


def make(name: str, model: nn.Module) -> torch.optim.Optimizer:
    cls = deepopt.OPTIMIZERS[name]
    kw = dict(lr=LR[name], **EXTRA.get(name, {}))
    if getattr(cls, "requires_model", False):
        return cls(model.parameters(), model=model, **kw)
    return cls(model.parameters(), **kw)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)


def train(model, opt, steps, start=0, shard=None) -> None:
    for s in range(start, start + steps):
        x, y = batch(s)
        if shard is not None:
            x, y = x.chunk(shard[1])[shard[0]], y.chunk(shard[1])[shard[0]]
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()


def full_params(model) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]


def wrap(model: nn.Module, mode: str) -> nn.Module:
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))  # CPU shards also where CUDA exists (the default mesh would take it)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def setup(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def teardown() -> None:
    """Both ranks reach the end before the group goes (a rank that tears gloo down while its peer
    still talks to it aborts the peer: 'terminate called without an active exception')."""
    dist.barrier()
    dist.destroy_process_group()


def equality_worker(rank: int, world: int, port: int, mode: str, out: str) -> None:
    """Every optimizer: distributed run vs a single process on the full batch (max abs diff)."""
    setup(rank, world, port)
    result = {}
    for name in sorted(deepopt.OPTIMIZERS):
        ref = model_fn()
        dist_model = wrap(copy.deepcopy(ref), mode)
        train(ref, make(name, ref), STEPS)
        train(dist_model, make(name, dist_model), STEPS, shard=(rank, world))
        result[name] = max(float((a - b).abs().max()) for a, b in zip(full_params(dist_model), full_params(ref)))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    teardown()


def checkpoint_worker(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    """FSDP2 at this world size: train, save (DCP) mid-run, finish; or load and finish."""
    setup(rank, world, port)
    result = {}
    for name in sorted(deepopt.OPTIMIZERS):
        model = wrap(model_fn(), "fsdp")
        opt = make(name, model)
        path = os.path.join(ckpt, name)
        if not os.path.exists(path):
            train(model, opt, 3, shard=(rank, world))
            deepopt.distributed.save(model, opt, path)
            dist.barrier()
        else:
            deepopt.distributed.load(model, opt, path)
        train(model, opt, 3, start=3, shard=(rank, world))
        result[name] = [p.tolist() for p in full_params(model)]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    teardown()
