"""Command line: ``python -m benchmarks run --suite NAME``, ``list`` and ``report DIR``.

``run`` takes the common options, each suite's group (layers; the pool suites' ``--devices``,
``--deadline``, ``--preset``, ``--set``) and, for ``lm_defaults``, ``lr_transfer`` and
``continual_recipe``, any option of their own command line (``python -m benchmarks.lm_defaults --help``), passed through.

Example:
    >>> args = parser().parse_args(["run", "--suite", "quick", "--optimizers", "AdamW", "SGD"])
    >>> args.suite, args.optimizers, args.threads, args.update_results
    (['quick'], ['AdamW', 'SGD'], 1, False)
"""

from __future__ import annotations

import argparse
import shlex
import sys

from .suite_runs import DEFAULT_THREADS
from .suites import ALIASES, SUITES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="deepopt's optimizer benchmarks against AdamW, SGD and Muon.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a suite and write JSON, Markdown and PNG results")
    run.add_argument("--suite", nargs="+", choices=list(SUITES) + sorted(ALIASES), default=["quick"],
                     metavar="NAME", help="the suite (see `list`); several pool suites share one job pool and folder")
    run.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, seconds: a check, not a result")
    run.add_argument("--optimizers", nargs="+", help="optimizer names (default: all available; see `list`)")
    run.add_argument("--tasks", nargs="+", help="task (or continual sequence) names (default: the suite's)")
    run.add_argument("--seeds", type=int, help="number of seeds 0..N-1 (default: the suite's)")
    run.add_argument("--device", default="cpu", help="cpu or cuda (speed and memory need cuda)")
    run.add_argument("--out", help="output folder (default: a fresh ./runs/<suite>-<time>/)")
    run.add_argument("--update-results", "--reference", dest="update_results", action="store_true",
                     help="rewrite the committed results in benchmarks/results/<suite>/")
    run.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                     help=f"torch threads (default {DEFAULT_THREADS}: the setting of the committed results)")
    run.add_argument("--steps", type=int, help="override every task's steps (steps per task for continual)")
    run.add_argument("--factors", type=float, nargs="+", help="learning-rate sweep factors (default 1/3 1 3)")
    run.add_argument("--jobs", type=int, default=1, help="worker processes over tasks (quick/quality; default 1)")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    layers = run.add_argument_group("layers suite")
    layers.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 1024 4096 16384 65536)")
    layers.add_argument("--tokens", type=int, help="tokens per call, batch = tokens // T (default 65536)")
    layers.add_argument("--dim", type=int, help="mixer width (default 512)")
    layers.add_argument("--heads", type=int, help="mixer heads (default 8)")
    layers.add_argument("--parts", nargs="+", choices=["mixers", "titans", "lm"], help="default: all three")
    layers.add_argument("--mixers", nargs="+", help="only the mixers whose name contains one of these (e.g. delta sdpa)")
    layers.add_argument("--cap-seconds", type=float, help="per measurement; longer lengths are skipped past it (default 20)")
    layers.add_argument("--budget-seconds", type=float, help="for the whole suite, shared by its parts (default 270)")
    layers.add_argument("--no-peers", action="store_true", help="skip fla and titans-pytorch even when installed")
    pool = run.add_argument_group("pool suites (lm, lm_optimizers, continual_levels, recall) and lm_defaults")
    pool.add_argument("--devices", default="auto", help="cuda:0,cuda:1 or 0,1 or cpu; auto = every visible GPU, else cpu")
    pool.add_argument("--deadline", type=float, help="seconds after which no job starts and running jobs stop")
    pool.add_argument("--preset", default="gpu", help="size preset: gpu (default), gpu10x (ten times the tokens: lm, lm_optimizers, continual_levels, recall) or tiny (--smoke)")
    pool.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a preset entry (JSON value): KEY=VALUE for every suite, SUITE.KEY=VALUE for one")
    sub.add_parser("list", help="list suites, tasks (and why any is unavailable) and optimizers")
    redo = sub.add_parser("report", help="redo results.md and the plots from a folder's results.json or records.jsonl")
    redo.add_argument("folder", help="e.g. runs/quality-<time> or benchmarks/results/evidence")
    redo.add_argument("--out", help="write the rebuilt reports here (default: the folder itself)")
    redo.add_argument("--update-results", action="store_true",
                      help="allow rewriting a committed folder under benchmarks/results/")
    return p


def list_everything() -> str:
    from .continual_tasks import SEQUENCES
    from .optimizers import available_optimizers
    from .tasks import TASKS

    from .experiments.run import POOL_SUITES

    lines = ["Suites (python -m benchmarks run --suite NAME; --smoke: seconds on a CPU):"]
    lines += [f"  {s.name:<17} {s.description}" for s in SUITES.values()]
    lines.append("Pool suites and their record names: " + ", ".join(f"{k} ({v})" for k, v in POOL_SUITES.items()))
    lines.append("Tasks (quick / quality):")
    for task in TASKS.values():
        reason = task.availability()
        status = f"  [skipped: {reason}]" if reason else ""
        lines.append(f"  {task.name:<18} {task.steps:>4} steps  {task.description}{status}")
    lines.append("Continual sequences:")
    for name, cls in SEQUENCES.items():
        lines.append(f"  {name:<18} metric {cls.metric}")
    lines.append("Optimizers:")
    for spec in available_optimizers().values():
        lines.append(f"  {spec.name:<24} {spec.source:<8} lr family {spec.family}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser().parse_known_args(argv)
    if extra and args.command != "run":
        parser().error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    args.command_line = "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv)
    if args.command == "list":
        print(list_everything())
        return 0
    if args.command == "report":
        from .rebuild import rewrite_report

        rewrite_report(args.folder, args.update_results, args.out, args.command_line)
        return 0
    if args.seeds is not None and args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise SystemExit(f"--device must be cpu or cuda, got {args.device!r}")
    from .suites import run_named_suite

    try:
        run_named_suite(args)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    return 0


if __name__ == "__main__":
    sys.exit(main())
