"""The ``pretrained`` suite: a shipped DeepMomentum memory, untuned, on task families it never saw.

For each held-out family (:data:`benchmarks.pretrained.families.HELD_OUT_FAMILIES`) and seed, one
task (network initialization, data order, sizes from the seed) is trained at the family's horizon by

- ``DeepMomentum.pretrained``: the memory (``--memory``, a shipped name or a file) at its
  recommended rate, untuned;
- ``DeepMomentum`` hand-set (momentum 0.9, inner_lr 0.1) at its default rate (1e-3);
- ``AdamW`` (torch) at its default rate (1e-3) and at its tuned rate: the best of ``--lr-grid`` by
  mean final held-out loss over the same seeds (the tuning sees the test seeds: it favours AdamW);
- ``Muon`` (``deepopt.MuonMemory``: Muon on matrices, AdamW on the rest) at its default rate
  (1e-3) and tuned the same way.

The score of a run is its final held-out loss (``task.eval_loss``; a run that leaves the finite
numbers scores ``inf``). Then the pretrained memory, and AdamW at its default rate for reference, run
each family at ``--long`` times its horizon (same seeds): a run diverges if a training loss is not
finite or the mean training loss over its last tenth is above its first; the report also counts
runs whose final held-out loss ends above its start (overfitting as well as instability).

Targets (the pretrained-memories issue): on at least 4 of the 5 families the pretrained memory's
mean final loss is below AdamW's at its default rate and within 10% of AdamW's at its tuned rate;
no divergence at ``--long`` x the horizon. ``results.json`` holds every run; ``results.md`` the
table, with each tuned rate and whether it lies inside the grid.

Run: ``python -m benchmarks run --suite pretrained`` (or ``python -m benchmarks.pretrained.evaluate``;
``--smoke``: two families, one seed, a few steps, seconds on a CPU; ``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

import deepopt
from deepopt import pretrained

from ..outdir import add_arguments as add_out_arguments, announce, run_dir
from .families import FAMILIES, HELD_OUT_FAMILIES

LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
DEFAULT_LR = 1e-3  # torch.optim.AdamW's and MuonMemory's default


def task_for(family: str, seed: int, steps: int | None, device: str):
    """The task of ``family`` for ``seed`` (the same one for every optimizer), at ``steps`` (default horizon)."""
    salt = sorted(FAMILIES).index(family)
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + salt)
    return FAMILIES[family].sample(g, steps=steps, device=device)


def train(task: Any, make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> dict:
    """Train ``task``'s parameters (``task.parameters()``: fresh ``nn.Parameter`` copies) with the
    optimizer ``make`` builds."""
    params = task.parameters()
    opt = make(params)
    initial = task.eval_loss(task.named(params))
    curve, finite = [], True
    for t in range(task.steps):
        loss = task.loss(task.named(params), t)
        if not torch.isfinite(loss):
            finite = False
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    final = task.eval_loss(task.named(params)) if finite else math.inf
    final = final if math.isfinite(final) else math.inf
    tail = curve[-max(1, len(curve) // 10):]
    final_train = sum(tail) / len(tail) if finite and curve else math.inf
    return {"initial": initial, "final": final, "initial_train": curve[0] if curve else math.inf,
            "final_train": final_train if math.isfinite(final_train) else math.inf,
            "curve": curve[:: max(1, len(curve) // 50)]}


def diverged(run: dict) -> bool:
    """Training left the finite numbers, or its loss over the last tenth of the run is above its first."""
    return not (math.isfinite(run["final_train"]) and run["final_train"] <= run["initial_train"])


def makers(memory: str) -> dict[str, Callable[[float | None], Callable]]:
    """Each optimizer's builder: ``factory(lr)(params)`` (``lr`` None: the optimizer's own choice)."""
    return {
        "pretrained": lambda lr: lambda p: deepopt.DeepMomentum.pretrained(p, name=memory),
        "deep_default": lambda lr: lambda p: deepopt.DeepMomentum(p, momentum=0.9, inner_lr=0.1),
        "adamw": lambda lr: lambda p: torch.optim.AdamW(p, lr=lr),
        "muon": lambda lr: lambda p: deepopt.MuonMemory(p, lr=lr),
    }


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _spread(xs: Sequence[float]) -> float:
    if len(xs) < 2 or not all(map(math.isfinite, xs)):
        return math.nan
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def evaluate_family(family: str, args: argparse.Namespace) -> dict:
    """Every optimizer on ``family`` over the seeds; the tuned rates; the long runs."""
    build = makers(args.memory)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    tasks = [task_for(family, s, args.steps, args.device) for s in seeds]
    runs: dict[str, list[dict]] = {}
    runs["pretrained"] = [train(t, build["pretrained"](None)) for t in tasks]
    runs["deep_default"] = [train(t, build["deep_default"](None)) for t in tasks]
    grids: dict[str, dict[str, float]] = {}
    for name in ("adamw", "muon"):
        sweep = {lr: [train(t, build[name](lr)) for t in tasks] for lr in args.lr_grid}
        grids[name] = {str(lr): _mean([r["final"] for r in rs]) for lr, rs in sweep.items()}
        best = min(sweep, key=lambda lr: _mean([r["final"] for r in sweep[lr]]))
        runs[f"{name}_tuned"] = sweep[best]
        runs[f"{name}_default"] = sweep[DEFAULT_LR] if DEFAULT_LR in sweep else [
            train(t, build[name](DEFAULT_LR)) for t in tasks]
        grids[name]["best"] = best
        grids[name]["interior"] = args.lr_grid.index(best) not in (0, len(args.lr_grid) - 1)
    long_steps = args.long * tasks[0].steps
    long_tasks = [task_for(family, s, long_steps, args.device) for s in seeds]
    long_runs = {"pretrained": [train(t, build["pretrained"](None)) for t in long_tasks],
                 "adamw_default": [train(t, build["adamw"](DEFAULT_LR)) for t in long_tasks]}
    summary = {k: {"mean": _mean([r["final"] for r in rs]), "sd": _spread([r["final"] for r in rs])}
               for k, rs in runs.items()}
    long = {"steps": long_steps, "runs": long_runs}
    for name, rs in long_runs.items():
        long[name] = {"diverged": sum(map(diverged, rs)), "held_out_above_start": sum(
            not (math.isfinite(r["final"]) and r["final"] <= r["initial"]) for r in rs),
            "final": _mean([r["final"] for r in rs])}
    p, a_def, a_tuned = (summary[k]["mean"] for k in ("pretrained", "adamw_default", "adamw_tuned"))
    return {"family": family, "description": FAMILIES[family].description, "steps": tasks[0].steps,
            "summary": summary, "grids": grids, "runs": runs,
            "long": long,
            "beats_adamw_default": p < a_def,
            "within_10pct_of_adamw_tuned": p <= 1.10 * a_tuned,
            "ratio_to_adamw_tuned": p / a_tuned if a_tuned > 0 else math.nan}


def write_report(out: Path, meta: dict, families: list[dict]) -> str:
    """``results.md``: one row per family, then the targets."""
    cols = ("pretrained", "deep_default", "adamw_default", "adamw_tuned", "muon_default", "muon_tuned")
    lines = [f"# A pretrained DeepMomentum memory ({meta['memory']}) on held-out task families", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; {meta['seconds']} s.  ",
             f"Command: `{meta['command']}`  ",
             f"Seeds: {meta['seeds']}" + (f" (from seed {meta['first_seed']})" if meta.get("first_seed") else "")
             + "; final held-out loss, mean ± sd over seeds (lower is better); tuned = best of "
             f"{list(meta['lr_grid'])} by that mean (rate in brackets, * at the grid's edge).", "",
             "| family | steps | " + " | ".join(cols) + " | pretrained / AdamW tuned |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for f in families:
        cells = []
        for c in cols:
            s = f["summary"][c]
            cell = f"{s['mean']:.4f}" + (f" ± {s['sd']:.4f}" if math.isfinite(s["sd"]) else "")
            if c.endswith("_tuned"):
                g = f["grids"][c.split("_")[0]]
                cell += f" ({g['best']:g}{'' if g['interior'] else '*'})"
            cells.append(cell)
        lines.append(f"| {f['family']} | {f['steps']} | " + " | ".join(cells) + f" | {f['ratio_to_adamw_tuned']:.3f} |")
    lines += ["", f"Long runs ({meta['long']}x each family's horizon, same seeds): runs that diverged (training loss "
              "not finite, or its mean over the last tenth above its first value), runs whose final held-out loss "
              "is above its start (overfitting counts here), and the mean final held-out loss.", "",
              "| family | steps | pretrained: diverged | held-out above start | final | AdamW default: diverged | "
              "held-out above start | final |", "|---|---|---|---|---|---|---|---|"]
    for f in families:
        lo = f["long"]
        k = len(lo["runs"]["pretrained"])
        lines.append(f"| {f['family']} | {lo['steps']} | " + " | ".join(
            f"{lo[c]['diverged']}/{k} | {lo[c]['held_out_above_start']}/{k} | {lo[c]['final']:.4f}"
            for c in ("pretrained", "adamw_default")) + " |")
    n = len(families)
    both = sum(f["beats_adamw_default"] and f["within_10pct_of_adamw_tuned"] for f in families)
    lines += ["", f"- Below AdamW at its default rate: {sum(f['beats_adamw_default'] for f in families)}/{n} "
              "families.",
              f"- Within 10% of AdamW at its tuned rate: {sum(f['within_10pct_of_adamw_tuned'] for f in families)}/{n}.",
              f"- Both (target: >= 4 of 5): {both}/{n}.",
              f"- Long runs ({meta['long']}x the horizon) of the pretrained memory that diverged (target: none): "
              f"{sum(f['long']['pretrained']['diverged'] for f in families)} of "
              f"{sum(len(f['long']['runs']['pretrained']) for f in families)}; whose held-out loss ended above its "
              f"start: {sum(f['long']['pretrained']['held_out_above_start'] for f in families)} (AdamW at its default "
              f"rate: {sum(f['long']['adamw_default']['held_out_above_start'] for f in families)}).",
              "", "Families: " + "; ".join(f"{f['family']}: {f['description']}" for f in families) + ".", ""]
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_arguments(ap, "pretrained")
    ap.add_argument("--memory", default="default", help="a shipped memory's name or a memory file")
    ap.add_argument("--families", nargs="+", default=[f.name for f in HELD_OUT_FAMILIES], choices=sorted(FAMILIES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds first-seed .. first-seed + seeds - 1 (fresh task instances of the same families)")
    ap.add_argument("--steps", type=int, default=None, help="override every family's horizon")
    ap.add_argument("--long", type=int, default=10, help="the long runs' horizon, in multiples of the family's")
    ap.add_argument("--lr-grid", type=float, nargs="+", default=list(LR_GRID))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1,
                    help="families evaluated side by side in this many processes (on a GPU the small tasks are "
                         "launch-bound, so several processes share it well)")
    ap.add_argument("--smoke", action="store_true", help="two families, one seed, 3 steps: a check, not a result")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error(f"--workers must be >= 1, got {args.workers}")
    return args


def _evaluate_in_worker(job: tuple[str, argparse.Namespace]) -> dict:
    name, args = job
    torch.set_num_threads(args.threads)
    return evaluate_family(name, args)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse(argv)
    if args.smoke:
        args.families, args.seeds, args.steps, args.long = args.families[:2], 1, 3, 2
        args.lr_grid = [1e-3, 1e-2]
    torch.set_num_threads(args.threads)
    out = Path(run_dir("pretrained", args.out, args.update_results))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.workers > 1:
        with torch.multiprocessing.get_context("spawn").Pool(min(args.workers, len(args.families))) as pool:
            families = pool.map(_evaluate_in_worker, [(name, args) for name in args.families], chunksize=1)
    else:
        families = [evaluate_family(name, args) for name in args.families]
    for name, family in zip(args.families, families):
        s = family["summary"]
        print(f"{name}: pretrained {s['pretrained']['mean']:.4f}  AdamW default {s['adamw_default']['mean']:.4f}  "
              f"tuned {s['adamw_tuned']['mean']:.4f}  Muon tuned {s['muon_tuned']['mean']:.4f}", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} torch thread(s)"
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"machine": device, "platform": platform.platform(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": f"python -m benchmarks.pretrained.evaluate {argv_text}".strip(),
            "memory": args.memory, "card": pretrained.load(args.memory).card,
            "seeds": args.seeds, "first_seed": args.first_seed, "lr_grid": args.lr_grid, "long": args.long,
            "seconds": round(time.perf_counter() - start, 1)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "families": families}, indent=1))
    print(write_report(out, meta, families))
    announce(str(out))
    return families


if __name__ == "__main__":
    main()
