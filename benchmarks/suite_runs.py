"""The ``quick``, ``quality`` and ``continual`` suites: run, write results.json / results.md / plots.

``run_quality_suite`` and ``run_continual_suite`` take the parsed ``python -m benchmarks run``
arguments and an output folder; ``write_quality_outputs`` and ``write_continual_outputs`` redo the
Markdown and plots from a saved ``results.json`` (``python -m benchmarks report``).

Example:
    >>> from benchmarks.suites import SUITES
    >>> tasks, skipped = resolve_tasks(SUITES["quick"], None, steps=5)
    >>> [t.name for t in tasks], tasks[0].steps, skipped
    (['digits_mlp', 'quadratic_illcond', 'char_transformer'], 5, {})
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from typing import Callable, Iterator, Sequence

from . import plots
from .continual import continual_trial_count, run_continual
from .continual_tasks import SEQUENCES
from .environment import describe
from .optimizers import deepopt_registry, select_optimizers
from .quality import run_suite, trial_count
from .report import fmt_loss, header_lines, markdown_table, print_table, quality_markdown, ratio_rows, write_json
from .runner import SWEEP_FACTORS
from .tasks import get_task

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


def check_cuda(suite, device: str) -> None:
    """Refuse a GPU suite without CUDA, with the reason."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available() and not suite.needs_cuda:
        raise SystemExit(f"--device {device} was asked for, but this machine has no CUDA device; use --device cpu")
    if suite.needs_cuda and (not device.startswith("cuda") or not torch.cuda.is_available()):
        raise SystemExit(f"the `{suite.name}` suite needs a CUDA GPU (it times kernels with CUDA events); "
                         f"this machine has {'no CUDA device' if not torch.cuda.is_available() else 'device=' + device}. "
                         "Run it on a GPU machine with --device cuda.")


def resolve_tasks(suite, names: Sequence[str] | None, steps: int | None) -> tuple[list, dict]:
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


def run_quality_suite(suite, args, out_dir: str) -> dict:
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


def run_continual_suite(suite, args, out_dir: str) -> dict:
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


