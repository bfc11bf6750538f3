"""Host overhead of an optimizer step: many small tensors, where the arithmetic costs nothing.

``python -m benchmarks.host_overhead`` (CPU, one thread): 145 parameters of 64 elements (the
tensor count of the speed suite's GPT-like list), every optimizer stepped once per round,
interleaved (load from other processes hits all alike), median microseconds per step over the
rounds. Rows:

* torch's SGD (momentum 0.9) and AdamW, ``foreach=True`` and ``fused=True`` (CPU kernels);
* deepopt's MomentumMemory and AdamMemory as they run on the CPU (``impl="auto"``: the foreach
  path), with the non-finite check (``nonfinite="skip"``) and without (``"ignore"``);
* the same optimizers on their fused-kernel path with the kernel launch itself replaced by a
  no-op (``[host]`` rows): everything the host does per step on CUDA (the shell, step counters,
  per-row scalars, launch tables, the non-finite flag) is timed, nothing of the kernel. These rows
  measure the Python around the kernels; their parameters are not updated.

Example:
    >>> rows = run_host_overhead(tensors=4, numel=8, rounds=3, names=["SGD(foreach)", "MomentumMemory"])
    >>> sorted(rows) == ["MomentumMemory", "SGD(foreach)"] and all(v > 0 for v in rows.values())
    True
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Callable, Iterator, Sequence

import torch

import deepopt


def _makers() -> dict[str, Callable]:
    sgd = dict(lr=1e-3, momentum=0.9)
    return {
        "SGD(foreach)": lambda ps: torch.optim.SGD(ps, foreach=True, **sgd),
        "SGD(fused)": lambda ps: torch.optim.SGD(ps, fused=True, **sgd),
        "AdamW(foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0, foreach=True),
        "AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0, fused=True),
        "MomentumMemory": lambda ps: deepopt.MomentumMemory(ps, **sgd),
        "MomentumMemory(ignore)": lambda ps: deepopt.MomentumMemory(ps, nonfinite="ignore", **sgd),
        "AdamMemory": lambda ps: deepopt.AdamMemory(ps, lr=1e-3),
        "AdamMemory(ignore)": lambda ps: deepopt.AdamMemory(ps, lr=1e-3, nonfinite="ignore"),
        "MomentumMemory[host]": lambda ps: deepopt.MomentumMemory(ps, impl="triton", **sgd),
        "MomentumMemory[host](ignore)": lambda ps: deepopt.MomentumMemory(ps, impl="triton", nonfinite="ignore", **sgd),
        "AdamMemory[host]": lambda ps: deepopt.AdamMemory(ps, lr=1e-3, impl="triton"),
        "AdamMemory[host](ignore)": lambda ps: deepopt.AdamMemory(ps, lr=1e-3, impl="triton", nonfinite="ignore"),
        "DeltaMomentum[host]": lambda ps: deepopt.DeltaMomentum(ps, lr=1e-3, impl="triton"),
    }


@contextlib.contextmanager
def no_kernels() -> Iterator[None]:
    """Fused steps run as on CUDA, but every Triton launch only builds its tables (no kernel)."""
    import importlib

    L = importlib.import_module("deepopt.kernels.launch")

    def host_only(kernel_fn, rows, scal, *args, block=L.BLOCK, found=None, **kw):
        rows.tables(block)

    saved = L.launch, L.FusedStep.use_kernel
    L.launch = host_only
    L.FusedStep.use_kernel = lambda self, params: self.impl not in ("reference", "foreach")
    try:
        yield
    finally:
        L.launch, L.FusedStep.use_kernel = saved


def run_host_overhead(tensors: int = 145, numel: int = 64, rounds: int = 200, warmup: int = 5,
                      names: Sequence[str] | None = None) -> dict[str, float]:
    """Median microseconds per ``step()`` of each optimizer (see the module docstring)."""
    makers = _makers()
    names = list(names or makers)
    live = []
    for name in names:
        params = [torch.randn(numel, requires_grad=True) for _ in range(tensors)]
        for p in params:
            p.grad = torch.randn_like(p)
        live.append((name, makers[name](params)))
    times: dict[str, list[float]] = {n: [] for n in names}
    with no_kernels():
        for r in range(warmup + rounds):
            for name, opt in live:
                start = time.perf_counter()
                opt.step()
                if r >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e6)
    return {n: statistics.median(ts) for n, ts in times.items()}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensors", type=int, default=145)
    ap.add_argument("--numel", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--optimizers", nargs="+")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = run_host_overhead(args.tensors, args.numel, args.rounds, names=args.optimizers)
    print(f"host overhead: {args.tensors} tensors of {args.numel} elements, us/step (median of {args.rounds})")
    for name, us in rows.items():
        print(f"  {name:30s} {us:9.1f}")


if __name__ == "__main__":
    main()
