"""The suites: what each runs, and how its results are written.

| suite | runs | writes |
|---|---|---|
| quick | digits MLP, ill-conditioned quadratic, tiny char LM; 1 seed | results.json, results.md, loss_curves.png, steps_to_target.png |
| quality | every available task; 3 seeds by default | the same + performance_profile.png |
| continual | permuted digits, split digits, Shakespeare by genre | results.json, results.md, accuracy_<sequence>.png |
| speed | optimizer step vs torch's: GPT-like list (cuda), 8 matrices 256 x 1024 (cpu, into ``speed_cpu/``) | results.json, results.md |
| layers | GPU only: nl_layers mixers and LMs vs SDPA, fla, titans-pytorch | results.json, results.md, layers.png |

``memory`` is the old name of ``layers`` (an alias for one release). Every suite writes to a fresh
``./runs/<suite>-<time>/`` unless ``--update-results`` (the committed ``benchmarks/results/<suite>/``)
or ``--out``, and prints the folder at the end. Runs set ``torch.set_num_threads(--threads)``
(default ``DEFAULT_THREADS``, the setting of the committed results) and record the count in effect.

Example:
    >>> SUITES["quick"].tasks
    ('digits_mlp', 'quadratic_illcond', 'char_transformer')
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from . import plots
from .continual import continual_trial_count, run_continual
from .continual_tasks import SEQUENCES
from .environment import describe
from .optimizers import deepopt_registry, select_optimizers
from .outdir import announce, check_out, run_dir
from .quality import run_suite, trial_count
from .runner import SWEEP_FACTORS
from .report import (fmt_loss, fmt_ratio, header_lines, markdown_table, print_table, quality_markdown, ratio_rows,
                     write_json)
from .tasks import TASKS, get_task


@dataclass(frozen=True)
class Suite:
    """A suite: its tasks (or sequences), default seeds, and per-task step overrides."""

    name: str
    description: str
    tasks: tuple[str, ...]
    seeds: int
    steps: dict[str, tuple[int, int]] = field(default_factory=dict)  # task -> (steps, eval_every)
    needs_cuda: bool = False


SUITES = {
    "quick": Suite("quick", "each optimizer on 3 small tasks, 1 seed, under 5 minutes on a 2-core CPU",
                   ("digits_mlp", "quadratic_illcond", "char_transformer"), seeds=1,
                   steps={"digits_mlp": (200, 10), "quadratic_illcond": (200, 10), "char_transformer": (60, 10)}),
    "quality": Suite("quality", "every task, learning-rate sweep, >= 3 seeds, steps to AdamW's target",
                     tuple(n for n, t in TASKS.items() if "slow" not in t.tags), seeds=3),
    "continual": Suite("continual", "task sequences: average metric, backward and forward transfer",
                       tuple(SEQUENCES), seeds=3),
    "speed": Suite("speed", "optimizer step time vs torch's: a GPT-like 1.3B list, fp32 and bf16 (cuda); "
                   "8 matrices 256 x 1024, fp32 (cpu)", ("gpt_1.3b",), seeds=1),
    "layers": Suite("layers", "GPU: nl_layers mixers fwd+bwd tokens/s and peak memory at T 1K-64K vs SDPA, fla, "
                    "titans-pytorch; LM step times vs TransformerLM", ("seq_1k_64k",), seeds=1, needs_cuda=True),
}
ALIASES = {"memory": "layers"}  # old name -> suite, kept for one release
DEFAULT_THREADS = 1  # torch threads of the committed results (a 2-core CPU, one thread per process)


@contextlib.contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[str], None]]:
    """A rich progress bar; yields ``advance(description)``."""
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        yield lambda desc: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task(label, total=total)
        yield lambda desc: progress.update(bar, advance=1, description=f"{label}: {desc}")


def check_cuda(suite: Suite, device: str) -> None:
    """Refuse a GPU suite without CUDA, with the reason."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available() and not suite.needs_cuda:
        raise SystemExit(f"--device {device} was asked for, but this machine has no CUDA device; use --device cpu")
    if suite.needs_cuda and (not device.startswith("cuda") or not torch.cuda.is_available()):
        raise SystemExit(f"the `{suite.name}` suite needs a CUDA GPU (it times kernels with CUDA events); "
                         f"this machine has {'no CUDA device' if not torch.cuda.is_available() else 'device=' + device}. "
                         "Run it on a GPU machine with --device cuda.")


