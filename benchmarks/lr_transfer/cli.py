"""Command line: ``python -m benchmarks.lr_transfer [--tasks ...] [--optimizers ...] [--seeds N]``.

Example:
    >>> args = parser().parse_args(["--optimizers", "AdamW", "M3", "--lrs", "1e-3", "1e-2"])
    >>> args.optimizers, args.lrs, args.seeds, args.threads
    (['AdamW', 'M3'], [0.001, 0.01], 2, 1)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from ..environment import describe
from ..optimizers import select_optimizers
from ..outdir import add_arguments as add_out_arguments, announce, run_dir
from ..report import print_table
from ..suite_runs import load_info, progress_bar
from .report import rule_rows, write
from .sweep import GRID, rules, sweep_task, with_ratios
from .tasks import TASKS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lr_transfer",
                                description="Each optimizer's best learning rate relative to AdamW's, on small MLPs.")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    p.add_argument("--optimizers", nargs="+", help="optimizer names (default: every registered one)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(GRID), help="the rate grid (default 1e-4 ... 3)")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per rate (default 2)")
    p.add_argument("--steps", type=int, help="override the tasks' 200 steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the committed results')")
    add_out_arguments(p, "lr_transfer")
    return p


def main(argv: list[str] | None = None) -> int:
    import torch

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.seeds < 1 or args.threads < 1 or any(lr <= 0 for lr in args.lrs):
        raise SystemExit("--seeds and --threads must be >= 1 and every --lrs value > 0")
    try:
        specs = select_optimizers(args.optimizers)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    out = run_dir("lr_transfer", args.out, args.update_results)
    torch.set_num_threads(args.threads)
    tasks = {n: TASKS[n].with_steps(args.steps, min(args.steps, TASKS[n].eval_every)) if args.steps else TASKS[n]
             for n in args.tasks}
    seeds, rates = list(range(args.seeds)), sorted(args.lrs)
    start, start_cpu = time.time(), time.process_time()
    with progress_bar(len(tasks) * len(specs) * len(rates), "lr_transfer") as advance:
        summaries = {n: with_ratios(sweep_task(t, specs, rates, seeds, advance)) for n, t in tasks.items()}
    result = {"tasks": summaries, "rules": rules(summaries), "lrs": rates, "jobs": 1,
              **describe(seeds, command="python -m benchmarks.lr_transfer " + " ".join(shlex.quote(a) for a in argv)),
              **load_info(start, start_cpu)}
    os.makedirs(out, exist_ok=True)
    write(result, out)
    print_table("lr_transfer: best learning rate relative to AdamW's", *rule_rows(result))
    announce(out)
    return 0
