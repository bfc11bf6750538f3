"""Where a language model's training step spends its time (GPU): launches, kernels, graphs.

For each LM (and each ``chunk_size`` of the fast-weight mixers given): the eager step time; from
one profiled step the number of GPU kernels, the time the GPU is busy with them (the sum of
kernel times) and the biggest kernels; and the step replayed as one CUDA graph (forward,
backward and a capturable AdamW step captured together; fused, as the eager step's, so both run the
same optimizer kernels), which removes the launch overhead:
eager >> graph means the step is bound by the host, graph ~ busy means by the GPU. Every time is
also given over TransformerLM's eager step from the same run. Gradients are reset as torch's
default ``zero_grad()`` does (``--zero-grad zeros``: kept and zeroed, which adds one accumulation
kernel per parameter to every backward).

Usage: ``python -m benchmarks.layers.lm_profile [--out DIR] [--chunks 64 256] [--ops 40]``;
``--device cpu --dim 16 --depth 1 --batch 2 --seq 8`` is a smoke run (no graph, no kernels).

Example (the table on made-up numbers):
    >>> print(table([{"model": "A", "eager_ms": 10.0, "kernels": 600, "busy_ms": 6.0, "graph_ms": 7.0}])[-1])
    | A | 10.0 | 1.00x | 600 | 6.0 | 7.0 | 0.70x |
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..outdir import announce, run_dir
from .lm_steps import add_size_arguments, lm_builders
from .mixers import construct
from .timing import clock_for, time_calls


def _training_step(model, vocab: int, batch: int, seq: int, device: str, capturable: bool, set_to_none: bool = True):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=capturable, fused=device.startswith("cuda"))
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)

    def step():
        opt.zero_grad(set_to_none=set_to_none)
        model.loss(tokens).backward()
        opt.step()

    return step


def graphed(step):
    """The step captured once as a CUDA graph; returns replay (warm-up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def kernel_profile(step, top: int) -> dict:
    """Kernels of one step: count, summed GPU time (ms) and the ``top`` largest by time."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:90], [0, 0.0])
        entry[0] += 1
        entry[1] += e.device_time / 1e3
    biggest = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {"kernels": len(kernels), "busy_ms": sum(e.device_time for e in kernels) / 1e3,
            "top": [{"name": n, "calls": c, "ms": round(t, 3)} for n, (c, t) in biggest]}


def op_profile(step, top: int) -> str:
    """The ``top`` operators of one step by self GPU time, each with its Python call site (5 frames)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    verbose = torch._C._profiler._ExperimentalConfig(verbose=True)  # python stacks on the operators (else none)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True, record_shapes=True,
                 experimental_config=verbose) as prof:
        step()
        torch.cuda.synchronize()
    stacks = prof.key_averages(group_by_stack_n=5).table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60)
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=top,
                                                                max_name_column_width=60)
    return stacks + "\n\n" + shapes


def measure(name: str, build, a, chunk) -> dict:
    row = {"model": name if chunk is None else f"{name} chunk {chunk}"}
    clock = clock_for(a.device)
    cuda = a.device.startswith("cuda")
    try:
        model = build().to(a.device)
        none = a.zero_grad == "none"
        row["eager_ms"] = time_calls(_training_step(model, 256, a.batch, a.seq, a.device, False, none), clock).ms
        if cuda:
            row.update(kernel_profile(_training_step(model, 256, a.batch, a.seq, a.device, False, none), a.top))
            if a.ops:
                text = op_profile(_training_step(model, 256, a.batch, a.seq, a.device, False, none), a.ops)
                Path(a.out).mkdir(parents=True, exist_ok=True)
                (Path(a.out) / f"ops_{row['model'].replace(' ', '_').replace('()', '')}.txt").write_text(text)
            replay = graphed(_training_step(model, 256, a.batch, a.seq, a.device, True, none))
            row["graph_ms"] = time_calls(replay, clock).ms
    except Exception as err:  # noqa: BLE001 - recorded in the table
        row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
    print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
    return row


def table(rows: list[dict]) -> list[str]:
    base = rows[0].get("eager_ms") or float("nan")
    out = ["| model | eager ms | x T eager | kernels/step | GPU busy ms | CUDA graph ms | x T eager |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        e, g = r.get("eager_ms", float("nan")), r.get("graph_ms", float("nan"))
        out.append(f"| {r['model']} | {e:.1f} | {e / base:.2f}x | {r.get('kernels', '-')} | "
                   f"{r.get('busy_ms', float('nan')):.1f} | {g:.1f} | {g / base:.2f}x |"
                   + (f" {r['error']}" if "error" in r else ""))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="output folder (default: a fresh ./runs/lm_profile-<time>/)")
    p.add_argument("--models", nargs="+", default=["TransformerLM", "TitansLM", "HopeLM()"])
    p.add_argument("--chunks", nargs="*", type=int, default=[], help="extra chunk sizes of the fast-weight LMs")
    add_size_arguments(p)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--ops", type=int, default=0, help="also write ops_<model>.txt: the N operators with the most "
                   "GPU time, by call site and by input shape (a second profiled step)")
    p.add_argument("--zero-grad", choices=("none", "zeros"), default="none",
                   help="gradients between steps: none (torch's default zero_grad(), each backward writes fresh "
                   "gradients) or zeros (zero_grad(set_to_none=False): each backward adds into zeroed ones, one "
                   "add per parameter)")
    a = p.parse_args(argv)
    a.out = run_dir("lm_profile", a.out)
    torch.backends.cuda.matmul.allow_tf32 = True
    import nl_layers

    builders = lm_builders(256, a.dim, a.depth, a.heads)
    classes = {"TitansLM": nl_layers.TitansLM, "HopeLM()": nl_layers.HopeLM}
    rows = []
    with nl_layers.value_checks(False):  # no host synchronisation per call (needed by the graph capture)
        for name in a.models:
            rows.append(measure(name, builders[name], a, None))
            for chunk in a.chunks if name in classes else []:
                build = lambda c=classes[name], k=chunk: construct(c, 256, a.dim, a.depth, heads=a.heads, chunk_size=k)  # noqa: E731
                rows.append(measure(name, build, a, chunk))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_profile.json").write_text(json.dumps(rows, indent=1))
    lines = [f"gradients reset between steps: {a.zero_grad} (--zero-grad)", ""] + table(rows)
    for r in rows:
        if r.get("top"):
            lines += ["", f"{r['model']}: largest kernels", ""] + [f"- {t['ms']:.2f} ms, {t['calls']} calls: {t['name']}" for t in r["top"]]
    (out / "lm_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    announce(str(out))


if __name__ == "__main__":
    main()
