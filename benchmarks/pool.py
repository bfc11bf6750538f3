"""Run a list of independent jobs over several devices, one worker process per device.

A *job* is one training run of one experiment (a name of ``EXPERIMENTS``, or any module given by
its dotted name): a name, a JSON-able ``params`` dict and a rough relative ``cost``. Each
experiment module provides

    jobs(preset: str, seeds: Sequence[int] | None, **overrides) -> list[Job]
    run(params: dict, device: str) -> dict          # one JSON-able result
    report(records: list[dict], out_dir: Path, header: dict) -> None

A record is ``{"job": {...}, "device", "gpu" (CUDA only), "seconds", "result" or "error"}``.

Workers take jobs largest-cost first from a shared queue (spawned processes, one per device:
``cuda:0``, ``cuda:1``, ... or ``cpu``), and append one JSON line per finished job to
``records.jsonl``; a job that raises is recorded with its traceback and never stops the others.
A job already in ``records.jsonl`` (same name, finished: no error, not cut short) is skipped, so a
cut-off run resumes.
No job starts after ``deadline`` seconds from the start; a job is told the seconds it has left
(``params["max_seconds"]``) and stops training there, recording that it was cut short.

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "records.jsonl"
    >>> jobs = [Job("selftest", "a", {"x": 2}, 1.0)]
    >>> recs = run_jobs(jobs, ["cpu"], out, processes=False)
    >>> recs[0]["result"]["x_squared"]
    4
"""

from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence


# experiment name in job records -> module (``continual`` is the ``continual_levels`` suite's name in records)
EXPERIMENTS = {"lm": "benchmarks.experiments.lm", "lm_optimizers": "benchmarks.experiments.lm_optimizers",
               "continual": "benchmarks.experiments.continual_levels", "recall": "benchmarks.experiments.recall"}


@dataclass(frozen=True)
class Job:
    """One run: ``experiment`` names the module (``EXPERIMENTS`` or dotted) whose ``run`` executes it."""

    experiment: str
    name: str
    params: dict
    cost: float = 1.0


def experiment_module(name: str):
    """The module of experiment ``name`` (``EXPERIMENTS``: the pool suites' record names), or the
    module ``name`` itself when it is dotted (``benchmarks.lm_defaults.train``); ``selftest`` is a
    built-in trivial experiment."""
    if name == "selftest":
        return _SelfTest
    if "." not in name and name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)} or a dotted module name")
    return importlib.import_module(EXPERIMENTS.get(name, name))


class _SelfTest:
    @staticmethod
    def run(params: dict, device: str) -> dict:
        return {"x_squared": params["x"] ** 2}


def load_records(path: Path) -> list[dict]:
    """Every record of a ``records.jsonl`` file (an absent file has none)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def is_finished(record: dict) -> bool:
    """Whether a record holds a full run: a result, not cut short (such a job is not run again)."""
    return "result" in record and not record["result"].get("cut_short")


def latest_records(records: Sequence[dict]) -> list[dict]:
    """One record per job name: its last full result if it has one, else its last record (a run
    cut short, or an error). Reports read these, so a job redone after a cut-off counts once."""
    chosen: dict[str, dict] = {}
    for r in records:
        prev = chosen.get(r["job"]["name"])
        if prev is None or is_finished(r) or not is_finished(prev):
            chosen[r["job"]["name"]] = r
    return list(chosen.values())


def run_one(job: Job, device: str, max_seconds: float | None = None) -> dict:
    """Run one job and return its record: the job, device, seconds, and ``result`` or ``error``."""
    params = dict(job.params)
    if max_seconds is not None:
        params["max_seconds"] = min(params.get("max_seconds", max_seconds), max_seconds)
    record = {"job": asdict(job), "device": device, "started": time.time()}
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))
        record["gpu"] = torch.cuda.get_device_name(torch.device(device))
    start = time.perf_counter()
    try:
        record["result"] = experiment_module(job.experiment).run(params, device)
    except Exception as err:  # one failing job is a result, never the end of the pool
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()[-4000:]
    record["seconds"] = time.perf_counter() - start
    return record


def _append(path: Path, record: dict, lock) -> None:
    line = json.dumps(record, default=float) + "\n"
    with lock:
        with Path(path).open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()


def _worker(device: str, queue, path: str, lock, deadline_at: float | None, threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    while True:
        job = queue.get()
        if job is None:
            return
        left = None if deadline_at is None else deadline_at - time.time()
        if left is not None and left < 5:
            continue  # drain: past the deadline, nothing new starts
        record = run_one(job, device, left)
        _append(Path(path), record, lock)
        print(f"[{device}] {job.name}: {record['seconds']:.1f} s"
              + (f" ERROR {record['error'][:200]}" if "error" in record else ""), flush=True)


def run_jobs(jobs: Sequence[Job], devices: Sequence[str], records_path: Path, deadline: float | None = None,
             processes: bool = True, threads: int = 1) -> list[dict]:
    """Run ``jobs`` over ``devices`` (see the module doc); returns every record in ``records_path``.

    ``processes=False`` runs in this process on ``devices[0]`` (tests, debugging).
    """
    records_path = Path(records_path)
    records_path.parent.mkdir(parents=True, exist_ok=True)
    done = {r["job"]["name"] for r in load_records(records_path) if is_finished(r)}
    todo = sorted((j for j in jobs if j.name not in done), key=lambda j: -j.cost)
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError("job names must be unique")
    deadline_at = None if deadline is None else time.time() + deadline
    if not processes:
        import threading

        for job in todo:
            left = None if deadline_at is None else deadline_at - time.time()
            if left is not None and left < 5:
                break
            _append(records_path, run_one(job, devices[0], left), threading.Lock())
        return load_records(records_path)
    ctx = mp.get_context("spawn")
    queue, lock = ctx.Queue(), ctx.Lock()
    for job in todo:
        queue.put(job)
    for _ in devices:
        queue.put(None)  # one stop sign per worker
    workers = [ctx.Process(target=_worker, args=(d, queue, str(records_path), lock, deadline_at, threads)) for d in devices]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return load_records(records_path)
