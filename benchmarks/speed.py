"""The ``speed`` suite (CUDA only): optimizer step time on a GPT-like parameter list.

The list: d = 2048, 24 layers of q, k, v, o (d x d), fc (4d x d), proj (d x 4d),
plus a 50,304 x d embedding: 145 tensors, 1.31 B parameters (1.21 B in matrices). Gradients are
random (never zeros). Each optimizer is warmed up, then ``repeats`` steps are timed one by one
with CUDA events and the median is reported, with fused AdamW, fused SGD and torch Muon in the
same run, in fp32 and bf16. ``torch.optim.Muon`` gets the 144 matrices; deepopt's MuonMemory and M3
get all 145 tensors with the embedding in an ``orthogonalize=False`` group (element-wise, as a
Muon user would hand it to AdamW).

Roofline: an element-wise step must read the parameter, the gradient and every state tensor and
write the parameter and the states, so it moves at least
    bytes/param = 2 p + g + 2 s
(p, g: bytes of a parameter and a gradient element; s: optimizer-state bytes per parameter,
measured from ``optimizer.state``): 20 B for SGD momentum and 28 B for AdamW in fp32. Achieved
GB/s = bytes/param x params / time, reported beside the device-to-device copy bandwidth measured in
the same run. Newton-Schulz steps are matmul-bound: per iteration on an m x n matrix (m <= n)
they cost 4 m^2 n + 2 m^3 flops; their floor is flops / the measured bf16 matmul rate.

Example (the pieces that run anywhere):
    >>> bytes_per_param(param_bytes=4, grad_bytes=4, state_bytes=4)  # SGD momentum, fp32
    20
    >>> sum(1 for _ in gpt_param_shapes()), round(sum(math.prod(s) for _, s in gpt_param_shapes()) / 1e9, 2)
    (145, 1.31)
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable, Sequence

import torch

from .environment import describe
from .optimizers import ORTHOGONALIZING, deepopt_registry, make_deepopt
from .report import markdown_table, print_table, write_json

NS_STEPS = 5


def gpt_param_shapes(dim: int = 2048, layers: int = 24, vocab: int = 50_304) -> list[tuple[str, tuple[int, int]]]:
    """(name, shape) of the GPT-like list: the embedding, then 6 matrices per layer."""
    shapes = [("embed", (vocab, dim))]
    for layer in range(layers):
        for name, shape in (("q", (dim, dim)), ("k", (dim, dim)), ("v", (dim, dim)), ("o", (dim, dim)),
                            ("fc", (4 * dim, dim)), ("proj", (dim, 4 * dim))):
            shapes.append((f"h{layer}.{name}", shape))
    return shapes


def bytes_per_param(param_bytes: int, grad_bytes: int, state_bytes: float) -> float:
    """Bytes an element-wise step must move per parameter: read+write the parameter and states, read the grad."""
    return 2 * param_bytes + grad_bytes + 2 * state_bytes


def state_bytes_per_param(optimizer, params: Sequence[torch.Tensor]) -> float:
    """Optimizer-state bytes per parameter element: every non-scalar tensor in ``optimizer.state``
    (0-d tensors such as ``step`` counters are left out: they are not per-element traffic)."""
    total = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return total / max(1, sum(p.numel() for p in params))


def newton_schulz_flops(shapes: Sequence[tuple[int, int]], steps: int = NS_STEPS) -> int:
    """Flops of ``steps`` quintic Newton-Schulz iterations on each m x n matrix: 4 m^2 n + 2 m^3, m <= n."""
    total = 0
    for a, b in shapes:
        m, n = min(a, b), max(a, b)
        total += steps * (4 * m * m * n + 2 * m**3)
    return total


def time_cuda(fn: Callable[[], None], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(device: str, gib: float = 1.0) -> float:
    """Device-to-device copy GB/s, counting read + write."""
    src = torch.randn(int(gib * 2**30 / 4), device=device)
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), warmup=3, repeats=20)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: str, n: int = 8192) -> float:
    """bf16 n x n x n matmul rate in TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_cuda(lambda: a @ b, warmup=3, repeats=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def speed_optimizers(names: Sequence[str] | None = None) -> dict[str, Callable]:
    """name -> ``(params) -> optimizer`` for the speed suite; Muon gets only the matrices (see ``run_speed``)."""
    makers: dict[str, Callable] = {
        "AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "AdamW(foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "SGD(fused)": lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, fused=True),
        "Muon": lambda ps: torch.optim.Muon(ps, lr=1e-4),
    }
    for name, cls in sorted(deepopt_registry().items()):
        if getattr(cls, "requires_model", False):
            continue  # DGD needs layer inputs (a model), not a bare parameter list
        makers[name] = (lambda c: lambda ps: make_deepopt(c, ps, None, 1e-4))(cls)
    if names is not None:
        unknown = [n for n in names if n not in makers]
        if unknown:
            raise ValueError(f"unknown speed optimizers {unknown}; choose from {sorted(makers)}")
        makers = {n: makers[n] for n in names}
    return makers


def run_speed(device: str = "cuda", dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
              names: Sequence[str] | None = None, shapes=None, warmup: int = 3, repeats: int = 20) -> dict:
    """Time every optimizer's step (see module doc); returns rows and the measured ceilings."""
    shapes = shapes or gpt_param_shapes()
    ceilings = {"copy_GBps": copy_bandwidth(device), "bf16_matmul_TFLOPs": matmul_tflops(device)}
    matrix_shapes = [s for n, s in shapes if n != "embed"]
    rows = []
    for dtype in dtypes:
        for name, make in speed_optimizers(names).items():
            chosen = [(n, s) for n, s in shapes if not (name == "Muon" and n == "embed")]
            params = [torch.randn(s, device=device, dtype=dtype, requires_grad=True) for _, s in chosen]
            for p in params:
                p.grad = torch.randn_like(p)
            row = {"optimizer": name, "dtype": str(dtype).replace("torch.", ""),
                   "params": sum(p.numel() for p in params), "tensors": len(params)}
            try:
                if name in ORTHOGONALIZING and chosen[0][0] == "embed":  # the embedding stays element-wise,
                    opt = make([{"params": params[1:]}, {"params": params[:1], "orthogonalize": False}])  # as in Muon
                else:
                    opt = make(params)
                row["ms"] = time_cuda(opt.step, warmup, repeats)
                row["state_bytes_per_param"] = state_bytes_per_param(opt, params)
                row["bytes_per_param"] = bytes_per_param(params[0].element_size(), params[0].element_size(),
                                                         row["state_bytes_per_param"])
                row["GBps"] = row["bytes_per_param"] * row["params"] / (row["ms"] * 1e-3) / 1e9
                row["copy_fraction"] = row["GBps"] / ceilings["copy_GBps"]
                row["memory_floor_ms"] = row["bytes_per_param"] * row["params"] / (ceilings["copy_GBps"] * 1e9) * 1e3
                if name in ("Muon", "MuonMemory", "M3"):
                    flops = newton_schulz_flops(matrix_shapes)  # M3's slow NS runs only every f steps
                    row["ns_floor_ms"] = flops / (ceilings["bf16_matmul_TFLOPs"] * 1e12) * 1e3
                del opt
            except Exception as err:  # e.g. out of memory for a heavy optimizer: reported, not fatal
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            del params
            torch.cuda.empty_cache()
    base = {r["dtype"]: r.get("ms") for r in rows if r["optimizer"] == "Muon"}
    for r in rows:
        if r.get("ms") and base.get(r["dtype"]):
            r["ratio_to_muon"] = r["ms"] / base[r["dtype"]]
    return {"ceilings": ceilings, "rows": rows}


def speed_table(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the speed table (``-`` where a number does not apply)."""
    header = ["optimizer", "dtype", "params (B)", "ms/step", "floor ms (memory / NS)", "GB/s", "% of copy",
              "state B/param", "x Muon"]

    def f(value, fmt):
        return "-" if value is None else format(value, fmt)

    out = []
    for r in rows:
        if "error" in r:
            out.append([r["optimizer"], r["dtype"], f(r["params"] / 1e9, ".2f"), r["error"][:60]] + [""] * 5)
            continue
        floor = f(r.get("memory_floor_ms"), ".1f") + (f" / {r['ns_floor_ms']:.1f}" if "ns_floor_ms" in r else "")
        out.append([r["optimizer"], r["dtype"], f(r["params"] / 1e9, ".2f"), f(r["ms"], ".1f"), floor,
                    f(r.get("GBps"), ",.0f"), f(100 * r["copy_fraction"], ".0f"), f(r["state_bytes_per_param"], ".1f"),
                    f(r.get("ratio_to_muon"), ".2f")])
    return header, out


def run_speed_suite(args, out_dir: str) -> dict:
    start = time.time()
    result = run_speed(device=args.device, names=args.optimizers)
    result.update(describe([], command=args.command_line, device=args.device), suite="speed", wall_seconds=time.time() - start)
    write_json(result, os.path.join(out_dir, "results.json"))
    header, rows = speed_table(result["rows"])
    c = result["ceilings"]
    md = [f"# `speed` suite results", "", f"- command: `{result['command']}`", f"- date: {result['date']}; "
          f"machine: {result['machine'].get('gpu')}; torch {result['versions']['torch']}",
          f"- copy bandwidth {c['copy_GBps']:,.0f} GB/s (read + write); bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s",
          "", markdown_table(header, rows), ""]
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(md))
    print_table("speed: optimizer step on the GPT-like list", header, rows)
    return result