def resolve_tasks(suite: Suite, names: Sequence[str] | None, steps: int | None) -> tuple[list, dict]:
    """The suite's (or the named) tasks that can run here, with step overrides; and the skipped ones."""
    chosen, skipped = [], {}
    for name in names or suite.tasks:
        task = get_task(name)
        reason = task.availability()
        if reason:
            skipped[name] = reason
            continue
        if steps is not None:
            task = task.with_steps(steps)
        elif name in suite.steps:
            task = task.with_steps(*suite.steps[name])
        chosen.append(task)
    return chosen, skipped


def load_info(start_wall: float, start_cpu: float) -> dict:
    """Wall and CPU seconds of this run and the machine's 1-minute load average at its end (the
    CPU is shared: CPU seconds are what the run would take alone on one free core)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_seconds": time.time() - start_wall,
            "cpu_seconds": time.process_time() - start_cpu + children.ru_utime + children.ru_stime,
            "load_average_1min": os.getloadavg()[0]}


def run_quality_suite(suite: Suite, args, out_dir: str) -> dict:
    tasks, skipped = resolve_tasks(suite, args.tasks, args.steps)
    specs = select_optimizers(args.optimizers)
    seeds = list(range(args.seeds or suite.seeds))
    factors = tuple(args.factors) if args.factors else None
    kwargs = {"factors": factors} if factors else {}
    start, start_cpu = time.time(), time.process_time()
    with progress_bar(trial_count(tasks, specs, seeds, factors or SWEEP_FACTORS), suite.name) as advance:
        result = run_suite(tasks, specs, seeds, device=args.device, advance=advance, jobs=args.jobs,
                           threads=getattr(args, "threads", DEFAULT_THREADS), **kwargs)
    result.update(describe(seeds, command=args.command_line, device=args.device), suite=suite.name, skipped_tasks=skipped, jobs=args.jobs,
                  deepopt_registry=sorted(deepopt_registry()), **load_info(start, start_cpu))
    write_json(result, os.path.join(out_dir, "results.json"))
    write_quality_outputs(result, out_dir, plots_too=not args.no_plots)
    print_table(f"{suite.name}: steps to target relative to AdamW (lower is better)", *ratio_rows(result))
    return result


def write_quality_outputs(result: dict, out_dir: str, plots_too: bool = True) -> None:
    """results.md and the PNGs of a quick/quality result (also from a saved results.json)."""
    made = [] if not plots_too else [
        plots.loss_curves(result, os.path.join(out_dir, "loss_curves.png")),
        plots.steps_bars(result, os.path.join(out_dir, "steps_to_target.png"))]
    if result["suite"] != "quick" and plots_too:
        made.append(plots.performance_profile(result, os.path.join(out_dir, "performance_profile.png")))
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(quality_markdown(result, made))


def write_continual_outputs(result: dict, out_dir: str, plots_too: bool = True) -> None:
    """results.md and the accuracy-matrix PNGs of a continual result."""
    made = [] if not plots_too else [
        plots.accuracy_matrices(name, seq["results"], seq["metric"], os.path.join(out_dir, f"accuracy_{name}.png"))
        for name, seq in result["sequences"].items()]
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(continual_markdown(result, made))


def rewrite_report(out_dir: str, update: bool = False) -> None:
    """``python -m benchmarks report DIR``: redo results.md and the plots from DIR/results.json
    (a committed folder under ``benchmarks/results/`` only with ``update``)."""
    import json

    check_out(out_dir, update)
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        raise SystemExit(f"no results.json in {out_dir}: pass a folder written by `python -m benchmarks run`")
    with open(path, encoding="utf-8") as fh:
        result = json.load(fh)
    if result.get("suite") in ("quick", "quality"):
        write_quality_outputs(result, out_dir)
    elif result.get("suite") == "continual":
        write_continual_outputs(result, out_dir)
    else:
        raise SystemExit(f"`report` redoes quick, quality and continual results, not {result.get('suite')!r}")
    announce(out_dir)


def continual_markdown(result: dict, plot_paths: Sequence[str]) -> str:
    parts = ["# `continual` suite results", ""] + header_lines(result) + [""]
    parts += [f"EWC lambda {result['ewc_lambda']:g}; replay buffer {result['replay_per_task']} examples per task "
              "(an upper reference: it stores data). BWT < 0 means forgetting; FWT > 0 means earlier tasks helped. "
              "Mean +- std over seeds.", ""]
    for name, seq in result["sequences"].items():
        parts += [f"## {name} ({seq['n_tasks']} tasks x {seq['steps_per_task']} steps; metric: {seq['metric']}, "
                  f"{'higher' if seq['higher_is_better'] else 'lower'} is better)", ""]
        rows = []
        for method, r in seq["results"].items():
            cells = [fmt_loss(r[k]["mean"], r[k]["std"]) if r[k]["failed"] < r[k]["n"] else "failed"
                     for k in ("average", "bwt", "fwt")]
            rows.append([method, f"{r['lr']:.2g}"] + cells)
        parts += [markdown_table(["method", "lr", f"average {seq['metric']}", "BWT", "FWT"], rows), ""]
    errors = [(s, m, e) for s, seq in result["sequences"].items() for m, r in seq["results"].items() for e in r["errors"]]
    if errors:
        parts += ["## Errors", ""] + [f"- `{m}` on `{s}`: {e}" for s, m, e in errors] + [""]
    parts += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plot_paths]
    return "\n".join(parts) + "\n"


def run_continual_suite(suite: Suite, args, out_dir: str) -> dict:
    sequences = list(args.tasks or suite.tasks)
    unknown = [s for s in sequences if s not in SEQUENCES]
    if unknown:
        raise SystemExit(f"unknown continual sequences {unknown}; choose from {sorted(SEQUENCES)}")
    specs = select_optimizers(args.optimizers)
    seeds = list(range(args.seeds or suite.seeds))
    kwargs = {"factors": tuple(args.factors)} if args.factors else {}
    start, start_cpu = time.time(), time.process_time()
    with progress_bar(continual_trial_count(sequences, specs, seeds), suite.name) as advance:
        result = run_continual(sequences, specs, seeds, steps=args.steps, advance=advance, device=args.device, **kwargs)
    result.update(describe(seeds, command=args.command_line, device=args.device), suite=suite.name,
                  deepopt_registry=sorted(deepopt_registry()), **load_info(start, start_cpu))
    write_json(result, os.path.join(out_dir, "results.json"))
    write_continual_outputs(result, out_dir, plots_too=not args.no_plots)
    for name, seq in result["sequences"].items():
        rows = [[m, fmt_loss(r["average"]["mean"]), fmt_loss(r["bwt"]["mean"]), fmt_loss(r["fwt"]["mean"])]
                for m, r in seq["results"].items()]
        print_table(f"continual / {name} ({seq['metric']})", ["method", "average", "BWT", "FWT"], rows)
    return result


def output_dir(suite: Suite, out: str | None = None, update: bool = False) -> str:
    """``--out``; else ``benchmarks/results/<suite>/`` with ``--update-results``; else a fresh
    ``./runs/<suite>-<time>/``."""
    return run_dir(suite.name, out, update)


def run_named_suite(args) -> dict:
    """Dispatch ``python -m benchmarks run`` (``args`` from :mod:`benchmarks.cli`)."""
    import torch

    if args.suite in ALIASES:
        print(f"--suite {args.suite} is now --suite {ALIASES[args.suite]} (the old name goes in the next release)",
              flush=True)
        args.suite = ALIASES[args.suite]
    suite = SUITES[args.suite]
    if not (getattr(args, "smoke", False) and args.device == "cpu"):
        check_cuda(suite, args.device)
    name = "speed_cpu" if suite.name == "speed" and args.device == "cpu" else suite.name  # not over GPU results
    out_dir = run_dir(name, args.out, getattr(args, "update_results", False))
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(getattr(args, "threads", DEFAULT_THREADS))
    if suite.name in ("quick", "quality"):
        result = run_quality_suite(suite, args, out_dir)
    elif suite.name == "continual":
        result = run_continual_suite(suite, args, out_dir)
    elif suite.name == "speed":
        from .speed import run_speed_suite

        result = run_speed_suite(args, out_dir)
    else:
        from .layers.suite import run_layers_suite

        result = run_layers_suite(args, out_dir)
    announce(out_dir)
    return result


__all__ = ["ALIASES", "DEFAULT_THREADS", "SUITES", "Suite", "output_dir", "run_named_suite", "fmt_ratio"]
