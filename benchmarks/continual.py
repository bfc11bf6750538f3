"""The ``continual`` suite: train on a sequence of tasks and measure what is kept.

Methods (each keeps one optimizer, with its state, across the whole sequence):
- ``finetune-AdamW``, ``finetune-SGD``, ``finetune-Muon``: plain sequential training (baselines);
- ``EWC``: AdamW plus the online elastic-weight-consolidation penalty
  (lambda/2) sum_k F_k (theta_k - theta*_k)^2, F the diagonal per-example Fisher (squared gradients of
  ``FISHER_SAMPLES`` single examples) summed over finished tasks, theta* the weights after the last task;
- ``replay``: AdamW plus, at every step, the loss on a batch from a small buffer of earlier tasks'
  examples (``REPLAY_PER_TASK`` per task): an upper reference, not a competitor (it stores data);
- ``<deepopt name>+slow``: every optimizer in ``deepopt.OPTIMIZERS``, with the sequence's slow level
  spec as param groups with ``"period"`` (``deepopt.group_by_period``): the slow parameters
  accumulate their gradients and update every C steps (the slow levels of Nested Learning).

Learning rate: each method's family centre times the best of the sweep factors on the first task
(seed 0, scored by the first task's metric); methods that are identical on the first task (AdamW,
EWC, replay) share that sweep. Metrics (average, BWT, FWT): see :mod:`benchmarks.metrics`.

Example:
    >>> from benchmarks.continual_tasks import SplitDigits
    >>> from benchmarks.optimizers import select_optimizers
    >>> m = continual_methods(select_optimizers(["AdamW"]))["finetune-AdamW"]
    >>> out = run_sequence(SplitDigits(n_tasks=2, steps=5), m, {"adam": 1e-3, "sgd": 0.1, "muon": 0.02}, seed=0)
    >>> len(out["matrix"]), out["error"]
    (2, None)
"""

from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .continual_tasks import LR_CENTRES, SEQUENCES, data_generator
from .metrics import average_final, backward_transfer, forward_transfer, spread
from .optimizers import OptimizerSpec, build_optimizer, deepopt_kwargs, deepopt_registry, make_deepopt
from .runner import SWEEP_FACTORS

EWC_LAMBDA = 100.0
FISHER_SAMPLES = 64
REPLAY_PER_TASK = 32
REPLAY_BATCH = 16


@dataclass(frozen=True)
class Method:
    """A continual-learning method: an optimizer spec and how it is used ("finetune", "ewc", "replay", "slow")."""

    name: str
    spec: OptimizerSpec
    kind: str


def continual_methods(specs: dict[str, OptimizerSpec]) -> dict[str, Method]:
    """Baselines and references over the torch optimizers present in ``specs``, then deepopt's with slow levels."""
    methods: dict[str, Method] = {}
    for name in ("AdamW", "SGD", "Muon"):
        if name in specs:
            methods[f"finetune-{name}"] = Method(f"finetune-{name}", specs[name], "finetune")
    if "AdamW" in specs:
        methods["EWC"] = Method("EWC", specs["AdamW"], "ewc")
        methods["replay"] = Method("replay", specs["AdamW"], "replay")
    for name, spec in specs.items():
        if spec.source == "deepopt":
            methods[f"{name}+slow"] = Method(f"{name}+slow", spec, "slow")
    return methods


def period_groups(model: nn.Module, spec: dict[str, int]) -> list[dict]:
    """Param groups from a level spec: ``deepopt.group_by_period`` when deepopt has it, else fnmatch globs."""
    import deepopt

    if hasattr(deepopt, "group_by_period"):
        return deepopt.group_by_period(model, spec)
    by_period: dict[int, list] = {}
    for name, p in model.named_parameters():
        period = next((c for pattern, c in spec.items() if fnmatch.fnmatchcase(name, pattern)), 1)
        by_period.setdefault(period, []).append(p)
    return [{"params": ps, "period": c} for c, ps in sorted(by_period.items())]


def _optimizer(method: Method, model: nn.Module, lrs: dict[str, float], slow_spec: dict[str, int]):
    if method.kind == "slow":
        cls = deepopt_registry()[method.spec.name]
        return make_deepopt(cls, period_groups(model, slow_spec), model, lrs[method.spec.family],
                            **deepopt_kwargs(method.spec.name, lrs))
    return build_optimizer(method.spec, model, lrs)


class EWC:
    """Online EWC penalty (see module doc)."""

    def __init__(self, lam: float = EWC_LAMBDA):
        self.lam, self.fisher, self.anchor = lam, None, None

    def penalty(self, model: nn.Module) -> torch.Tensor | float:
        if self.fisher is None:
            return 0.0
        return 0.5 * self.lam * sum((f * (p - a) ** 2).sum()
                                    for p, f, a in zip(model.parameters(), self.fisher, self.anchor))

    def consolidate(self, model: nn.Module, seq, task: int, gen: torch.Generator) -> None:
        fisher = [torch.zeros_like(p) for p in model.parameters()]
        x, y = seq.sample(task, gen, FISHER_SAMPLES)
        for i in range(FISHER_SAMPLES):
            model.zero_grad(set_to_none=True)
            seq.loss_on(model, task, x[i : i + 1], y[i : i + 1]).backward()
            for f, p in zip(fisher, model.parameters()):
                if p.grad is not None:
                    f += p.grad.detach() ** 2 / FISHER_SAMPLES
        model.zero_grad(set_to_none=True)
        self.fisher = fisher if self.fisher is None else [a + b for a, b in zip(self.fisher, fisher)]
        self.anchor = [p.detach().clone() for p in model.parameters()]


