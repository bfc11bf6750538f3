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


# ---------------------------------------------------------------------- Newton-Schulz spread over ranks
def spread_model() -> nn.Module:
    """Matrices of several shapes, rows not all divisible by 2 (7, 9, 3), float32."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 7), nn.Tanh(), nn.Linear(7, 9), nn.Tanh(),
                         nn.Linear(9, 3))


def train32(model, opt, steps) -> None:
    for s in range(steps):
        x, y = batch(s)
        opt.zero_grad()
        (model(x.float()) - y.float()).square().mean().backward()
        opt.step()


SPREAD_OPTS = {"MuonMemory": dict(lr=0.02), "M3": dict(lr=3e-3, frequency=2)}


def _record_ns(calls: list) -> None:
    """Wrap the per-matrix Newton-Schulz the levels call, recording each input's shape."""
    from deepopt.levels.multiscale import level as m3_level
    from deepopt.levels.orthogonal import level as ns_level

    inner = ns_level.newton_schulz

    def counted(m, *a, **k):
        calls.append(tuple(m.shape))
        return inner(m, *a, **k)

    ns_level.newton_schulz = m3_level.newton_schulz = counted


def spread_worker(rank: int, world: int, port: int, out: str) -> None:
    """FSDP2 (Shard(0)) with the default spread, with distributed_ns="replicate", with Shard(1)
    placements and with impl="reference" (one matrix per exchange), each against one process on the
    same batch; the Newton-Schulz shapes each rank ran."""
    from torch.distributed.tensor import Shard

    setup(rank, world, port)
    calls: list = []
    _record_ns(calls)
    result: dict = {}
    for name, kw in SPREAD_OPTS.items():
        ref = spread_model()
        train32(ref, deepopt.OPTIMIZERS[name](ref.parameters(), **kw), STEPS)  # the full batch, one process
        for variant in ("spread", "replicate", "shard1", "reference"):
            model = spread_model()
            fsdp_kw = {"shard_placement_fn": lambda p: Shard(1) if p.ndim == 2 and p.shape[1] % world == 0 else Shard(0)} if variant == "shard1" else {}
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=mesh, **fsdp_kw)
            fully_shard(model, mesh=mesh, **fsdp_kw)
            groups = [{"params": list(model.parameters()), "distributed_ns": "replicate"}] if variant == "replicate" \
                else model.parameters()
            opt = deepopt.OPTIMIZERS[name](groups, **kw, **({"impl": "reference"} if variant == "reference" else {}))
            calls.clear()
            train32(model, opt, STEPS)  # every rank the full batch: the same gradients as one process
            diff = max(float((a - b).detach().abs().max()) for a, b in zip(full_params(model), full_params(ref)))
            result[f"{name}/{variant}"] = {"diff": diff, "calls": list(calls)}
    result["batched_owner"] = batched_owner_diff(world)
    everyone = [None] * world
    dist.all_gather_object(everyone, result)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(everyone, f)
    teardown()


def batched_owner_diff(world: int) -> float:
    """The owner's batched share (``many=newton_schulz_many``, what CUDA runs) against
    ``newton_schulz_many`` of all matrices in one process: max abs difference (bf16 outputs)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from deepopt.levels.orthogonal import newton_schulz, newton_schulz_many

    g = torch.Generator().manual_seed(3)
    full = [torch.randn(*s, generator=g) for s in [(16, 6), (16, 6), (7, 16), (9, 7), (7, 16), (3, 9), (5, 4, 3), (1, 8)]]
    mesh = init_device_mesh("cpu", (world,))
    xs = [distribute_tensor(f, mesh, [Shard(0)]) for f in full]
    outs = deepopt.distributed.orthogonalize_many(xs, newton_schulz, torch.bfloat16,
                                                  many=lambda ms: newton_schulz_many(ms, dtype=torch.bfloat16))
    want = newton_schulz_many(full, dtype=torch.bfloat16)
    return max(float((o.full_tensor().float() - w.float()).abs().max()) for o, w in zip(outs, want))
