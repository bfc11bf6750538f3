"""The ``speed`` suite: optimizer step time on a GPT-like parameter list (CUDA), or on a small
list on the CPU (``--device cpu``).

The list: d = 2048, 24 layers of q, k, v, o (d x d), fc (4d x d), proj (d x 4d),
plus a 50,304 x d embedding: 145 tensors, 1.31 B parameters (1.21 B in matrices). Gradients are
random (never zeros). Each optimizer is warmed up, then ``repeats`` steps are timed one by one
with CUDA events and the median is reported, with fused AdamW, fused SGD and torch Muon in the
same run, in fp32 and bf16. That is a step's latency: each step waits for the last, so the host's
work before the first launch counts. Beside it, on CUDA, ``CHAIN`` steps are timed back to back
(median of 5 such runs, per step): the throughput of a training loop bound by the GPU, where the
host has queued the step while the backward pass runs; each gets its own ratio to torch. ``torch.optim.Muon`` gets the 144 matrices; deepopt's MuonMemory and M3
get all 145 tensors with the embedding in an ``orthogonalize=False`` group (element-wise, as a
Muon user would hand it to AdamW).

On the CPU (``--device cpu``, one torch thread by default): 8 matrices of 256 x 1024 (2.1 M
parameters), fp32, each step timed with ``time.perf_counter`` (median of 40 rounds that step every optimizer once,
interleaved, so load from other processes hits all alike), against torch's
*foreach* AdamW and SGD (momentum 0.9) and Muon timed in the same run. Every row gets
``ratio_to_torch``: its time over its classic counterpart's (SGD for MomentumMemory, AdamW for
the rest; fused on CUDA, foreach on the CPU; see :func:`counterpart`).

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
    >>> counterpart("MomentumMemory", "cpu"), counterpart("DeltaMomentum", "cuda")
    ('SGD(foreach)', 'AdamW(fused)')
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
CHAIN = 10  # steps between two CUDA events in the back-to-back timing


def gpt_param_shapes(dim: int = 2048, layers: int = 24, vocab: int = 50_304) -> list[tuple[str, tuple[int, int]]]:
    """(name, shape) of the GPT-like list: the embedding, then 6 matrices per layer."""
    shapes = [("embed", (vocab, dim))]
    for layer in range(layers):
        for name, shape in (("q", (dim, dim)), ("k", (dim, dim)), ("v", (dim, dim)), ("o", (dim, dim)),
                            ("fc", (4 * dim, dim)), ("proj", (dim, 4 * dim))):
            shapes.append((f"h{layer}.{name}", shape))
    return shapes


def cpu_param_shapes(count: int = 8, rows: int = 256, cols: int = 1024) -> list[tuple[str, tuple[int, int]]]:
    """(name, shape) of the CPU list: ``count`` matrices of ``rows x cols``."""
    return [(f"w{i}", (rows, cols)) for i in range(count)]


def counterpart(name: str, device: str) -> str:
    """The torch optimizer a row's ``ratio_to_torch`` divides by."""
    flavour = "foreach" if device == "cpu" else "fused"
    return f"SGD({flavour})" if name in ("MomentumMemory", "SGD(fused)", "SGD(foreach)") else f"AdamW({flavour})"


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


def time_cuda_chain(fn: Callable[[], None], repeats: int, chain: int = CHAIN) -> float:
    """Median milliseconds per call of ``fn`` over ``repeats`` runs of ``chain`` calls back to back
    (one pair of CUDA events per run, no synchronisation between the calls)."""
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(chain):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / chain)
    return statistics.median(times)


