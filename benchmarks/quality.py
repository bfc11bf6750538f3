"""The ``quick`` and ``quality`` suites: every optimizer on every task, tuned alike, summarized.

For each task: run the tuning protocol of :mod:`benchmarks.runner` for every optimizer, set the
target to the loss every AdamW seed reaches at AdamW's best rate, then per optimizer record the
final loss over seeds, the steps to target per seed, the cost (median steps; inf when half the
seeds or more miss), its ratio to AdamW's and Muon's cost, and seconds per run. Over tasks:
the performance profile of the costs.

The result is a plain dict ready for JSON (inf written as null: "never reached" / "failed").

Example:
    >>> from benchmarks.tasks import get_task
    >>> from benchmarks.optimizers import select_optimizers
    >>> res = run_suite([get_task("quadratic_illcond").with_steps(20, 10)], select_optimizers(["AdamW", "SGD"]),
    ...                 seeds=[0], factors=(1.0,))
    >>> res["tasks"]["quadratic_illcond"]["results"]["AdamW"]["ratio_adamw"]
    1.0
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
from typing import Callable, Sequence

import torch

from .metrics import cost_of_seeds, performance_profile, spread, steps_to_target, target_from_reference
from .optimizers import OptimizerSpec, select_optimizers
from .runner import SWEEP_FACTORS, OptimizerResult, sweep_and_seeds
from .tasks import Task, get_task

REFERENCE = "AdamW"
PROFILE_TAUS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


def _ratio(cost: float, reference: float) -> float:
    if not math.isfinite(cost) or not math.isfinite(reference) or reference <= 0:
        return math.inf
    return cost / reference


def summarize_task(task: Task, results: dict[str, OptimizerResult]) -> dict:
    """Target, steps to target and spreads for one task (see module doc)."""
    ref_name = REFERENCE if REFERENCE in results else next(iter(results))
    ref_curves = [t.losses for t in results[ref_name].seeds if math.isfinite(t.final)]
    target = target_from_reference(ref_curves) if ref_curves else math.inf
    out: dict[str, dict] = {}
    for name, res in results.items():
        reached = [steps_to_target(t.steps, t.losses, target) if math.isfinite(t.final) else None for t in res.seeds]
        seeds_json = []
        for trial, hit in zip(res.seeds, reached):
            seeds_json.append({**trial.to_json(curve=True), "steps_to_target": hit})
        out[name] = {
            "family": res.family, "best_lr": res.best_lr, "best_factor": res.best_factor, "edge": res.edge,
            "sweep": [t.to_json(curve=False) for t in res.sweep],
            "seeds": seeds_json,
            "final": spread([t.final for t in res.seeds]),
            "steps_to_target": spread(reached),
            "cost": cost_of_seeds(reached),
            "seconds": spread([t.seconds for t in res.seeds]),
            "errors": sorted({t.error for t in res.sweep + res.seeds if t.error}),
        }
    for name in out:
        out[name]["ratio_adamw"] = _ratio(out[name]["cost"], out.get("AdamW", {}).get("cost", math.inf))
        out[name]["ratio_muon"] = _ratio(out[name]["cost"], out.get("Muon", {}).get("cost", math.inf))
    return {"description": task.description, "steps": task.steps, "eval_every": task.eval_every,
            "lr_centres": task.lr_centres, "reference": ref_name, "target": target, "results": out}


def _task_in_worker(job: tuple) -> dict:
    """Run one task in a worker process (tasks and optimizers travel by name; see ``run_suite``)."""
    name, steps, eval_every, optimizer_names, seeds, factors, device, threads = job
    torch.set_num_threads(threads)
    task = get_task(name).with_steps(steps, eval_every)
    specs = select_optimizers(optimizer_names)
    results = {n: sweep_and_seeds(task, spec, seeds, factors, device) for n, spec in specs.items()}
    return summarize_task(task, results)


def run_suite(tasks: Sequence[Task], specs: dict[str, OptimizerSpec], seeds: Sequence[int],
              factors: Sequence[float] = SWEEP_FACTORS, device: str = "cpu",
              advance: Callable[[str], None] = lambda _: None, jobs: int = 1, threads: int | None = None) -> dict:
    """Run every optimizer on every task and summarize (the body of ``quick`` and ``quality``).

    ``jobs > 1`` runs whole tasks in that many worker processes (``threads`` torch threads each,
    default this process's count); the numbers do not change, only the wall time (seconds per run
    are then measured under that load).
    """
    if not tasks:
        raise ValueError("no task to run: pass at least one available task")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    summaries = {}
    if jobs == 1:
        for task in tasks:
            results = {n: sweep_and_seeds(task, spec, seeds, factors, device, advance) for n, spec in specs.items()}
            summaries[task.name] = summarize_task(task, results)
    else:
        threads = threads or torch.get_num_threads()
        work = [(t.name, t.steps, t.eval_every, list(specs), list(seeds), tuple(factors), device, threads)
                for t in tasks]
        per_task = len(specs) * (len(factors) + len(seeds) - 1)
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = {pool.submit(_task_in_worker, job): job[0] for job in work}
            for future in concurrent.futures.as_completed(futures):
                summaries[futures[future]] = future.result()
                for _ in range(per_task):
                    advance(f"{futures[future]} done")
        summaries = {t.name: summaries[t.name] for t in tasks}
    costs = {t: {o: r["cost"] for o, r in s["results"].items()} for t, s in summaries.items()}
    return {"tasks": summaries, "factors": list(factors),
            "optimizers": {n: {"family": s.family, "source": s.source} for n, s in specs.items()},
            "profile": {"taus": list(PROFILE_TAUS), "rho": performance_profile(costs, PROFILE_TAUS)}}


def trial_count(tasks: Sequence[Task], specs: dict, seeds: Sequence[int], factors: Sequence[float]) -> int:
    """How many trials ``run_suite`` will run (for the progress bar)."""
    return len(tasks) * len(specs) * (len(factors) + len(seeds) - 1)
