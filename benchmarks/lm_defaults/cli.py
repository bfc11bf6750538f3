"""``python -m benchmarks.lm_defaults``: every LM at its default arguments, trained over the GPUs.

Jobs (model x seed, :mod:`.train`) go to one worker process per device through
:mod:`benchmarks.pool` (slowest first from a shared queue; one device: in this process).
Each job stops at ``--max-seconds`` (recorded as cut short); no job starts after ``--deadline``
seconds (recorded as not started). Writes ``records.jsonl`` (a rerun into the same folder skips
finished jobs), ``results.json``, ``results.md`` and ``loss_curves.png`` to ``./runs/lm_defaults-<time>/``
(``--update-results``: ``benchmarks/results/lm_defaults/``; ``--out DIR``), then prints the summary.

    python -m benchmarks.lm_defaults --devices 0,1,2,3          # 4 models x 3 seeds x 1000 steps
    python -m benchmarks.lm_defaults --smoke --devices cpu      # tiny, seconds on a CPU

Example:
    >>> args = parser().parse_args(["--devices", "0,1", "--max-seconds", "60"])
    >>> devices(args.devices), args.max_seconds, args.steps
    (['cuda:0', 'cuda:1'], 60.0, None)
    >>> [j.name for j in make_jobs(["transformer"], [0, 1], dict(GPU, steps=10), 60.0)]
    ['lm_defaults/transformer/s0', 'lm_defaults/transformer/s1']
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ..environment import describe
from ..pool import Job, latest_records, load_records, run_jobs
from ..outdir import add_arguments as add_out_arguments, announce, run_dir
from ..report import print_table
from .report import model_rows, seed_rows, write_report
from .train import GPU, MODELS, SMOKE

# seconds per step measured on an H200 (benchmarks/experiments/lm.py); only orders the queue, slowest first
SECONDS_PER_STEP = {"transformer": 0.0145, "hope_attention": 0.0229, "titans": 0.543, "hope": 1.488}
MAX_SECONDS, DEADLINE = 120.0, 330.0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_defaults",
                                description="Every nl_layers LM at its default arguments: stability, loss, bpc, speed.")
    p.add_argument("--devices", default="auto", help="0,1,2,3 or cuda:0,cuda:1 or cpu; auto = every visible GPU (else cpu)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--steps", type=int, help="AdamW steps per job (default 1000; --smoke 4)")
    p.add_argument("--max-seconds", type=float, default=MAX_SECONDS, help="time cap per job (default 120)")
    p.add_argument("--deadline", type=float, default=DEADLINE,
                   help="no job starts after this many seconds (default 330; 0 = none)")
    for name, kind in (("dim", int), ("depth", int), ("heads", int), ("batch", int), ("seq-len", int), ("lr", float),
                       ("warmup", int), ("clip", float)):
        default = GPU[name.replace("-", "_")]
        p.add_argument(f"--{name}", type=kind, help=f"default {default if default is not None else 'the constructor default'}")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="fp32 with TF32 matmuls (default) or bf16 autocast")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and 4 steps (CPU, seconds)")
    add_out_arguments(p, "lm_defaults")
    p.add_argument("--no-plots", action="store_true")
    return p


def devices(spec: str) -> list[str]:
    """``auto`` -> every visible GPU (or cpu); ``0,1`` -> cuda:0, cuda:1; names pass through."""
    if spec == "auto":
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    return [f"cuda:{d}" if d.isdigit() else d for d in (s.strip() for s in spec.split(",")) if d]


def config(args) -> dict:
    """The preset (``GPU`` or ``SMOKE``) with the command line's overrides."""
    cfg = dict(SMOKE if args.smoke else GPU)
    for key in ("dim", "depth", "heads", "batch", "seq_len", "lr", "warmup", "clip", "steps", "precision"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def make_jobs(models, seeds, cfg: dict, max_seconds: float | None) -> list[Job]:
    """One job per model and seed; cost (queue order): the expected seconds, at most the cap."""
    jobs = []
    for m in models:
        cost = SECONDS_PER_STEP[m] * cfg["steps"]
        cost = min(cost, max_seconds) + SECONDS_PER_STEP[m] if max_seconds else cost
        for s in seeds:
            jobs.append(Job("benchmarks.lm_defaults.train", f"lm_defaults/{m}/s{s}", dict(cfg, model=m, seed=s), cost))
    return jobs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    command = "python -m benchmarks.lm_defaults " + " ".join(shlex.quote(a) for a in argv)
    devs = devices(args.devices)
    if any(d.startswith("cuda") for d in devs):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--devices {args.devices} asks for CUDA, but this machine has none; use --devices cpu")
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    out = Path(run_dir("lm_defaults", args.out, args.update_results))
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(args)
    max_seconds = args.max_seconds or None
    jobs = make_jobs(args.models, list(range(args.seeds)), cfg, max_seconds)
    params = {j.name: dict(j.params, max_seconds=max_seconds) if max_seconds else j.params for j in jobs}
    jobs = [Job(j.experiment, j.name, params[j.name], j.cost) for j in jobs]
    print(f"lm_defaults: {len(jobs)} jobs over {devs}, cap {max_seconds} s per job, deadline {args.deadline or None} s; "
          f"writing to {out.resolve()}", flush=True)
    start = time.time()
    run_jobs(jobs, devs, out / "records.jsonl", deadline=args.deadline or None, processes=len(devs) > 1)
    done = {r["job"]["name"]: r for r in latest_records(load_records(out / "records.jsonl"))}
    records = [done.get(j.name, {"job": {"name": j.name, "params": j.params}}) for j in jobs]
    header = describe(list(range(args.seeds)), command=command, device=devs[0])
    header.update(config=cfg, max_seconds=max_seconds, deadline=args.deadline or None, wall_seconds=time.time() - start,
                  gpus=sorted({r.get("gpu", r.get("device", "-")) for r in records if "device" in r}) or devs)
    paths = write_report(records, str(out), header, plots_too=not args.no_plots)
    print_table("lm_defaults: per model and seed", *seed_rows(records))
    print_table("lm_defaults: per model", *model_rows(records))
    print(f"lm_defaults: wrote {', '.join(Path(p).name for p in paths)} and records.jsonl", flush=True)
    announce(str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