def time_cpu(fn: Callable[[], None], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls, each timed with ``time.perf_counter``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timer(device: str) -> Callable[[Callable[[], None], int, int], float]:
    return time_cpu if device == "cpu" else time_cuda


def copy_bandwidth(device: str, gib: float = 1.0) -> float:
    """Copy GB/s on the device, counting read + write (64 MiB on the CPU)."""
    src = torch.randn(int((gib if device != "cpu" else 1 / 16) * 2**30 / 4), device=device)
    dst = torch.empty_like(src)
    ms = timer(device)(lambda: dst.copy_(src), 3, 20)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: str, n: int = 8192) -> float:
    """n x n x n matmul rate in TFLOP/s: bf16 on CUDA, fp32 with n = 1024 on the CPU."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    n = 1024 if device == "cpu" else n
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timer(device)(lambda: a @ b, 3, 10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def speed_optimizers(names: Sequence[str] | None = None, device: str = "cuda") -> dict[str, Callable]:
    """name -> ``(params) -> optimizer`` for the speed suite; Muon gets only the matrices (see
    ``run_speed``). Every optimizer runs without weight decay (deepopt's are built with
    ``weight_decay=0``, so AdamW is too: like for like). On the CPU torch's baselines are the
    foreach ones."""
    makers: dict[str, Callable] = {
        "AdamW(foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.0, foreach=True),
        "SGD(foreach)": lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, foreach=True),
        "Muon": lambda ps: torch.optim.Muon(ps, lr=1e-4),
    }
    if device != "cpu":
        makers = {"AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.0, fused=True),
                  "AdamW(foreach)": makers["AdamW(foreach)"],
                  "SGD(fused)": lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, fused=True),
                  "Muon": makers["Muon"]}
    for name, cls in sorted(deepopt_registry().items()):
        if getattr(cls, "requires_model", False):
            continue  # DGD needs layer inputs (a model), not a bare parameter list
        makers[name] = (lambda c: lambda ps: make_deepopt(c, ps, None, 1e-4))(cls)
    import deepopt

    # DeepMomentum's memory over Adam-preconditioned gradients (one more state tensor in its kernels)
    makers["DeepMomentum(precondition)"] = lambda ps: deepopt.DeepMomentum(ps, lr=1e-4, precondition=True)
    for memory in deepopt.pretrained.available():  # the shipped memories: their read-outs' step costs
        key = "DeepMomentum.pretrained" if memory == "default" else f"DeepMomentum.pretrained({memory})"
        makers[key] = (lambda m: lambda ps: deepopt.DeepMomentum.pretrained(ps, name=m, lr=1e-4))(memory)
    if names is not None:
        unknown = [n for n in names if n not in makers]
        if unknown:
            raise ValueError(f"unknown speed optimizers {unknown}; choose from {sorted(makers)}")
        makers = {n: makers[n] for n in names}
    return makers


def run_speed(device: str = "cuda", dtypes: Sequence[torch.dtype] | None = None,
              names: Sequence[str] | None = None, shapes=None, warmup: int = 3, repeats: int = 20) -> dict:
    """Time every optimizer's step (see module doc); returns rows and the measured ceilings.
    Defaults per device: the GPT-like list in fp32 and bf16 (CUDA), :func:`cpu_param_shapes` in
    fp32 (CPU)."""
    cpu = device == "cpu"
    shapes = shapes or (cpu_param_shapes() if cpu else gpt_param_shapes())
    dtypes = dtypes or ((torch.float32,) if cpu else (torch.float32, torch.bfloat16))
    time_fn = timer(device)
    ceilings = {"copy_GBps": copy_bandwidth(device), "matmul_TFLOPs": matmul_tflops(device),
                "matmul_dtype": "float32" if cpu else "bfloat16"}
    matrix_shapes = [s for n, s in shapes if n != "embed"]
    rows = []
    for dtype in dtypes:
        live = []  # CPU: every optimizer is built first, then timed in interleaved rounds
        for name, make in speed_optimizers(names, device).items():
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
                if cpu:
                    live.append((row, opt, params))
                else:
                    row["ms"] = time_fn(opt.step, warmup, repeats)
                    row["ms_chain"] = time_cuda_chain(opt.step, 5)
                    _describe(row, opt, params, ceilings, matrix_shapes)
                del opt
            except Exception as err:  # e.g. out of memory for a heavy optimizer: reported, not fatal
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            del params
            if not cpu:
                torch.cuda.empty_cache()
        if live:
            for (row, opt, params), ms in zip(live, time_interleaved([o.step for _, o, _ in live], warmup, repeats)):
                row["ms"] = ms
                _describe(row, opt, params, ceilings, matrix_shapes if not cpu else None)
    ms = {(r["optimizer"], r["dtype"]): r.get("ms") for r in rows}
    ms_chain = {(r["optimizer"], r["dtype"]): r.get("ms_chain") for r in rows}
    for r in rows:
        muon, torch_ms = ms.get(("Muon", r["dtype"])), ms.get((counterpart(r["optimizer"], device), r["dtype"]))
        if r.get("ms") and muon:
            r["ratio_to_muon"] = r["ms"] / muon
        if r.get("ms") and torch_ms:
            r["ratio_to_torch"], r["torch_counterpart"] = r["ms"] / torch_ms, counterpart(r["optimizer"], device)
        chained = ms_chain.get((counterpart(r["optimizer"], device), r["dtype"]))
        if r.get("ms_chain") and chained:
            r["ratio_to_torch_chain"] = r["ms_chain"] / chained
    return {"ceilings": ceilings, "rows": rows}


def time_interleaved(fns: Sequence[Callable[[], None]], warmup: int, repeats: int) -> list[float]:
    """Median milliseconds of each ``fn``, timed in ``repeats`` rounds of one call each (so a
    change in the machine's load hits every function alike: the ratios stay fair on a shared CPU)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(ts) for ts in times]


def _describe(row: dict, opt, params, ceilings: dict, matrix_shapes) -> None:
    """Bytes, bandwidth and floors of a timed row (``matrix_shapes`` None: no Newton-Schulz floor)."""
    row["state_bytes_per_param"] = state_bytes_per_param(opt, params)
    row["bytes_per_param"] = bytes_per_param(params[0].element_size(), params[0].element_size(),
                                             row["state_bytes_per_param"])
    row["GBps"] = row["bytes_per_param"] * row["params"] / (row["ms"] * 1e-3) / 1e9
    row["copy_fraction"] = row["GBps"] / ceilings["copy_GBps"]
    row["memory_floor_ms"] = row["bytes_per_param"] * row["params"] / (ceilings["copy_GBps"] * 1e9) * 1e3
    if matrix_shapes is not None and row["optimizer"] in ("Muon", "MuonMemory", "M3"):
        flops = newton_schulz_flops(matrix_shapes)  # M3's slow NS runs only every f steps
        row["ns_floor_ms"] = flops / (ceilings["matmul_TFLOPs"] * 1e12) * 1e3


def _params(n: int) -> str:
    """Billions with 2 decimals; below 10 M, e.g. ``0.0021 (2.1 M)``."""
    return f"{n / 1e9:.2f}" if n >= 1e7 else f"{n / 1e9:.4f} ({n / 1e6:.1f} M)"


def speed_table(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the speed table (``-`` where a number does not apply)."""
    header = ["optimizer", "dtype", "params (B)", "ms/step", "floor ms (memory / NS)", "GB/s", "% of copy",
              "state B/param", "x Muon", "x torch (counterpart)", "ms/step back to back", "x torch back to back"]

    def f(value, fmt):
        return "-" if value is None else format(value, fmt)

    out = []
    for r in rows:
        if "error" in r:
            out.append([r["optimizer"], r["dtype"], _params(r["params"]), r["error"][:60]] + [""] * 8)
            continue
        floor = f(r.get("memory_floor_ms"), ".1f") + (f" / {r['ns_floor_ms']:.1f}" if "ns_floor_ms" in r else "")
        out.append([r["optimizer"], r["dtype"], _params(r["params"]), f(r["ms"], ".1f"), floor,
                    f(r.get("GBps"), ",.0f"), f(100 * r["copy_fraction"], ".0f"), f(r["state_bytes_per_param"], ".1f"),
                    f(r.get("ratio_to_muon"), ".2f"),
                    "-" if "ratio_to_torch" not in r else f"{r['ratio_to_torch']:.2f} ({r['torch_counterpart']})",
                    f(r.get("ms_chain"), ".1f"), f(r.get("ratio_to_torch_chain"), ".2f")])
    return header, out


def _load(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def run_speed_suite(args, out_dir: str) -> dict:
    start, load = time.time(), os.getloadavg()
    result = run_speed(device=args.device, names=args.optimizers, repeats=20 if args.device != "cpu" else 40)
    result.update(describe([], command=args.command_line, device=args.device), suite="speed", wall_seconds=time.time() - start,
                  load_average={"before": list(load), "after": list(os.getloadavg())})  # other processes on the machine
    write_json(result, os.path.join(out_dir, "results.json"))
    header, rows = speed_table(result["rows"])
    c = result["ceilings"]
    m = result["machine"]
    machine = m.get("gpu") if args.device != "cpu" else (
        f"{m.get('cpu')} ({m.get('cpu_capability')}; bf16 matmuls "
        f"{'native' if m.get('cpu_native_bf16_matmul') else 'emulated by torch'})")
    md = [f"# `speed` suite results", "", f"- command: `{result['command']}`", f"- date: {result['date']}; "
          f"machine: {machine}; torch {result['versions']['torch']}; torch threads {torch.get_num_threads()}",
          f"- copy bandwidth {c['copy_GBps']:,.0f} GB/s (read + write); {c['matmul_dtype']} matmul "
          f"{c['matmul_TFLOPs']:.2f} TFLOP/s",
          f"- load average (1, 5, 15 min) before {_load(result['load_average']['before'])}, after "
          f"{_load(result['load_average']['after'])}; `x torch`: ms over the counterpart's ms in the same run",
          "- `ms/step`: one step between CUDA events, synchronised (latency: the host's work before the first "
          f"launch counts); `back to back`: {CHAIN} steps between the events, per step (throughput of a loop "
          "bound by the GPU; CUDA only)",
          "", markdown_table(header, rows), ""]
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(md))
    print_table(f"speed: optimizer step on the {'CPU' if args.device == 'cpu' else 'GPT-like'} list", header, rows)
    return result
