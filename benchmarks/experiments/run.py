"""The pool suites (``lm``, ``lm_optimizers``, ``continual_levels``, ``recall``): jobs over the devices, then reports.

``python -m benchmarks run --suite lm recall --devices auto --out DIR`` makes every named suite's
jobs (its experiment module's ``jobs(preset, seeds, **overrides)``; a module may also define
``prepare(preset, device, **overrides) -> dict``, extra overrides chosen on the first device),
runs them all in one :func:`benchmarks.pool.run_jobs` pool (``--devices auto``: every visible GPU,
else the CPU; one worker process per device), appends one record per job to ``DIR/records.jsonl``
(a rerun skips finished jobs) and the command to ``DIR/commands.txt``, then writes each
experiment's ``DIR/<experiment>/results.md``, ``results.json`` and plots from all records there.
``python -m benchmarks report DIR`` redoes those reports from the records alone.

``--set KEY=VALUE`` overrides a preset entry for every suite of the call, ``--set SUITE.KEY=VALUE``
for one (the suite's name or its experiment's record name: ``continual_levels.x`` = ``continual.x``).

Example:
    >>> overrides(["lm.phase=sweep", "seeds=[0]", "recall.steps=5"], "lm")
    {'phase': 'sweep', 'seeds': [0]}
    >>> experiment_of("continual_levels"), devices("cpu")
    ('continual', ['cpu'])
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Sequence

from ..pool import experiment_module, latest_records, load_records, run_jobs

# suite name -> experiment name in job records (and the report's subfolder)
POOL_SUITES = {"lm": "lm", "lm_optimizers": "lm_optimizers", "continual_levels": "continual", "recall": "recall"}
SMOKE_OVERRIDES = {"lm_optimizers": {"model": "transformer"}}  # the tiny preset has no lm sweep to pick from


def experiment_of(suite: str) -> str:
    """The record name of a pool suite's experiment (``continual_levels`` -> ``continual``)."""
    return POOL_SUITES[suite]


def devices(spec: str) -> list[str]:
    """``auto`` -> every visible GPU as cuda:i (or ["cpu"]); ``0,1`` -> cuda:0, cuda:1; names pass through."""
    if spec == "auto":
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    return [f"cuda:{d}" if d.isdigit() else d for d in (s.strip() for s in spec.split(",")) if d]


def overrides(pairs: Sequence[str], suite: str) -> dict:
    """``--set`` values for ``suite`` (value parsed as JSON, else kept as a string)."""
    scopes = {suite, POOL_SUITES.get(suite, suite)}
    known = set(POOL_SUITES) | set(POOL_SUITES.values())
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set takes KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        if "." in key:
            scope, key = key.split(".", 1)
            if scope not in known:
                raise SystemExit(f"--set {pair!r}: {scope!r} is not a pool suite ({', '.join(POOL_SUITES)})")
            if scope not in scopes:
                continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _log(out: Path, line: str) -> None:
    with (out / "commands.txt").open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def run_pool_suites(suites: Sequence[str], args, out_dir: str) -> list[dict]:
    """Run the named pool suites' jobs in one pool into ``out_dir`` and write their reports."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preset = "tiny" if args.smoke else args.preset
    seeds = None if args.seeds is None else list(range(args.seeds))
    devs = devices(args.devices)
    _log(out, f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  {args.command_line}")
    jobs = []
    for suite in suites:
        name = experiment_of(suite)
        module = experiment_module(name)
        extra = {**(SMOKE_OVERRIDES.get(suite, {}) if args.smoke else {}), **overrides(args.set, suite)}
        if hasattr(module, "prepare"):  # e.g. pick a token budget from measured step times
            chosen = module.prepare(preset, devs[0], **extra)
            extra.update(chosen)
            if chosen:
                print(f"{suite}: prepared {chosen}", flush=True)
                _log(out, f"  {name} prepare on {devs[0]}: {json.dumps(chosen)}")
        jobs += module.jobs(preset, seeds, **extra)
    print(f"{len(jobs)} jobs over {devs}", flush=True)
    start = time.time()
    records = run_jobs(jobs, devs, out / "records.jsonl", deadline=args.deadline, threads=args.threads,
                       processes=len(devs) > 1)
    failed = [r for r in records if "error" in r]
    print(f"done in {time.time() - start:.0f} s: {len(records)} records, {len(failed)} failed", flush=True)
    for r in failed:
        print(f"FAILED {r['job']['name']}: {r['error'][:300]}")
    try:
        write_reports(out, [out / "records.jsonl"], args.command_line, [experiment_of(s) for s in suites])
    except Exception as err:  # e.g. no matplotlib on a GPU machine: the records are safe, `report DIR` redoes it
        print(f"reports not written ({type(err).__name__}: {err}); run `python -m benchmarks report {out}`", flush=True)
    return records


def write_reports(out_dir: Path, record_files: Sequence[Path], command: str,
                  experiments: Sequence[str] | None = None, flat: bool = False) -> list[str]:
    """Each experiment's ``out_dir/<experiment>/`` report from the records (one per job: the last
    full run, see :func:`benchmarks.pool.latest_records`), or with ``flat`` the one experiment's
    report in ``out_dir`` itself; returns the experiments reported."""
    records = latest_records([r for path in record_files for r in load_records(Path(path))])
    names = experiments or sorted({r["job"]["experiment"] for r in records if "." not in r["job"]["experiment"]})
    if flat and len(names) != 1:
        raise ValueError(f"a flat report takes the records of one experiment, got {names}")
    done = []
    for name in names:
        mine = [r for r in records if r["job"]["experiment"] == name]
        if not mine:
            print(f"{name}: no records")
            continue
        header = {"command": command, "record_files": [str(p) for p in record_files]}
        module = experiment_module(name)
        kwargs = {}
        if "other_records" in inspect.signature(module.report).parameters:  # lm_optimizers reads lm's AdamW runs
            kwargs["other_records"] = [r for r in records if r["job"]["experiment"] != name]
        where = Path(out_dir) if flat else Path(out_dir) / name
        module.report(mine, where, header, **kwargs)
        print(f"{name}: {len(mine)} records -> {where}")
        done.append(name)
    return done
