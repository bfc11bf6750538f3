"""Tokens per second of every nl_layers layer on the CPU, one thread, at one size (B=4, T=256, dim=64).

Each layer is built, checked against its reference on a short float64 input (chunked vs
token-by-token; SDPA vs the memory form), then timed in float32: forward without gradients, and
forward + backward. Reported: the median over repeats after a warm-up, and the spread (min-max).
The machine may be shared: the load average before and after the run is recorded beside the numbers.

Run:
    python -m benchmarks.nl_layers_cpu_throughput [--repeats 5] [--out FILE.md | --update-results]

(default ``./runs/nl_layers_cpu_throughput-<time>/nl_layers_cpu_throughput.md``; ``--update-results``
rewrites the committed ``benchmarks/results/nl_layers_cpu_throughput.md``)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import nl_layers

from .environment import describe
from .outdir import RESULTS, announce, check_out, run_dir

B, T, DIM, HEADS = 4, 256, 64, 4


def layers() -> dict[str, Callable[[], nn.Module]]:
    """name -> constructor, at width DIM with HEADS heads."""
    return {
        "LinearMemory hebbian (chunk 64)": lambda: nl_layers.LinearMemory(DIM, HEADS, rule="hebbian", chunk_size=64),
        "LinearMemory delta (chunk 64)": lambda: nl_layers.LinearMemory(DIM, HEADS, rule="delta", chunk_size=64),
        "LinearMemory dgd (chunk 64)": lambda: nl_layers.LinearMemory(DIM, HEADS, rule="dgd", chunk_size=64),
        "NeuralMemory torch.func (chunk 16)": lambda: nl_layers.NeuralMemory(DIM, HEADS, chunk_size=16, grad_impl="func"),
        "NeuralMemory analytic (chunk 16)": lambda: nl_layers.NeuralMemory(DIM, HEADS, chunk_size=16, grad_impl="analytic"),
        "NeuralMemory analytic (chunk 64)": lambda: nl_layers.NeuralMemory(DIM, HEADS, chunk_size=64, grad_impl="analytic"),
        "AttentionMemory sdpa": lambda: nl_layers.AttentionMemory(DIM, HEADS, impl="sdpa"),
        "AttentionMemory memory form": lambda: nl_layers.AttentionMemory(DIM, HEADS, impl="memory", chunk_size=64),
        "CMS 3 levels (static)": lambda: nl_layers.CMS(DIM, periods=(1, 4, 16)),
        "CMS 3 levels (in-context 16/64)": lambda: nl_layers.CMS(DIM, periods=(1, 4, 16), in_context=(None, 16, 64)),
        "SelfModifyingTitans (chunk 16)": lambda: nl_layers.SelfModifyingTitans(DIM, HEADS, chunk_size=16),
        "SelfModifyingTitans (chunk 64)": lambda: nl_layers.SelfModifyingTitans(DIM, HEADS, chunk_size=64),
        "HopeBlock (chunk 16, CMS 1/4)": lambda: nl_layers.HopeBlock(DIM, HEADS, chunk_size=16, cms_periods=(1, 4)),
        "HopeAttentionBlock (CMS 1/4)": lambda: nl_layers.HopeAttentionBlock(DIM, HEADS, cms_periods=(1, 4)),
    }


def references() -> dict[str, Callable[[], nn.Module]]:
    """Token-by-token references, timed too (forward only) to show what the chunked forms save."""
    return {
        "LinearMemory delta, recurrent reference": lambda: nl_layers.LinearMemory(DIM, HEADS, rule="delta"),
        "NeuralMemory, recurrent reference": lambda: nl_layers.NeuralMemory(DIM, HEADS, chunk_size=16),
        "SelfModifyingTitans, recurrent reference": lambda: nl_layers.SelfModifyingTitans(DIM, HEADS, chunk_size=16),
    }


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def check(name: str, build: Callable[[], nn.Module]) -> float:
    """Largest difference between the fast path and its reference on a float64 input (T=37)."""
    torch.manual_seed(0)
    layer = build().double()
    x = torch.randn(2, 37, DIM, dtype=torch.float64)
    with torch.no_grad():
        fast = _out(layer(x))
        if isinstance(layer, nl_layers.AttentionMemory):
            other = nl_layers.AttentionMemory(DIM, HEADS, impl="memory" if layer.impl == "sdpa" else "sdpa").double()
            other.load_state_dict(layer.state_dict())
            ref = _out(other(x))
        elif isinstance(layer, nl_layers.CMS) and layer.engine is not None:
            ref = layer(x, mode="recurrent")
        elif isinstance(layer, (nl_layers.LinearMemory, nl_layers.NeuralMemory, nl_layers.SelfModifyingTitans)):
            ref = _out(layer(x, mode="recurrent"))
        else:
            return float("nan")  # composite blocks: their parts are checked
    return float((fast - ref).abs().max())


def time_layer(build: Callable[[], nn.Module], repeats: int, backward: bool, mode: str | None = None) -> list[float]:
    """Seconds per call (one warm-up call first)."""
    torch.manual_seed(0)
    layer = build()
    x = torch.randn(B, T, DIM, requires_grad=backward)
    kwargs = {} if mode is None else {"mode": mode}

    def call():
        if backward:
            _out(layer(x, **kwargs)).square().mean().backward()
        else:
            with torch.no_grad():
                layer(x, **kwargs)

    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def _fmt(times: list[float]) -> str:
    tok = [B * T / t for t in times]
    return f"{statistics.median(tok):,.0f} ({min(tok):,.0f}-{max(tok):,.0f})"


def run(repeats: int) -> str:
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    rows = []
    for name, build in layers().items():
        err = check(name, build)
        fwd = time_layer(build, repeats, backward=False)
        both = time_layer(build, repeats, backward=True)
        rows.append(f"| {name} | {_fmt(fwd)} | {_fmt(both)} | {err:.1e} |")
    ref_rows = []
    for name, build in references().items():
        fwd = time_layer(build, max(1, repeats // 2), backward=False, mode="recurrent")
        ref_rows.append(f"| {name} | {_fmt(fwd)} |")
    load_after = os.getloadavg()
    info = describe(seeds=[0], command="python -m benchmarks.nl_layers_cpu_throughput " + f"--repeats {repeats}")
    m, v = info["machine"], info["versions"]
    lines = [
        "# nl_layers: CPU throughput, one thread",
        "",
        f"B={B}, T={T}, dim={DIM}, heads={HEADS}, float32, `torch.set_num_threads(1)`. Tokens/s = B*T / seconds per call:",
        f"median over {repeats} repeats after one warm-up call (min-max in brackets). Fast-vs-reference error:",
        "largest |difference| between the layer's fast path and its token-by-token reference (SDPA vs the",
        "memory form for attention) on a float64 input of T=37; `nan` for composite blocks (their parts are checked).",
        "",
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores (shared; load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after). torch {v['torch']}, Python {v['python']}, commit {v.get('git_commit')}. "
        f"{info['date']}. Seed 0. Command: `{info['command']}`.",
        "",
        "| layer | forward tokens/s | forward+backward tokens/s | fast vs reference |",
        "|---|---|---|---|",
        *rows,
        "",
        "Token-by-token references (forward, no gradients), for scale:",
        "",
        "| reference | forward tokens/s |",
        "|---|---|",
        *ref_rows,
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="the Markdown file (default: a fresh ./runs/nl_layers_cpu_throughput-<time>/)")
    parser.add_argument("--update-results", action="store_true",
                        help="rewrite the committed benchmarks/results/nl_layers_cpu_throughput.md")
    args = parser.parse_args(argv)
    check_out(args.out, args.update_results)
    name = "nl_layers_cpu_throughput.md"
    path = args.out or (os.path.join(RESULTS, name) if args.update_results
                        else os.path.join(run_dir("nl_layers_cpu_throughput"), name))
    text = run(args.repeats)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    announce(path)


if __name__ == "__main__":
    main()
