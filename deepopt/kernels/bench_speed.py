"""Speed of the fused optimizer steps and the batched Newton-Schulz (issue 6, item 4).

On a GPT-like parameter list (d=2048, 24 layers, vocab 50,304: 1.31 B
parameters in 145 tensors), fp32 and bf16, in one run: every deepopt optimizer against fused
AdamW, fused SGD and ``torch.optim.Muon`` (the Muon-family on the 1.21 B matrix parameters);
ms per step (median of CUDA-event timings; mean over a full period for M3), bytes moved per
parameter (the step's floor: each tensor it must read or write once), achieved GB/s and its
fraction of the measured copy bandwidth; for Newton-Schulz, achieved TFLOP/s. Before timing,
each deepopt optimizer's fused step is checked against its foreach path on a small list.

    python -m deepopt.kernels.bench_speed                                # the full run (CUDA)
    python -m deepopt.kernels.bench_speed --small --device cpu --reps 1  # a smoke run

Writes ``speed.json`` to ``--out``, by default a fresh ``./runs/speed_kernels-<time>/``
(``--update-results``: the committed ``benchmarks/results/speed_kernels/``, run from the
repository root), prints the JSON and a short table, and ends with the folder it wrote to.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import deepopt
from deepopt.kernels.newton_schulz import newton_schulz_many, ns_flops, orthogonality_error
from deepopt.levels.orthogonal import newton_schulz


def gpt_shapes(d: int = 2048, layers: int = 24, vocab: int = 50304) -> list[tuple[int, ...]]:
    """wte, then per layer: ln1, qkv (3d x d), attn proj (d x d), ln2, fc (4d x d), proj (d x 4d)."""
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (3 * d, d), (d, d), (d,), (4 * d, d), (d, 4 * d)]
    return shapes


def make_params(shapes, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype) * 0.02)
          for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    return ps


def timer(device):
    if device == "cuda":
        def run(fn, reps):
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            return times
    else:
        def run(fn, reps):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return times
    return run


def copy_bandwidth(device, timeit) -> float:
    n = (1 << 28) if device == "cuda" else (1 << 20)
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    ms = statistics.median(timeit(lambda: y.copy_(x), 20))
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device, timeit) -> float:
    n = 8192 if device == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = statistics.median(timeit(lambda: a @ a, 10))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def optimizers(matrix_only: bool):
    """name -> (builder(params), state buffers touched per step (for the byte floor), family)."""
    A = torch.optim
    if matrix_only:
        return {
            "torch.optim.Muon": (lambda ps: A.Muon(ps, lr=0.02, weight_decay=0.1), 1),
            "MuonMemory": (lambda ps: deepopt.MuonMemory(ps, lr=0.02), 1),
            "MuonMemory(gram)": (lambda ps: deepopt.MuonMemory([{"params": ps, "ns_method": "auto"}], lr=0.02), 1),
            "M3": (lambda ps: deepopt.M3(ps, lr=0.01, frequency=10), 5),
            "M3(gram)": (lambda ps: deepopt.M3([{"params": ps, "ns_method": "auto"}], lr=0.01, frequency=10), 5),
            "DeepMomentum(ns)": (lambda ps: deepopt.DeepMomentum(ps, lr=0.01, sigma="ns"), 1),
            "MuonMemory(gram)[nocheck]": (lambda ps: deepopt.MuonMemory([{"params": ps, "ns_method": "auto"}], lr=0.02,
                                                                        nonfinite="ignore"), 1),
        }
    return {
        "AdamW(fused)": (lambda ps: A.AdamW(ps, lr=1e-3, fused=True), 2),
        "SGD(fused)": (lambda ps: A.SGD(ps, lr=1e-2, momentum=0.9, fused=True), 1),
        "MomentumMemory": (lambda ps: deepopt.MomentumMemory(ps, lr=1e-2, momentum=0.9), 1),
        "AdamMemory": (lambda ps: deepopt.AdamMemory(ps, lr=1e-3), 2),
        "AdamMemory(accumulate)": (lambda ps: deepopt.AdamMemory(ps, lr=1e-3, form="accumulate"), 2),
        "PreconditionedMomentum": (lambda ps: deepopt.PreconditionedMomentum(ps, lr=1e-3), 2),
        "PreconditionedMomentum(C=10)": (lambda ps: deepopt.PreconditionedMomentum(ps, lr=1e-3, precond_period=10), 3),
        "DeltaMomentum(vectors)": (lambda ps: deepopt.DeltaMomentum(ps, lr=1e-2), 1),  # on flat views
        "M3(element-wise)": (lambda ps: deepopt.M3([{"params": ps, "orthogonalize": False}], lr=1e-3), 4),
        "DeepMomentum": (lambda ps: deepopt.DeepMomentum(ps, lr=1e-2, inner_lr=0.1), 1),
        # the same without the default non-finite-gradient check (one extra read of the gradients
        # and a host sync per step): what the kernels themselves cost
        "MomentumMemory[nocheck]": (lambda ps: deepopt.MomentumMemory(ps, lr=1e-2, momentum=0.9,
                                                                      nonfinite="ignore"), 1),
        "AdamMemory[nocheck]": (lambda ps: deepopt.AdamMemory(ps, lr=1e-3, nonfinite="ignore"), 2),
        "M3(element-wise)[nocheck]": (lambda ps: deepopt.M3([{"params": ps, "orthogonalize": False}], lr=1e-3,
                                                            nonfinite="ignore"), 4),
        "DeepMomentum[nocheck]": (lambda ps: deepopt.DeepMomentum(ps, lr=1e-2, inner_lr=0.1, nonfinite="ignore"), 1),
    }


def _leaf_views(ps):
    """DeltaMomentum(vectors) optimizes flat views: make them leaf parameters sharing storage."""
    out = []
    for p in ps:
        v = torch.nn.Parameter(p.data.view(-1))
        v.grad = p.grad.view(-1)
        out.append(v)
    return out


def check_fused(device) -> dict[str, float]:
    """Max relative difference fused (impl=auto) vs foreach after 3 steps, small fp32 list."""
    out = {}
    shapes = gpt_shapes(64, 2, 100)
    for matrix_only in (False, True):
        shp = [s for s in shapes if len(s) == 2 and s[0] != 100] if matrix_only else shapes
        for name, (build, _) in optimizers(matrix_only).items():
            if not name[0].isupper() or name.startswith(("torch", "AdamW", "SGD")):
                continue
            res = []
            for impl in ("auto", "foreach"):
                ps = make_params(shp, torch.float32, device)
                if "vectors" in name:
                    ps = _leaf_views(ps)
                opt = build(ps)
                opt.impl = impl
                for _ in range(3):
                    opt.step()
                res.append([p.detach().clone() for p in ps])
            out[name] = max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(*res))
    return out


def bench_list(shapes, dtype, device, reps, bw, timeit, matrix_only) -> list[dict]:
    rows = []
    n = sum(torch.Size(s).numel() for s in shapes)
    for name, (build, k) in optimizers(matrix_only).items():
        ps = make_params(shapes, dtype, device)
        if "vectors" in name:
            ps = _leaf_views(ps)
        try:
            opt = build(ps)
        except Exception as err:  # e.g. torch.optim.Muon missing from this torch
            rows.append({"optimizer": name, "error": repr(err)})
            continue
        for _ in range(2):
            opt.step()
        times = timeit(opt.step, max(reps, 10) if name.startswith("M3") else reps)  # M3: a full period
        ms = statistics.mean(times) if name.startswith("M3") else statistics.median(times)
        pb = torch.finfo(dtype).bits // 8
        sb = next((v.element_size() for s in opt.state.values() for kk, v in s.items()
                   if kk != "step" and torch.is_tensor(v) and v.numel() > 1), pb)
        floor = 2 * pb + pb + 2 * k * sb  # p read+write, g read, each state buffer read+write
        gbs = floor * n / (ms * 1e-3) / 1e9
        rows.append({"optimizer": name, "dtype": str(dtype).replace("torch.", ""), "params": n, "ms": round(ms, 3),
                     "bytes_per_param": floor, "GB/s": round(gbs, 1), "frac_copy": round(gbs / bw, 3)})
        del opt, ps
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_ns(shapes, device, reps, timeit) -> list[dict]:
    """Newton-Schulz on the list's matrices: torch's per-matrix loop against the batched forms."""
    g = torch.Generator(device=device).manual_seed(1)
    ms = [torch.randn(s, generator=g, device=device) for s in shapes]
    flops = sum(ns_flops(*s) for s in shapes)
    out = []
    variants = {"torch per-matrix": lambda: [newton_schulz(m) for m in ms],
                "batched standard": lambda: newton_schulz_many(ms, method="standard"),
                "batched auto (gram)": lambda: newton_schulz_many(ms, method="auto")}
    ref = [newton_schulz(m) for m in ms[:4]]
    for name, fn in variants.items():
        fn()
        t = statistics.median(timeit(fn, reps))
        err = statistics.mean(orthogonality_error(o) for o in fn()[:4])
        out.append({"ns": name, "ms": round(t, 2), "effective_TFLOP/s": round(flops / (t * 1e-3) / 1e12, 1),
                    "orthogonality_error": round(err, 4),
                    "torch_orthogonality_error": round(statistics.mean(orthogonality_error(o) for o in ref), 4)})
    return out


ELEMENTWISE = ("MomentumMemory", "AdamMemory", "AdamMemory(accumulate)", "PreconditionedMomentum",
               "PreconditionedMomentum(C=10)", "DeltaMomentum(vectors)", "M3(element-wise)",
               "MomentumMemory[nocheck]", "AdamMemory[nocheck]", "M3(element-wise)[nocheck]")


def targets(rows) -> dict:
    """Issue 6's targets per dtype: step-time ratios and the element-wise fractions of copy bandwidth."""
    out = {}
    for dt in sorted({r["dtype"] for r in rows if "dtype" in r}):
        ms = {r["optimizer"]: r["ms"] for r in rows if r.get("dtype") == dt}
        frac = {r["optimizer"]: r["frac_copy"] for r in rows if r.get("dtype") == dt and r["optimizer"] in ELEMENTWISE}
        muon, adamw = ms.get("torch.optim.Muon"), ms.get("AdamW(fused)")
        t = {"elementwise_frac_copy (>= 0.9)": frac}
        for name in ("MuonMemory", "MuonMemory(gram)"):
            if muon and name in ms:
                t[f"{name} / Muon (<= 0.8)"] = round(ms[name] / muon, 3)
        for name in ("M3", "M3(gram)"):
            if muon and name in ms:
                t[f"{name} / Muon (<= 1.0)"] = round(ms[name] / muon, 3)
        if adamw and "DeepMomentum" in ms:
            t["DeepMomentum / AdamW (<= 2.0)"] = round(ms["DeepMomentum"] / adamw, 3)
        out[dt] = t
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="output folder (default: a fresh ./runs/speed_kernels-<time>/)")
    ap.add_argument("--update-results", action="store_true",
                    help="write to the committed benchmarks/results/speed_kernels/ (from the repository root)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--small", action="store_true", help="a tiny list (smoke test)")
    args = ap.parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    args.out = args.out or ("benchmarks/results/speed_kernels" if args.update_results else f"runs/speed_kernels-{stamp}")
    device = args.device
    timeit = timer(device)
    shapes = gpt_shapes(64, 2, 100) if args.small else gpt_shapes()
    matrices = [s for s in shapes if len(s) == 2 and s != shapes[0]]
    result = {"machine": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "command": "python -m deepopt.kernels.bench_speed " + " ".join(argv or []),
              "copy_GB/s": round(copy_bandwidth(device, timeit), 1),
              "bf16_matmul_TFLOP/s": round(matmul_tflops(device, timeit), 1),
              "fused_vs_foreach_max_rel_diff": check_fused(device), "steps": [], "newton_schulz": []}
    bw = result["copy_GB/s"]
    for dt in args.dtypes.split(","):
        dtype = getattr(torch, dt)
        result["steps"] += bench_list(shapes, dtype, device, args.reps, bw, timeit, False)
        result["steps"] += bench_list(matrices, dtype, device, max(3, args.reps // 2), bw, timeit, True)
    result["newton_schulz"] = bench_ns(matrices, device, max(3, args.reps // 2), timeit)
    result["targets"] = targets(result["steps"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "speed.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    print(f"\n{'optimizer':32s} {'dtype':9s} {'ms':>9s} {'B/param':>8s} {'GB/s':>8s} {'copy':>6s}")
    for r in result["steps"]:
        if "error" in r:
            print(f"{r['optimizer']:32s} error: {r['error']}")
            continue
        print(f"{r['optimizer']:32s} {r['dtype']:9s} {r['ms']:9.2f} {r['bytes_per_param']:8d} {r['GB/s']:8.0f} "
              f"{r['frac_copy']:6.2f}")
    for dt, t in result["targets"].items():
        print(dt, json.dumps(t))
    for r in result["newton_schulz"]:
        print(f"NS {r['ns']:29s} {r['ms']:9.2f} ms {r['effective_TFLOP/s']:7.1f} TFLOP/s  "
              f"orth err {r['orthogonality_error']} (torch {r['torch_orthogonality_error']})")
    print(f"results written to {args.out}")
    return result


if __name__ == "__main__":
    main()
