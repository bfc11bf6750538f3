"""deepopt under FSDP2 on several GPUs (NCCL): equality with one process, and step time.

Run with ``torchrun --nproc_per_node=2 -m benchmarks.fsdp_step_time [--out DIR]``. Two parts:

1. **Equality**: every optimizer in ``deepopt.OPTIMIZERS`` on a small MLP (float32), FSDP2 over
   all ranks with each rank holding a slice of the batch, against one process on the full batch
   (computed on every rank); reports the largest parameter difference after a few steps.
2. **Step time**: ``opt.step()`` on a GPT-like list of matrices (d_model, layers given), with random
   gradients preset, for MuonMemory, M3 and fused AdamW: one GPU (rank 0 alone, plain tensors)
   against FSDP2 over all ranks (DTensor shards; Newton-Schulz spread over the ranks by default, and
   the replicated form, ``distributed_ns="replicate"``, for comparison; see deepopt.distributed).
   CUDA events, warm-up, median of repeats.

Writes ``fsdp.json`` and ``fsdp.md`` (rank 0) to ``--out``, by default a fresh
``./runs/distributed-<time>/``; ``--update-results`` rewrites the committed ``benchmarks/results/distributed/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import deepopt

from .outdir import add_arguments as add_out_arguments, announce, run_dir

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU + gloo only for a smoke test


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 10)).to(DEVICE)


def build(name: str, model: nn.Module, **kw) -> torch.optim.Optimizer:
    cls = deepopt.OPTIMIZERS[name]
    lr = {"AdamMemory": 1e-3, "M3": 1e-3, "PreconditionedMomentum": 1e-3}.get(name, 0.02)
    if getattr(cls, "requires_model", False):
        return cls(model.parameters(), lr=lr, model=model, **kw)
    return cls(model.parameters(), lr=lr, **kw)


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    return fully_shard(model)


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def equality(rank: int, world: int, steps: int = 5) -> dict[str, float]:
    out = {}
    for name in sorted(deepopt.OPTIMIZERS):
        ref = mlp()
        sharded = shard(copy.deepcopy(ref))
        opt_ref, opt = build(name, ref), build(name, sharded)
        for s in range(steps):
            g = torch.Generator(device=DEVICE).manual_seed(s)
            x = torch.randn(64, 32, device=DEVICE, generator=g)
            y = torch.randint(0, 10, (64,), device=DEVICE, generator=g)
            for m, o, xb, yb in ((ref, opt_ref, x, y), (sharded, opt, x.chunk(world)[rank], y.chunk(world)[rank])):
                o.zero_grad()
                nn.functional.cross_entropy(m(xb), yb).backward()
                o.step()
        out[name] = max(float((full(a) - full(b)).abs().max()) for a, b in zip(sharded.parameters(), ref.parameters()))
    return out


class Stack(nn.Module):
    """The matrices of a GPT-like model (attention qkv/out, MLP in/out per layer), no forward."""

    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.qkv = nn.Parameter(torch.randn(3 * d, d, device=DEVICE) * 0.02)
            block.out = nn.Parameter(torch.randn(d, d, device=DEVICE) * 0.02)
            block.up = nn.Parameter(torch.randn(4 * d, d, device=DEVICE) * 0.02)
            block.down = nn.Parameter(torch.randn(d, 4 * d, device=DEVICE) * 0.02)
            self.layers.append(block)


def time_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], repeats: int, sync: bool) -> float:
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(repeats):
        if sync:  # all ranks start each timed step together
            dist.barrier()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            opt.step()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def timings(rank: int, world: int, d: int, layers: int, repeats: int) -> dict[str, dict[str, float]]:
    makers = {
        "MuonMemory": lambda ps: deepopt.MuonMemory(ps, lr=0.02, nonfinite="ignore"),
        "M3": lambda ps: deepopt.M3(ps, lr=1e-3, nonfinite="ignore"),
        "MuonMemory (replicate)": lambda ps: deepopt.MuonMemory([{"params": ps, "distributed_ns": "replicate"}],
                                                                lr=0.02, nonfinite="ignore"),
        "M3 (replicate)": lambda ps: deepopt.M3([{"params": ps, "distributed_ns": "replicate"}], lr=1e-3,
                                                nonfinite="ignore"),
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=DEVICE == "cuda"),
        "torch Muon": lambda ps: torch.optim.Muon(ps, lr=0.02),  # one GPU only (no DTensor support)
    }
    out: dict[str, dict[str, float]] = {}
    for name, make in makers.items():
        row: dict[str, float] = {}
        if rank == 0 and "replicate" not in name:  # one GPU: the same step as without "(replicate)"
            torch.manual_seed(0)
            params = list(Stack(d, layers).parameters())
            row["one_gpu_ms"] = time_step(make(params), params, repeats, sync=False)
            del params
        dist.barrier()
        if name != "torch Muon":
            torch.manual_seed(0)
            params = list(shard_stack(Stack(d, layers)).parameters())
            ms = torch.tensor(time_step(make(params), params, repeats, sync=True), device=DEVICE)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            row[f"fsdp_{world}_gpus_ms"] = float(ms)
            del params
        out[name] = row
    return out


def shard_stack(model: Stack) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    return fully_shard(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_arguments(ap, "distributed")
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    args.out = run_dir("distributed", args.out, args.update_results)
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    t0 = time.time()
    eq = equality(rank, world)
    tm = timings(rank, world, args.d_model, args.layers, args.repeats)
    if rank == 0:
        n_params = args.layers * 12 * args.d_model * args.d_model
        card = torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "CPU"
        result = {"machine": f"{world} x {card}", "torch": torch.__version__,
                  "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
                  "command": f"torchrun --nproc_per_node={world} -m benchmarks.fsdp_step_time --d-model {args.d_model} "
                             f"--layers {args.layers} --repeats {args.repeats}",
                  "matrix_params": n_params, "equality_max_abs_diff_float32": eq, "step_ms": tm,
                  "seconds": round(time.time() - t0, 1)}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fsdp.json"), "w") as f:
            json.dump(result, f, indent=2)
        lines = [f"# deepopt under FSDP2: {result['machine']}, torch {result['torch']}, {result['date']}", "",
                 f"`{result['command']}`", "",
                 f"Step time on {n_params / 1e9:.2f} B matrix parameters (d={args.d_model}, {args.layers} layers), "
                 "median of repeats, max over ranks:", "",
                 f"| optimizer | 1 GPU (ms) | FSDP2, {world} GPUs (ms) |", "|---|---|---|"]
        for name, row in tm.items():
            sharded = row.get(f"fsdp_{world}_gpus_ms")
            one = row.get("one_gpu_ms")
            lines.append(f"| {name} | " + (f"{one:.1f} | " if one else "as above | ")
                         + (f"{sharded:.1f} |" if sharded else "not run |"))
        lines += ["", "Largest parameter difference, FSDP2 vs one process on the full batch (float32, 5 steps):", "",
                  "| optimizer | max abs diff |", "|---|---|"]
        lines += [f"| {k} | {v:.2e} |" for k, v in eq.items()]
        with open(os.path.join(args.out, "fsdp.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        announce(args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
