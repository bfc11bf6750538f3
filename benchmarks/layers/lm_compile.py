"""Eager against ``torch.compile`` for the language models' training step (GPU).

For each LM (dim 384, depth 6, batch 32 x 256, AdamW, fp32 weights with TF32 matmuls): the eager
step time, the compile time (the first compiled step, its warm-up included) and the compiled
step time, with every ratio to TransformerLM's eager step from the same run. Two ways to
compile (``--modes``): ``full``, the model in place with ``model.compile(fullgraph=True)`` (the
layers have no graph break), and ``blocks``, regional compilation with ``model.compile_blocks()``
(each block compiled, one graph shared by all). The optimizer step stays eager (fused AdamW).

Usage: ``python -m benchmarks.layers.lm_compile [--out DIR]`` (writes lm_compile.json and .md to DIR,
by default a fresh ``./runs/lm_compile-<time>/``);
``--device cpu --dim 16 --depth 1 --batch 2 --seq 8 --backend eager`` is a seconds-long smoke run.

Example (the table on made-up numbers):
    >>> print(table([{"model": "A", "eager_ms": 10.0, "compile_s": 30.0, "compiled_ms": 5.0}])[-1])
    | A | 10.0 | 1.00x | 30 | 5.0 | 0.50x |
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..outdir import announce, run_dir
from .lm_steps import lm_builders, lm_case
from .timing import clock_for, time_calls


def table(rows: list[dict]) -> list[str]:
    """Markdown rows: ms per step eager and compiled, each over the first row's eager time."""
    base = rows[0].get("eager_ms") or float("nan")
    out = ["| model | eager ms/step | x Transformer eager | compile s | compiled ms/step | x Transformer eager |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        comp = r.get("compiled_ms")
        eager = r.get("eager_ms") or float("nan")
        out.append(f"| {r['model']} | {eager:.1f} | {eager / base:.2f}x | "
                   f"{r.get('compile_s', float('nan')):.0f} | "
                   + (f"{comp:.1f} | {comp / base:.2f}x |" if comp else f"{r.get('error', '-')} | - |"))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="output folder (default: a fresh ./runs/lm_compile-<time>/)")
    p.add_argument("--models", nargs="+", default=["TransformerLM", "TitansLM", "HopeLM()"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--modes", nargs="+", default=["full", "blocks"], choices=["full", "blocks"],
                   help="compile the whole model (full) and/or each block (blocks: regional compilation)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    a = p.parse_args(argv)
    a.out = run_dir("lm_compile", a.out)
    torch.backends.cuda.matmul.allow_tf32 = True
    import nl_layers

    builders = lm_builders(256, a.dim, a.depth, 6 if a.dim % 6 == 0 else 2)
    with nl_layers.value_checks(False):  # no host sync per call while timing; restored afterwards
        rows = [row for name in a.models for row in measure(name, builders[name], a)]
    write(rows, a)


def compiled_model(model: torch.nn.Module, backend: str, mode: str = "full") -> torch.nn.Module:
    """The model compiled in place (fullgraph): its ``__call__`` (``full``, so ``model.loss`` runs
    compiled too) or each block's (``blocks``, regional compilation).

    (``torch.compile(model)`` would return a wrapper whose ``loss`` still calls the eager forward.)
    """
    if mode == "blocks":
        return model.compile_blocks(backend=backend)
    model.compile(fullgraph=True, backend=backend)
    return model


def measure(name: str, build, a) -> list[dict]:
    """One model's eager step, then per compile mode its compile time (first two compiled steps)
    and compiled step, or the error; one row per mode (the eager time in each)."""
    clock = clock_for(a.device)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    rows = []
    try:
        eager = time_calls(lm_case(name, build, 256, a.device, "fp32").make(a.batch, a.seq), clock).ms
    except Exception as err:  # noqa: BLE001 - recorded in the table
        rows.append({"model": name, "error": f"{type(err).__name__}: {str(err)[:200]}"})
        print(json.dumps(rows[-1]), flush=True)
        return rows
    for mode in a.modes:
        row = {"model": name if mode == "full" else f"{name} [blocks]", "mode": mode, "eager_ms": eager}
        try:
            torch._dynamo.reset()
            compiled = lm_case(name, lambda: compiled_model(build(), a.backend, mode), 256, a.device, "fp32")
            step = compiled.make(a.batch, a.seq)
            t0 = time.perf_counter()
            step()
            sync()
            step()
            sync()
            row["compile_s"] = time.perf_counter() - t0
            row["compiled_ms"] = time_calls(step, clock).ms
        except Exception as err:  # noqa: BLE001 - recorded in the table
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def write(rows: list[dict], a) -> None:
    """lm_compile.json and lm_compile.md under ``a.out``; prints the table."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    (out / "lm_compile.json").write_text(json.dumps({"device": where, "torch": torch.__version__, "rows": rows}, indent=1))
    text = "\n".join([f"device: {where}, torch {torch.__version__}, backend {a.backend}", "", *table(rows)])
    (out / "lm_compile.md").write_text(text + "\n")
    print(text)
    announce(str(out))


if __name__ == "__main__":
    main()
