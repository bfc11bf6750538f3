"""The ``memory`` suite (CUDA only): nl_layers memory layers against SDPA attention.

Throughput: each layer (``nl_layers.memory``: softmax attention through SDPA, the linear delta
memory, the Titans neural memory; HOPE's block when ``nl_layers`` has it) runs forward + backward on
a (batch, T, dim) input for T = 1K ... 32K with the total tokens per call held fixed; reported:
tokens/s (median of CUDA-event timings), peak memory (``torch.cuda.max_memory_allocated``), or the
error (e.g. out of memory) where a layer cannot run a length.

Every measurement prints a line as it finishes; a layer whose measurement at one length took over
``SECONDS_PER_LENGTH`` seconds is skipped at the longer lengths (recorded with the reason).

Recall: the ``recall_titans`` task (associative recall through a Titans memory) trained with
AdamW and M3 (when deepopt has it) for ``recall_steps`` steps; reported: held-out accuracy.

Example (the pieces that run anywhere):
    >>> shapes = length_schedule(tokens=8192, lengths=(1024, 4096))
    >>> shapes
    [(8, 1024), (2, 4096)]
    >>> tokens_per_second(tokens=1000, ms=10.0)
    100000.0
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Callable, Sequence

import torch
from torch import nn

from .environment import describe
from .report import markdown_table, print_table, write_json
from .speed import time_cuda

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
TOKENS_PER_CALL = 65_536
DIM, HEADS = 512, 8
SECONDS_PER_LENGTH = 60.0


def length_schedule(tokens: int = TOKENS_PER_CALL, lengths: Sequence[int] = LENGTHS) -> list[tuple[int, int]]:
    """(batch, T) pairs with batch * T = ``tokens`` (batch >= 1)."""
    return [(max(1, tokens // t), t) for t in lengths]


def tokens_per_second(tokens: int, ms: float) -> float:
    return tokens / (ms * 1e-3)


def layer_builders(dim: int = DIM, heads: int = HEADS) -> dict[str, Callable[[], nn.Module]]:
    """name -> constructor of each layer measured (those ``nl_layers`` provides now)."""
    memory = importlib.import_module("nl_layers.memory")
    builders = {
        "SDPA attention": lambda: memory.AttentionMemory(dim, heads=heads, impl="sdpa"),
        "linear memory (delta)": lambda: memory.LinearMemory(dim, heads=heads, rule="delta"),
        "Titans neural memory": lambda: memory.NeuralMemory(dim, heads=heads, chunk_size=64),
    }
    nl_layers = importlib.import_module("nl_layers")
    for name in ("HopeBlock", "Hope"):
        if hasattr(nl_layers, name):
            cls = getattr(nl_layers, name)
            builders[f"HOPE block ({name})"] = lambda c=cls: c(dim, heads)
            break
    return builders


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def measure_layer(build: Callable[[], nn.Module], batch: int, length: int, dim: int, device: str,
                  dtype: torch.dtype = torch.bfloat16, warmup: int = 2, repeats: int = 5,
                  timer: Callable = time_cuda) -> dict:
    """tokens/s and peak memory of forward + backward at (batch, length, dim)."""
    layer = build().to(device=device, dtype=dtype)
    x = torch.randn(batch, length, dim, device=device, dtype=dtype, requires_grad=True)

    def step():
        _output(layer(x)).float().square().mean().backward()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    ms = timer(step, warmup, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
    return {"tokens_per_s": tokens_per_second(batch * length, ms), "ms": ms, "peak_GiB": peak}


def recall_accuracy(device: str, steps: int, optimizers: Sequence[str] = ("AdamW", "M3")) -> dict[str, float | str]:
    """Held-out recall accuracy after ``steps`` steps of each optimizer on ``recall_titans``."""
    from .optimizers import available_optimizers, build_optimizer
    from .tasks import get_task

    task = get_task("recall_titans")
    specs = available_optimizers()
    out: dict[str, float | str] = {}
    for name in optimizers:
        if name not in specs:
            out[name] = "not available"
            continue
        print(f"memory: recall_titans with {name} for {steps} steps", flush=True)
        problem = task.build(0, device)
        opt = build_optimizer(specs[name], problem.model, task.lr_centres, task.muon_exclude)
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            problem.train_loss(step).backward()
            opt.step()
        out[name] = problem.eval_accuracy()
    return out


def memory_table(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["layer", "batch x T", "tokens/s", "ms", "peak GiB"]
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["layer"], f"{r['batch']} x {r['length']}", r["error"][:50], "", ""])
        else:
            peak = "-" if r["peak_GiB"] is None else f"{r['peak_GiB']:.2f}"
            out.append([r["layer"], f"{r['batch']} x {r['length']}", f"{r['tokens_per_s']:,.0f}", f"{r['ms']:.1f}", peak])
    return header, out


def run_memory(device: str = "cuda", lengths: Sequence[int] = LENGTHS, tokens: int = TOKENS_PER_CALL,
               recall_steps: int = 2000, seconds_per_length: float = SECONDS_PER_LENGTH, dim: int = DIM,
               heads: int = HEADS, timer: Callable | None = None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Measure every layer at every length, printing one line per measurement as it finishes.

    A layer whose measurement at one length took longer than ``seconds_per_length`` (warm-up and
    repeats together) is not run at the longer lengths: those rows say ``skipped`` and why (the
    chunked memories' loops make a 32 K sequence minutes long, which once left this suite silent for
    over 500 s on an H200)."""
    rows = []
    for name, build in layer_builders(dim, heads).items():
        too_slow = None
        for batch, length in length_schedule(tokens, lengths):
            row = {"layer": name, "batch": batch, "length": length}
            if too_slow is not None:
                row["error"] = f"skipped: length {too_slow[0]} took {too_slow[1]:.0f} s > {seconds_per_length:.0f} s"
                rows.append(row)
                continue
            start = time.perf_counter()
            try:
                kwargs = {} if timer is None else {"timer": timer}
                row.update(measure_layer(build, batch, length, dim, device, dtype=dtype, **kwargs))
            except Exception as err:  # out of memory at long lengths is a result, not a crash
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            took = time.perf_counter() - start
            if took > seconds_per_length:
                too_slow = (length, took)
            rows.append(row)
            print(f"memory: {name} at {batch} x {length}: "
                  + (row["error"][:80] if "error" in row else f"{row['tokens_per_s']:,.0f} tokens/s") + f" ({took:.1f} s)",
                  flush=True)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return {"rows": rows, "dim": dim, "heads": heads, "dtype": str(dtype).replace("torch.", ""),
            "seconds_per_length": seconds_per_length,
            "recall_accuracy": recall_accuracy(device, recall_steps) if recall_steps else {}, "recall_steps": recall_steps}


def run_memory_suite(args, out_dir: str) -> dict:
    start = time.time()
    result = run_memory(device=args.device, recall_steps=args.steps or 2000)
    result.update(describe([0], command=args.command_line, device=args.device), suite="memory", wall_seconds=time.time() - start)
    write_json(result, os.path.join(out_dir, "results.json"))
    header, rows = memory_table(result["rows"])
    acc = ", ".join(f"{k}: {v if isinstance(v, str) else f'{v:.3f}'}" for k, v in result["recall_accuracy"].items())
    md = ["# `memory` suite results", "", f"- command: `{result['command']}`",
          f"- date: {result['date']}; machine: {result['machine'].get('gpu')}; torch {result['versions']['torch']}",
          f"- dim {DIM}, {HEADS} heads, bf16, {TOKENS_PER_CALL:,} tokens per call", "",
          markdown_table(header, rows), "", f"Associative recall accuracy after {result['recall_steps']} steps: {acc}", ""]
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(md))
    print_table("memory: forward + backward", header, rows)
    return result
