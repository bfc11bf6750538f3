"""GPU time of each kernel of one optimizer step, fp32 against bf16 (GPU): where a fused step spends it.

One step of each optimizer on the speed suite's GPT-like list (:func:`benchmarks.speed.gpt_param_shapes`,
``--layers`` blocks) is profiled after a warm-up; the kernels are grouped by name and their GPU
times summed (median of ``--repeats`` profiled steps), beside the torch optimizer the step is
compared with. A kernel whose bf16 time is well above its fp32 time, on half the bytes, is a
kernel bound by something other than memory traffic. A second table puts each step's kernel time
beside its wall time, timed two ways: one step between CUDA events with a synchronisation after it
(the speed suite's latency: the host's work before the first launch counts) and ``--chain`` steps
back to back (throughput: the host runs ahead, as in a training loop that is bound by the GPU).
The difference between the kernel sum and the one-step time is the GPU's idle time in a step.

Usage: ``python -m benchmarks.optimizer_kernels [--optimizers DeepMomentum AdamMemory] [--layers 8]``.

Example (the table on made-up numbers):
    >>> print(table({"K": {"float32": 1.0, "bfloat16": 0.5}})[-1])
    | K | 1.000 | 0.500 | 0.50x |
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from .speed import gpt_param_shapes, speed_optimizers

DTYPES = (torch.float32, torch.bfloat16)


def _optimizer(make, shapes, dtype):
    torch.manual_seed(0)
    params = [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True) for _, s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    return opt


def wall_ms(make, shapes, dtype, repeats: int, chain: int, nonfinite: str | None = None) -> tuple[float, float]:
    """(median ms of one synchronised step, median ms per step of ``chain`` steps back to back);
    ``nonfinite``: a deepopt optimizer's policy for the timing (None: its default)."""
    opt = _optimizer(make, shapes, dtype)
    if nonfinite is not None:
        opt.nonfinite = nonfinite
    one, many = [], []
    for _ in range(repeats):
        for n, out in ((1, one), (chain, many)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                opt.step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / n)
    return sorted(one)[len(one) // 2], sorted(many)[len(many) // 2]


def kernel_ms(make, shapes, dtype, repeats: int) -> dict[str, float]:
    """kernel name -> median GPU ms per step of an optimizer from ``make(params)``."""
    opt = _optimizer(make, shapes, dtype)
    runs = []
    for _ in range(repeats):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        times = defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                times[e.name[:70]] += e.device_time_total / 1e3
        runs.append(times)
    names = set().union(*runs)
    return {n: sorted(r.get(n, 0.0) for r in runs)[len(runs) // 2] for n in names}


DEEP_TILES = [(1024, 8), (1024, 4), (512, 4), (512, 8), (256, 4), (256, 2), (2048, 8)]
#: the inner kernel's (elements per program, elements per slice), at its INNER_WARPS
DEEP_SLICES = [(2048, 256), (4096, 256), (8192, 256), (2048, 512), (4096, 512), (8192, 512), (2048, 128)]


def _sweep(optimizer: str, attr: str, values, kernels: list[str], header: str, shapes, repeats: int) -> None:
    """One optimizer's kernels' ms per step with ``deepopt.levels.deep.fused.<attr>`` set to each value."""
    from deepopt.levels.deep import fused

    make = speed_optimizers([optimizer], "cuda")[optimizer]
    saved = getattr(fused, attr)
    print(f"\n| {header} | dtype | " + " | ".join(f"{k} ms" for k in kernels) + " |\n|---|---|" + "---|" * len(kernels))
    try:
        for value in values:
            setattr(fused, attr, value)
            for dtype in DTYPES:
                t = kernel_ms(make, shapes, dtype, repeats)
                print(f"| {value} | {str(dtype).split('.')[-1]} | " + " | ".join(f"{t.get(k, 0):.3f}" for k in kernels)
                      + " |")
    finally:
        setattr(fused, attr, saved)


def deep_tiles(shapes, repeats: int) -> None:
    """DeepMomentum's inner and read kernel ms per step at each (elements per program, warps), then
    the inner kernel at each (elements per program, slice)."""
    from deepopt.levels.deep import fused

    _sweep("DeepMomentum", "TILE", DEEP_TILES, ["deep_inner_kernel", "deep_read_kernel"], "tile (block, warps)",
           shapes, repeats)
    _sweep("DeepMomentum", "INNER_SLICE", DEEP_SLICES, ["deep_inner_kernel"],
           f"inner (block, slice), {fused.INNER_WARPS} warps", shapes, repeats)


#: the factored statistics' tiled pass: (rows per program, rows per chunk, columns, warps)
FACTORED_TILES = [(128, 8, 256, 8), (256, 32, 64, 4), (512, 64, 64, 4), (512, 64, 64, 2), (1024, 64, 64, 4),
                  (512, 128, 64, 4), (1024, 128, 64, 4), (512, 128, 32, 2), (512, 64, 128, 4), (1024, 64, 64, 2)]


def factored_tiles(shapes, repeats: int) -> None:
    """The factored memory's tiled pass (row and column sums of ``g^2``) ms per step at each tile."""
    _sweep("DeepMomentum.pretrained(factored)", "FACTORED_TILE", FACTORED_TILES, ["factored_sums_kernel"],
           "tile (rows, chunk rows, columns, warps)", shapes, repeats)


def table(rows: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| kernel | fp32 ms | bf16 ms | bf16 / fp32 |", "|---|---|---|---|"]
    for name, t in rows.items():
        a, b = t.get("float32", 0.0), t.get("bfloat16", 0.0)
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f}x |" if a else f"| {name} | {a:.3f} | {b:.3f} | - |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizers", nargs="+", default=["AdamW(fused)", "SGD(fused)", "AdamMemory", "MomentumMemory",
                                                      "DeepMomentum", "DeltaMomentum"])
    p.add_argument("--layers", type=int, default=8, help="blocks of the GPT-like list (dim 2048)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chain", type=int, default=10, help="steps back to back in the throughput timing")
    p.add_argument("--deep-tiles", action="store_true", help="DeepMomentum's inner and read kernels at several tiles")
    p.add_argument("--factored-tiles", action="store_true", help="the factored memory's tiled pass at several tiles")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("optimizer_kernels: needs a CUDA device; nothing to do")
        return
    shapes = gpt_param_shapes(layers=a.layers)
    if a.deep_tiles:
        deep_tiles(shapes, a.repeats)
    if a.factored_tiles:
        factored_tiles(shapes, a.repeats)
    makers = speed_optimizers(a.optimizers, "cuda")
    print(f"{torch.cuda.get_device_name()}, {sum(s[0] * s[1] for _, s in shapes) / 1e9:.2f} B params, "
          f"median of {a.repeats} profiled steps")
    walls = ["| optimizer | dtype | kernels ms | one step ms (synchronised) | back to back ms/step |", "|---|---|---|---|---|"]
    for name in a.optimizers:
        rows: dict[str, dict[str, float]] = defaultdict(dict)
        for dtype in DTYPES:
            for kernel, ms in kernel_ms(makers[name], shapes, dtype, a.repeats).items():
                rows[kernel][str(dtype).split(".")[-1]] = ms
        total = {d: sum(t.get(d, 0.0) for t in rows.values()) for d in ("float32", "bfloat16")}
        rows = dict(sorted(rows.items(), key=lambda kv: -max(kv[1].values())))
        rows["(all kernels)"] = total
        print(f"\n## {name}\n")
        print("\n".join(table(rows)))
        for dtype in DTYPES:
            d = str(dtype).split(".")[-1]
            one, many = wall_ms(makers[name], shapes, dtype, a.repeats * 3, a.chain)
            walls.append(f"| {name} | {d} | {total[d]:.3f} | {one:.3f} | {many:.3f} |")
            if hasattr(makers[name]([torch.zeros(1, requires_grad=True)]), "nonfinite"):
                one, many = wall_ms(makers[name], shapes, dtype, a.repeats * 3, a.chain, "ignore")
                walls.append(f"| {name} (nonfinite='ignore') | {d} | - | {one:.3f} | {many:.3f} |")
    print("\n## Kernel time beside wall time\n")
    print("\n".join(walls))


if __name__ == "__main__":
    main()
