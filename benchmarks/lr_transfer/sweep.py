"""The sweep: every optimizer at every rate of a fixed grid, and the best rate relative to AdamW's.

Protocol (the same for every optimizer): one trial per (task, optimizer, rate, seed) with the
benchmark runner (no weight decay; a non-finite loss or one 1,000x above the start is a
divergence). A rate's score is the mean final held-out loss over the seeds, infinite when any seed
diverged or failed; the best rate has the lowest score (ties to the smaller rate). Optimizers of
the Muon family take the swept rate on matrices and AdamW's best rate on everything else (as the
suites do, with the task's Adam rate), so AdamW runs first.

Example:
    >>> best_rate({1e-3: 0.5, 3e-3: 0.2, 1e-2: float("inf")})
    0.003
    >>> snap(2.4), snap(0.09), snap(1.0)
    (3.0, 0.1, 1.0)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from typing import Callable, Sequence

from ..optimizers import OptimizerSpec
from ..runner import Trial, run_trial
from ..tasks import FAMILIES, Task

GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
REFERENCE = "AdamW"


def trial(task: Task, spec: OptimizerSpec, lr: float, seed: int, adamw_lr: float | None = None) -> Trial:
    """``spec`` on ``task`` at rate ``lr`` (Muon family: its element-wise part at ``adamw_lr``)."""
    centres = {family: 1.0 for family in FAMILIES}
    if spec.family == "muon" and adamw_lr:
        centres["adam"] = adamw_lr / lr
    return run_trial(replace(task, lr_centres=centres), spec, lr, seed)


def score(trials: Sequence[Trial]) -> float:
    """Mean final loss over seeds; inf when any seed diverged or failed."""
    finals = [t.final for t in trials]
    return statistics.fmean(finals) if all(math.isfinite(f) for f in finals) else math.inf


def best_rate(scores: dict[float, float]) -> float | None:
    """The rate with the lowest score (ties to the smaller rate); None when every rate failed."""
    finite = [(s, lr) for lr, s in scores.items() if math.isfinite(s)]
    return min(finite)[1] if finite else None


def snap(ratio: float) -> float:
    """``ratio`` rounded to the nearest of 1, 3, 10, 30, ... and 1/3, 1/10, ... (in log scale)."""
    steps = round(math.log10(ratio) * 2)  # half decades
    return float(f"{10 ** (steps // 2) * (3.0 if steps % 2 else 1.0):.3g}")


def sweep_task(task: Task, specs: dict[str, OptimizerSpec], rates: Sequence[float], seeds: Sequence[int],
               advance: Callable[[str], None] = lambda _: None) -> dict:
    """Every optimizer of ``specs`` over ``rates`` and ``seeds`` on ``task``; AdamW (when present) first."""
    order = sorted(specs, key=lambda n: n != REFERENCE)
    out, adamw_lr = {}, None
    for name in order:
        spec = specs[name]
        scores, errors = {}, []
        for lr in rates:
            trials = [trial(task, spec, lr, seed, adamw_lr) for seed in seeds]
            scores[lr] = score(trials)
            errors += [f"lr {lr:g} seed {t.seed}: {t.error}" for t in trials if t.error]
            advance(f"{task.name} / {name} lr {lr:g}")
        best = best_rate(scores)
        out[name] = {"family": spec.family, "scores": scores, "best_lr": best, "errors": errors,
                     "edge": best is not None and len(rates) > 1 and best in (min(rates), max(rates))}
        if name == REFERENCE:
            adamw_lr = best
    return {"steps": task.steps, "description": task.description, "reference_lr": adamw_lr, "optimizers": out}


def with_ratios(summary: dict) -> dict:
    """Add ``ratio`` (best rate / AdamW's), ``loss_at_best`` and ``loss_at_adamw_lr`` per optimizer."""
    ref = summary["reference_lr"]
    for r in summary["optimizers"].values():
        best = r["best_lr"]
        r["ratio"] = best / ref if best and ref else None
        r["loss_at_best"] = r["scores"][best] if best else math.inf
        r["loss_at_adamw_lr"] = r["scores"].get(ref, math.inf) if ref else math.inf
    return summary


def rules(tasks: dict[str, dict]) -> dict[str, dict]:
    """Per optimizer: its ratio on every task and the rule of thumb (their geometric mean, snapped)."""
    names = list(dict.fromkeys(n for t in tasks.values() for n in t["optimizers"]))
    out = {}
    for name in names:
        ratios = {t: s["optimizers"][name]["ratio"] for t, s in tasks.items() if name in s["optimizers"]}
        known = [r for r in ratios.values() if r]
        rule = snap(math.exp(statistics.fmean(math.log(r) for r in known))) if known else None
        out[name] = {"ratios": ratios, "rule": rule}
    return out