def run_sequence(seq, method: Method, lrs: dict[str, float], seed: int, tasks: int | None = None,
                 device: str = "cpu") -> dict:
    """Train ``method`` through the first ``tasks`` tasks of ``seq`` (all by default); R[i][j] and timing."""
    n = seq.n_tasks if tasks is None else tasks
    out = {"matrix": None, "untrained": None, "seconds": 0.0, "error": None}
    try:
        model = seq.model(seed).to(device)
        gen = data_generator(seed)
        opt = _optimizer(method, model, lrs, seq.slow_spec)
        out["untrained"] = [seq.evaluate(model, j) for j in range(seq.n_tasks)]
        ewc, buffer, matrix = EWC(), [], []
        for task in range(n):
            t0 = time.perf_counter()
            for _ in range(seq.steps):
                opt.zero_grad(set_to_none=True)
                loss = seq.train_loss(model, task, gen)
                if method.kind == "ewc":
                    loss = loss + ewc.penalty(model)
                if method.kind == "replay" and buffer:
                    old, x, y = buffer[int(torch.randint(len(buffer), (1,), generator=gen))]
                    pick = torch.randint(len(y), (REPLAY_BATCH,), generator=gen)
                    loss = loss + seq.loss_on(model, old, x[pick], y[pick])
                if not math.isfinite(float(loss.detach())):
                    raise FloatingPointError(f"loss became {float(loss)} on task {task}")
                loss.backward()
                opt.step()
            if method.kind == "ewc":
                ewc.consolidate(model, seq, task, gen)
            if method.kind == "replay":
                buffer.append((task, *seq.sample(task, gen, REPLAY_PER_TASK)))
            out["seconds"] += time.perf_counter() - t0
            matrix.append([seq.evaluate(model, j) for j in range(seq.n_tasks)])
        out["matrix"] = matrix
    except Exception as err:  # a failing method is reported, the suite goes on
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def _choose_factor(seq, method: Method, centres: dict, factors: Sequence[float], device: str) -> tuple[float, list]:
    scores = []
    for factor in factors:
        lrs = {f: c * factor for f, c in centres.items()}
        res = run_sequence(seq, method, lrs, seed=0, tasks=1, device=device)
        score = res["matrix"][0][0] if res["matrix"] else None
        if score is not None and not math.isfinite(score):
            score = None
        scores.append({"factor": factor, "lr": lrs[method.spec.family], "first_task_metric": score,
                       "error": res["error"]})
    sign = 1.0 if seq.higher_is_better else -1.0
    valid = [s for s in scores if s["first_task_metric"] is not None]
    best = max(valid, key=lambda s: (sign * s["first_task_metric"], -s["factor"]))["factor"] if valid else 1.0
    return best, scores


def summarize_method(seq, runs: list[dict]) -> dict:
    ok = [r for r in runs if r["matrix"] is not None]
    summary = {"runs": runs, "errors": sorted({r["error"] for r in runs if r["error"]})}
    if not ok:
        none = spread([])
        return {**summary, "average": none, "bwt": none, "fwt": none, "matrix_mean": None}
    hib = seq.higher_is_better
    n = seq.n_tasks
    summary["average"] = spread([average_final(r["matrix"]) for r in ok])
    summary["bwt"] = spread([backward_transfer(r["matrix"], hib) for r in ok])
    summary["fwt"] = spread([forward_transfer(r["matrix"], r["untrained"], hib) for r in ok])
    summary["matrix_mean"] = [[sum(r["matrix"][i][j] for r in ok) / len(ok) for j in range(n)] for i in range(n)]
    summary["seconds"] = spread([r["seconds"] for r in ok])
    return summary


def run_continual(sequences: Sequence[str], specs: dict[str, OptimizerSpec], seeds: Sequence[int],
                  factors: Sequence[float] = SWEEP_FACTORS, steps: int | None = None,
                  advance: Callable[[str], None] = lambda _: None, device: str = "cpu") -> dict:
    """Every method on every sequence (``steps`` overrides the steps per task, for tiny runs)."""
    methods = continual_methods(specs)
    out = {"sequences": {}, "methods": {m.name: {"optimizer": m.spec.name, "kind": m.kind} for m in methods.values()},
           "ewc_lambda": EWC_LAMBDA, "replay_per_task": REPLAY_PER_TASK, "factors": list(factors)}
    for seq_name in sequences:
        seq = SEQUENCES[seq_name]() if steps is None else SEQUENCES[seq_name](steps=steps)
        centres = LR_CENTRES[seq_name]
        sweeps: dict[tuple, tuple] = {}
        results = {}
        for method in methods.values():
            key = (method.spec.name, method.kind == "slow")
            if key not in sweeps:
                sweeps[key] = _choose_factor(seq, method, centres, factors, device)
            factor, scores = sweeps[key]
            advance(f"{seq_name} / {method.name} sweep")
            lrs = {f: c * factor for f, c in centres.items()}
            runs = []
            for seed in seeds:
                runs.append(run_sequence(seq, method, lrs, seed, device=device))
                advance(f"{seq_name} / {method.name} seed {seed}")
            results[method.name] = {"lr": lrs[method.spec.family], "factor": factor, "sweep": scores,
                                    **summarize_method(seq, runs)}
        out["sequences"][seq_name] = {"metric": seq.metric, "higher_is_better": seq.higher_is_better,
                                      "n_tasks": seq.n_tasks, "steps_per_task": seq.steps,
                                      "slow_spec": seq.slow_spec, "results": results}
    return out


def continual_trial_count(sequences: Sequence[str], specs: dict, seeds: Sequence[int]) -> int:
    return len(sequences) * len(continual_methods(specs)) * (1 + len(seeds))
