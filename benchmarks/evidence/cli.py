"""Command line of the GPU evidence runs (issue 9).

    python -m benchmarks.evidence run --experiments lm recall continual --preset gpu --out /tmp/ev
    python -m benchmarks.evidence report --records /tmp/ev/records.jsonl

Both write to ``--out``, by default a fresh ``./runs/evidence-<time>/``, and print it at the end;
the committed ``benchmarks/results/evidence/`` is written only with ``--update-results``.

``run`` spreads every experiment's jobs over the devices (``--devices auto``: every visible GPU,
else the CPU) and appends one record per job to ``<out>/records.jsonl`` (a rerun skips the jobs
already there). An experiment module may define ``prepare(preset, device, **overrides) -> dict``: extra overrides
chosen on the first device before its jobs are made (``lm`` picks its token budget there).
``report`` reads one record per job (:func:`~benchmarks.evidence.pool.latest_records`: a job
redone after being cut short counts once) and writes, per experiment, ``<out>/<experiment>/results.md``,
``results.json`` and its plots from any number of record files.

Example:
    >>> args = parser().parse_args(["run", "--experiments", "recall", "--preset", "tiny", "--out", "/tmp/x"])
    >>> args.experiments, args.preset, args.seeds
    (['recall'], 'tiny', None)
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import sys
import time
from pathlib import Path

from ..outdir import add_arguments as add_out_arguments, announce, run_dir
from .pool import experiment_module, latest_records, load_records, run_jobs

EXPERIMENTS = ("lm", "lm_optimizers", "continual", "recall")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.evidence",
                                description="Nested Learning claims, tested at small scale (issue 9).")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run experiments' jobs over the devices")
    run.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, required=True)
    run.add_argument("--preset", default="gpu", help="size preset of every experiment: tiny (CPU, seconds) or gpu")
    run.add_argument("--seeds", type=int, help="number of seeds 0..N-1 (default: the preset's)")
    run.add_argument("--devices", default="auto", help="comma-separated devices (cuda:0,cuda:1 or cpu); auto = all GPUs")
    add_out_arguments(run, "evidence")
    run.add_argument("--deadline", type=float, help="seconds after which no job starts and running jobs stop training")
    run.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a preset entry (value parsed as JSON): KEY=VALUE for every experiment, "
                          "EXPERIMENT.KEY=VALUE for one (e.g. --set lm.phase=sweep)")
    rep = sub.add_parser("report", help="write results.md / results.json / plots from record files")
    rep.add_argument("--records", nargs="+", required=True)
    add_out_arguments(rep, "evidence")
    rep.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, help="default: every experiment with records")
    return p


def devices(spec: str) -> list[str]:
    """``auto`` -> every visible GPU as cuda:i (or ["cpu"]); otherwise the comma-separated list."""
    if spec != "auto":
        return [d.strip() for d in spec.split(",") if d.strip()]
    import torch

    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def overrides(pairs: list[str], experiment: str) -> dict:
    """``--set`` values for ``experiment``: ``KEY=VALUE`` applies to every experiment,
    ``EXPERIMENT.KEY=VALUE`` to that one only (``lm.phase=sweep``)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set takes KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        if "." in key:
            scope, key = key.split(".", 1)
            if scope not in EXPERIMENTS:
                raise SystemExit(f"--set {pair!r}: {scope!r} is not an experiment ({', '.join(EXPERIMENTS)})")
            if scope != experiment:
                continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    command = "python -m benchmarks.evidence " + " ".join(shlex.quote(a) for a in argv)
    if args.command == "run":
        seeds = None if args.seeds is None else list(range(args.seeds))
        devs = devices(args.devices)
        out = Path(run_dir("evidence", args.out, args.update_results))
        out.mkdir(parents=True, exist_ok=True)
        with (out / "commands.txt").open("a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  {command}\n")
        jobs = []
        for name in args.experiments:
            module = experiment_module(name)
            extra = overrides(args.set, name)
            mine = dict(extra)
            if hasattr(module, "prepare"):  # e.g. pick a token budget from measured step times
                chosen = module.prepare(args.preset, devs[0], **extra)
                mine.update(chosen)
                print(f"{name}: prepared {chosen}", flush=True)
                with (out / "commands.txt").open("a", encoding="utf-8") as fh:
                    fh.write(f"  {name} prepare on {devs[0]}: {json.dumps(chosen)}\n")
            jobs += module.jobs(args.preset, seeds, **mine)
        print(f"{len(jobs)} jobs over {devs}", flush=True)
        start = time.time()
        records = run_jobs(jobs, devs, out / "records.jsonl", deadline=args.deadline, threads=args.threads)
        failed = [r for r in records if "error" in r]
        print(f"done in {time.time() - start:.0f} s: {len(records)} records, {len(failed)} failed", flush=True)
        for r in failed:
            print(f"FAILED {r['job']['name']}: {r['error'][:300]}")
        announce(str(out))
        return 0
    out = Path(run_dir("evidence", args.out, args.update_results))
    records = latest_records([r for path in args.records for r in load_records(Path(path))])
    names = args.experiments or sorted({r["job"]["experiment"] for r in records})
    for name in names:
        mine = [r for r in records if r["job"]["experiment"] == name]
        if not mine:
            print(f"{name}: no records")
            continue
        header = {"command": command, "record_files": list(args.records)}
        module = experiment_module(name)
        kwargs = {}
        if "other_records" in inspect.signature(module.report).parameters:  # e.g. lm_optimizers reads lm's AdamW runs
            kwargs["other_records"] = [r for r in records if r["job"]["experiment"] != name]
        module.report(mine, out / name, header, **kwargs)
        print(f"{name}: {len(mine)} records -> {out / name}")
    announce(str(out))
    return 0
