"""Continual-learning protocol for ``deepopt.continual.Recipe`` against the literature's baselines.

Protocol: each method trains one model through a sequence of tasks (the steps per task of
:mod:`benchmarks.continual_sequences`, minibatches of 64, AdamW at ``LR`` for every method), with
the accuracy on every task's held-out set after each task (the matrix R) and of the untrained
model; metrics from :mod:`deepopt.continual.metrics` (average accuracy, BWT, FWT, learning
accuracy, forgetting, per-task curves), spread over seeds.

Methods:
- ``finetune``: AdamW, nothing else;
- ``EWC`` (Kirkpatrick et al. 2017, online): + (lambda/2) sum F (theta - theta*)^2, F the per-example
  Fisher diagonal of ``FISHER_SAMPLES`` examples of each finished task, summed over tasks;
- ``SI`` (Zenke et al. 2017): + c sum Omega (theta - theta*)^2, Omega += max(0, -sum_t g dtheta) /
  (Delta^2 + xi) at each task end;
- ``LwF`` (Li and Hoiem 2017): + alpha T^2 KL(old model || model) on the current inputs, over each
  earlier task's logit group (``class_groups``), the old model frozen at the last task end;
- ``replay``: + the loss on a minibatch from a buffer of ``REPLAY_PER_TASK`` stored examples per
  earlier task: the reference ceiling (it stores data; the others do not);
- ``recipe``: ``deepopt.continual.Recipe(model, lr=LR, **setting)`` with ``end_task()`` at boundaries.

Selection: each method's knob (``GRIDS``) is chosen on the validation sequences (seeds
``VAL_SEEDS``) by the mean average accuracy over them; the chosen settings then run with the test
seeds on the test sequences. The recipe has one setting for every sequence.

    python -m benchmarks run --suite continual_recipe     # or: python -m benchmarks.continual_recipe
    (``--update-results`` rewrites the committed benchmarks/results/continual_recipe/; ``--smoke``:
    one tiny grid point per method, 3 steps per task, one seed, seconds;
    ``--validation-check 100 101 ... 109``: only ``CHECK_SETTINGS`` on the validation sequences
    with those seeds, into validation_check.json: more seeds than the selection's, no test data;
    ``--test-only results.json [--recipe JSON]``: no selection, the test sequences with the
    baselines' committed knobs and the recipe's defaults (or the given knobs), into test_only.json)

Example:
    >>> from benchmarks.continual_sequences import SEQUENCES
    >>> seq = SEQUENCES["split_digits"](n_tasks=2, steps=3)
    >>> out = run(seq, "SI", {"c": 1.0}, seed=0)
    >>> len(out["matrix"]), round(sum(out["untrained"]) / 2, 1) <= 1.0
    (2, True)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

import deepopt
from deepopt.continual import metrics

from .continual_sequences import SEQUENCES, TEST_SEQUENCES, VALIDATION_SEQUENCES, class_groups
from .continual_tasks import data_generator
from .outdir import add_arguments as add_out_arguments, announce, run_dir, save

LR = 1e-2
FISHER_SAMPLES = 64
REPLAY_PER_TASK = 32
REPLAY_BATCH = 32
SI_XI = 1e-3
LWF_T = 2.0
VAL_SEEDS = (100, 101)
TEST_SEEDS = (0, 1, 2, 3, 4)

#: knob grids searched on the validation sequences
GRIDS: dict[str, list[dict[str, Any]]] = {
    "finetune": [{}],
    "EWC": [{"lam": v} for v in (1.0, 10.0, 100.0, 1000.0, 10000.0)],
    "SI": [{"c": v} for v in (0.01, 0.1, 1.0, 10.0, 100.0)],
    "LwF": [{"alpha": v} for v in (0.25, 0.5, 1.0, 2.0, 4.0)],
    "replay": [{}],
    # strength 0.001 and 0.003 below the first grid's lowest (0.01, chosen by it), distill 0.5 above its
    # highest; strength 0 (no pull: distillation alone, importance unused) closes the grid from below
    # (every point names its damping: the first two rounds' points have none, damping=0)
    "recipe": [{"strength": 0.0, "distill": d, "importance": "fisher", "importance_beta": 0.0, "coupling": "gradient",
                "damping": 0.0} for d in (0.1, 0.2, 0.3, 0.5)]
    + [{"strength": s, "distill": d, "importance": i, "importance_beta": b, "coupling": "gradient", "damping": 0.0}
       for (i, b), s, d in itertools.product((("fisher", 0.0), ("fisher", 0.9), ("fisher", 0.99), ("path", 0.0)),
                                             (0.001, 0.003, 0.01, 0.03, 0.1, 0.3), (0.0, 0.1, 0.2, 0.3, 0.5))]
    + [{"strength": s, "distill": d, "importance": "path", "importance_beta": 0.0, "coupling": "decoupled",
        "damping": 0.0} for s, d in itertools.product((3.0, 10.0), (0.2, 0.3))]
    # third round: the importance-damped learning rate (damping > 0) around the former choice's
    # importance, and the predictive Fisher taken at consolidation (importance="predictive")
    + [{"strength": s, "distill": d, "importance": "fisher", "importance_beta": 0.9, "coupling": "gradient",
        "damping": k} for s, d, k in itertools.product((0.01, 0.03, 0.1, 0.3), (0.1, 0.2), (1.0, 3.0, 10.0))]
    + [{"strength": s, "distill": d, "importance": "predictive", "importance_beta": 0.0, "coupling": "gradient",
        "damping": 0.0} for s, d in itertools.product((0.01, 0.03, 0.1), (0.1, 0.2))],
}
# every point of the three rounds ran without the shared pull (the default then); naming share 0 keeps
# them so now that the defaults share (the second validation round's choice, see deepopt.continual.DEFAULTS)
GRIDS["recipe"] = [{**knobs, "share": 0.0} for knobs in GRIDS["recipe"]]


class _Base:
    """AdamW fine-tuning; subclasses add a penalty (``extra``) and task-end work (``end_task``).

    ``opt`` (default: AdamW at ``LR``, no weight decay) and ``batch`` (default 64) let another
    protocol (the ``continual_levels`` suite) train the same learners with its own optimizer and
    minibatch size."""

    def __init__(self, model, seq, gen, opt=None, batch: int = 64):
        self.model, self.seq, self.gen, self.batch = model, seq, gen, batch
        self.opt = opt if opt is not None else torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)

    def extra(self, task, x, y):
        return None

    def train_step(self, task):
        """One minibatch of ``task``: its loss plus ``extra``, backward, the optimizer's step."""
        self.opt.zero_grad(set_to_none=True)
        x, y = self.seq.sample(task, self.gen, self.batch)
        loss = self.seq.loss_on(self.model, task, x, y)
        more = self.extra(task, x, y)
        total = loss if more is None else loss + more
        if not math.isfinite(float(total.detach())):
            raise FloatingPointError(f"loss became {float(total)} on task {task}")
        total.backward()
        self.before_step()
        self.opt.step()
        self.after_step()

    def before_step(self):
        pass

    def after_step(self):
        pass

    def end_task(self, task):
        pass


class Finetune(_Base):
    pass


class EWC(_Base):
    def __init__(self, model, seq, gen, lam, **base):
        super().__init__(model, seq, gen, **base)
        self.lam, self.fisher, self.anchor = lam, None, None

    def extra(self, task, x, y):
        if self.fisher is None:
            return None
        return 0.5 * self.lam * sum((f * (p - a) ** 2).sum()
                                    for p, f, a in zip(self.model.parameters(), self.fisher, self.anchor))

    def end_task(self, task):
        fisher = [torch.zeros_like(p) for p in self.model.parameters()]
        x, y = self.seq.sample(task, self.gen, FISHER_SAMPLES)
        for i in range(FISHER_SAMPLES):
            self.model.zero_grad(set_to_none=True)
            self.seq.loss_on(self.model, task, x[i : i + 1], y[i : i + 1]).backward()
            for f, p in zip(fisher, self.model.parameters()):
                f += p.grad.detach() ** 2 / FISHER_SAMPLES
        self.model.zero_grad(set_to_none=True)
        self.fisher = fisher if self.fisher is None else [a + b for a, b in zip(self.fisher, fisher)]
        self.anchor = [p.detach().clone() for p in self.model.parameters()]


class SI(_Base):
    def __init__(self, model, seq, gen, c, **base):
        super().__init__(model, seq, gen, **base)
        self.c = c
        params = list(model.parameters())
        self.omega = [torch.zeros_like(p) for p in params]
        self.path = [torch.zeros_like(p) for p in params]
        self.anchor = [p.detach().clone() for p in params]
        self.started = False

    def extra(self, task, x, y):
        if not self.started:
            return None
        return self.c * sum((o * (p - a) ** 2).sum() for p, o, a in zip(self.model.parameters(), self.omega, self.anchor))

    def before_step(self):
        # the gradient of the task loss only (the penalty's part removed): SI's path integral
        self._g = [p.grad.detach().clone() for p in self.model.parameters()]
        if self.started:
            for g, p, o, a in zip(self._g, self.model.parameters(), self.omega, self.anchor):
                g -= 2 * self.c * o * (p.detach() - a)
        self._before = [p.detach().clone() for p in self.model.parameters()]

    def after_step(self):
        for w, g, p, b in zip(self.path, self._g, self.model.parameters(), self._before):
            w.add_((-g * (p.detach() - b)).clamp(min=0))

    def end_task(self, task):
        for o, w, p, a in zip(self.omega, self.path, self.model.parameters(), self.anchor):
            o.add_(w / ((p.detach() - a) ** 2 + SI_XI))
            w.zero_()
        self.anchor = [p.detach().clone() for p in self.model.parameters()]
        self.started = True


class LwF(_Base):
    def __init__(self, model, seq, gen, alpha, **base):
        super().__init__(model, seq, gen, **base)
        self.alpha, self.old = alpha, None

    def extra(self, task, x, y):
        if self.old is None:
            return None
        x = x.to(next(self.model.parameters()).device)
        with torch.no_grad():
            teacher = self.old(x)
        student = self.model(x)
        loss = 0.0
        for group in class_groups(self.seq, task):  # the logits' last dimension (a class or a vocabulary)
            t, s = (z[..., group] for z in (teacher, student))
            t, s = (z.reshape(-1, z.shape[-1]) / LWF_T for z in (t, s))
            loss = loss + F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
        return self.alpha * LWF_T**2 * loss

    def end_task(self, task):
        self.old = copy.deepcopy(self.model).eval()
        for p in self.old.parameters():
            p.requires_grad_(False)


class Replay(_Base):
    def __init__(self, model, seq, gen, **base):
        super().__init__(model, seq, gen, **base)
        self.buffer = []

    def extra(self, task, x, y):
        if not self.buffer:
            return None
        old, bx, by = self.buffer[int(torch.randint(len(self.buffer), (1,), generator=self.gen))]
        pick = torch.randint(len(by), (REPLAY_BATCH,), generator=self.gen)
        return self.seq.loss_on(self.model, old, bx[pick], by[pick])

    def end_task(self, task):
        self.buffer.append((task, *self.seq.sample(task, self.gen, REPLAY_PER_TASK)))


class RecipeMethod(_Base):
    """``Recipe(model, lr=LR, **setting)``; with ``task_boundaries=False`` it is never told where a
    task ends (no ``end_task()``) and writes its slow level when its ``"surprise"`` clock finds a
    jump of the training loss."""

    def __init__(self, model, seq, gen, task_boundaries=True, **setting):
        self.model, self.seq, self.gen, self.task_boundaries = model, seq, gen, task_boundaries
        if not task_boundaries:
            setting = {**setting, "clock": "surprise"}
        self.recipe = deepopt.continual.Recipe(model, lr=LR, **setting)

    def train_step(self, task):
        self.recipe.zero_grad()
        loss = self.seq.train_loss(self.model, task, self.gen)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"loss became {float(loss)} on task {task}")
        loss.backward()
        self.recipe.step(loss.detach())

    def end_task(self, task):
        if self.task_boundaries:
            self.recipe.end_task()


METHODS = {"finetune": Finetune, "EWC": EWC, "SI": SI, "LwF": LwF, "replay": Replay, "recipe": RecipeMethod}


def run(seq, method: str, knobs: dict, seed: int) -> dict:
    """One method through ``seq``: the matrix R, the untrained metrics, seconds; ``error`` on failure."""
    out = {"matrix": None, "untrained": None, "seconds": 0.0, "error": None}
    try:
        model = seq.model(seed)
        out["untrained"] = [seq.evaluate(model, j) for j in range(seq.n_tasks)]
        learner = METHODS[method](model, seq, data_generator(seed), **knobs)
        matrix = []
        t0 = time.perf_counter()
        for task in range(seq.n_tasks):
            for _ in range(seq.steps):
                learner.train_step(task)
            learner.end_task(task)
            matrix.append([seq.evaluate(model, j) for j in range(seq.n_tasks)])
        out["seconds"] = time.perf_counter() - t0
        out["matrix"] = matrix
        if isinstance(learner, RecipeMethod):
            out["consolidations"] = learner.recipe.consolidations
    except Exception as err:  # reported, the protocol goes on
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def _spread(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def _pm(spread: dict, sep: str = "+-") -> str:
    """``mean+-std`` to 3 decimals; ``-`` for a missing mean, the mean alone without a spread (one seed).

    Example:
        >>> _pm({"mean": 0.5, "std": 0.01}), _pm({"mean": 0.5, "std": None}), _pm({"mean": None, "std": None})
        ('0.500+-0.010', '0.500', '-')
    """
    if spread["mean"] is None:
        return "-"
    return f"{spread['mean']:.3f}" + ("" if spread["std"] is None else f"{sep}{spread['std']:.3f}")


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["matrix"] is not None]
    per = [metrics.summarize(r["matrix"], r["untrained"]) for r in ok]
    out = {k: _spread([p[k] for p in per]) for k in ("average", "bwt", "fwt", "learning_accuracy", "forgetting")}
    out["errors"] = sorted({r["error"] for r in runs if r["error"]})
    if ok:
        n = len(ok[0]["matrix"])
        mean = [[statistics.fmean(r["matrix"][i][j] for r in ok) for j in range(n)] for i in range(n)]
        out["matrix_mean"] = mean
        out["curves_mean"] = metrics.per_task_curves(mean)
    return out


def select(seeds=VAL_SEEDS, methods=tuple(METHODS), log=print, sizes: dict | None = None, grids=None) -> dict:
    """Every grid point (``grids``, default ``GRIDS``) on the validation sequences (built with
    ``sizes``, e.g. ``{"steps": 3}``); the chosen knobs per method."""
    out, sizes, grids = {}, sizes or {}, grids or GRIDS
    for method in methods:
        scores = []
        for knobs in grids[method]:
            per_seq = {}
            for name, cls in VALIDATION_SEQUENCES.items():
                per_seq[name] = summarize([run(cls(**sizes), method, knobs, s) for s in seeds])
            score = statistics.fmean(v["average"]["mean"] if v["average"]["mean"] is not None else -1.0
                                     for v in per_seq.values())
            scores.append({"knobs": knobs, "score": score,
                           "per_sequence": {k: {m: v[m]["mean"] for m in ("average", "bwt", "learning_accuracy")}
                                            for k, v in per_seq.items()}})
            log(f"val {method} {knobs}: {score:.4f} " + " ".join(
                f"{k}: acc {_pm(v['average'])} bwt {_pm(v['bwt'])}" for k, v in per_seq.items()))
        best = max(scores, key=lambda s: s["score"])
        out[method] = {"chosen": best["knobs"], "grid": scores}
    return out


def evaluate(chosen: dict, seeds=TEST_SEEDS, sequences=tuple(TEST_SEQUENCES), log=print, sizes: dict | None = None) -> dict:
    """The chosen knobs of every method on the test sequences (built with ``sizes``), per seed."""
    out, sizes = {}, sizes or {}
    for name in sequences:
        cls = TEST_SEQUENCES[name]
        out[name] = {}
        for method, knobs in chosen.items():
            runs = [run(cls(**sizes), method, knobs, s) for s in seeds]
            out[name][method] = {"knobs": knobs, **summarize(runs), "runs": runs}
            s = out[name][method]
            log(f"test {name} {method}: acc {_pm(s['average'])} bwt {_pm(s['bwt'])} "
                f"la {_pm(s['learning_accuracy'])}")
    return out


#: the validation check's settings: the recipe's chosen setting, the second round's (no damping) and
#: the chosen one without task boundaries (the surprise clock writes the slow level), beside the
#: baselines' chosen knobs
CHECK_SETTINGS = [("recipe", {"strength": 0.03, "distill": 0.1, "importance": "fisher", "importance_beta": 0.9,
                              "coupling": "gradient", "damping": 3.0, "share": 0.0}),
                  ("recipe", {"strength": 0.01, "distill": 0.1, "importance": "fisher", "importance_beta": 0.9,
                              "coupling": "gradient", "damping": 0.0, "share": 0.0}),
                  ("recipe", {"strength": 0.03, "distill": 0.1, "importance": "fisher", "importance_beta": 0.9,
                              "coupling": "gradient", "damping": 3.0, "task_boundaries": False, "share": 0.0}),
                  ("EWC", {"lam": 100.0}), ("SI", {"c": 0.1}), ("finetune", {})]


def validation_check(seeds, settings=CHECK_SETTINGS, log=print, sizes: dict | None = None) -> list[dict]:
    """``settings`` on the validation sequences with more seeds than the selection's (no test data):
    per sequence, each seed's average accuracy and their spread (a check that a chosen setting's lead
    on the two selection seeds is not their noise; nothing is chosen from it)."""
    out = []
    for method, knobs in settings:
        row = {"method": method, "knobs": knobs, "per_sequence": {}}
        for name, cls in VALIDATION_SEQUENCES.items():
            runs = [run(cls(**(sizes or {})), method, knobs, s) for s in seeds]
            avg = [metrics.average_accuracy(r["matrix"]) if r["matrix"] else None for r in runs]
            row["per_sequence"][name] = {"average_per_seed": avg, "average": _spread(avg)}
            if method == "recipe":  # slow-level writes per seed (one per task boundary when told)
                row["per_sequence"][name]["consolidations_per_seed"] = [r.get("consolidations") for r in runs]
        log(f"check {method} {knobs}: " + " ".join(f"{k}: {_pm(v['average'])}" for k, v in row["per_sequence"].items()))
        out.append(row)
    return out


def targets(test: dict) -> dict:
    """The issue's targets per sequence: |BWT| <= 0.5 x fine-tuning's at average >= fine-tuning's;
    average above EWC's and SI's (means over the test seeds)."""
    out = {}
    for name, res in test.items():
        r, ft = res["recipe"], res["finetune"]
        ratio = abs(r["bwt"]["mean"]) / abs(ft["bwt"]["mean"]) if ft["bwt"]["mean"] else math.inf
        out[name] = {"bwt_ratio_to_finetune": ratio, "half_forgetting": ratio <= 0.5,
                     "average_at_least_finetune": r["average"]["mean"] >= ft["average"]["mean"],
                     "average_above_EWC": r["average"]["mean"] > res["EWC"]["average"]["mean"],
                     "average_above_SI": r["average"]["mean"] > res["SI"]["average"]["mean"]}
    return out


def markdown(result: dict) -> str:
    lines = [f"# Continual recipe: {len(result['test_seeds'])} seeds per sequence", "",
             f"Command: `{result['command']}`", "",
             "Mean +- std over seeds; avg = average accuracy after the last task, BWT = backward transfer "
             "(negative = forgetting), LA = learning accuracy (plasticity), FWT = forward transfer. "
             "Knobs chosen on the validation sequences (" + ", ".join(VALIDATION_SEQUENCES) + ").", ""]
    for name, res in result["test"].items():
        lines += [f"## {name}", "", "| method | knobs | avg | BWT | LA | FWT | forgetting |", "|---|---|---|---|---|---|---|"]
        for method, s in res.items():
            f = lambda k: _pm(s[k], " +- ")  # noqa: E731
            lines.append(f"| {method} | {json.dumps(s['knobs'])} | {f('average')} | {f('bwt')} | "
                         f"{f('learning_accuracy')} | {f('fwt')} | {f('forgetting')} |")
        if not result["targets"]:
            lines.append("")
            continue
        t = result["targets"][name]
        lines += ["", f"Targets: |BWT| recipe / fine-tuning = {t['bwt_ratio_to_finetune']:.2f} "
                      f"(<= 0.5: {t['half_forgetting']}); avg >= fine-tuning: {t['average_at_least_finetune']}; "
                      f"avg > EWC: {t['average_above_EWC']}; avg > SI: {t['average_above_SI']}", ""]
    return "\n".join(lines)


def test_only(args, argv, out_dir) -> dict:
    """The test sequences with given knobs (``--test-only``): a new recipe setting chosen elsewhere on
    validation sequences, beside the baselines' committed choices; test_only.json/md."""
    with open(args.test_only) as fh:
        chosen = {m: k for m, k in json.load(fh)["chosen"].items() if m in args.methods}
    if "recipe" in args.methods:
        chosen["recipe"] = dict(args.recipe) if args.recipe is not None else dict(deepopt.continual.DEFAULTS)
    sizes, seeds = ({"steps": 3}, args.seeds[:1]) if args.smoke else ({}, args.seeds)
    t0 = time.perf_counter()
    test = evaluate(chosen, seeds, log=lambda s: print(s, flush=True), sizes=sizes)
    shown = [os.path.relpath(a) if a == out_dir and os.path.isabs(a) else a for a in (argv if argv is not None else sys.argv[1:])]
    result = {"command": f"OMP_NUM_THREADS={args.threads} python -m benchmarks.continual_recipe " + " ".join(shown),
              "lr": LR, "test_seeds": seeds, "torch": torch.__version__, "threads": args.threads,
              "smoke": args.smoke, "chosen": chosen, "test": test,
              "targets": targets(test) if {"recipe", "finetune", "EWC", "SI"} <= set(chosen) else None,
              "seconds": time.perf_counter() - t0}
    save(out_dir, "test_only", result, markdown(result).replace(
        "Knobs chosen on the validation sequences (" + ", ".join(VALIDATION_SEQUENCES) + ").",
        f"Knobs given (--test-only {args.test_only}): no selection in this run."))
    return result


def main(argv: list[str] | None = None) -> dict:
    """Select on the validation sequences, evaluate on the test ones; results.json, results.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_out_arguments(parser, "continual_recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(TEST_SEEDS))
    parser.add_argument("--val-seeds", type=int, nargs="+", default=list(VAL_SEEDS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the committed results')")
    parser.add_argument("--smoke", action="store_true", help="first grid point per method, 3 steps per task, one seed")
    parser.add_argument("--validation-check", type=int, nargs="+", metavar="SEED",
                        help="only run CHECK_SETTINGS on the validation sequences with these seeds "
                             "(validation_check.json; no selection, no test data)")
    parser.add_argument("--test-only", metavar="RESULTS_JSON",
                        help="no selection: every method's knobs from this results.json's 'chosen', the recipe's "
                             "from --recipe (default: deepopt.continual.DEFAULTS, as the Recipe runs without "
                             "arguments), on the test sequences only; writes test_only.json/md")
    parser.add_argument("--recipe", type=json.loads, default=None, metavar="JSON",
                        help="the recipe's knobs for --test-only, e.g. '{\"strength\": 0.1, \"share\": 30}'")
    args = parser.parse_args(argv)
    out_dir = run_dir("continual_recipe", args.out, args.update_results)
    torch.set_num_threads(args.threads)
    if args.test_only:
        return test_only(args, argv, out_dir)
    if args.validation_check:
        t0 = time.perf_counter()
        rows = validation_check(args.validation_check, log=lambda s: print(s, flush=True))
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "validation_check.json"), "w") as fh:
            json.dump({"command": f"OMP_NUM_THREADS={args.threads} python -m benchmarks.continual_recipe "
                                  + " ".join(argv if argv is not None else sys.argv[1:]),
                       "seeds": args.validation_check, "rows": rows, "seconds": time.perf_counter() - t0}, fh, indent=1)
        announce(out_dir)
        return {"validation_check": rows}
    sizes, grids = ({"steps": 3}, {m: g[:1] for m, g in GRIDS.items()}) if args.smoke else ({}, GRIDS)
    if args.smoke:
        args.seeds, args.val_seeds = args.seeds[:1], args.val_seeds[:1]
    t0 = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    selection = select(args.val_seeds, args.methods, log, sizes=sizes, grids=grids)
    chosen = {m: v["chosen"] for m, v in selection.items()}
    test = evaluate(chosen, args.seeds, log=log, sizes=sizes)
    shown = [os.path.relpath(a) if a == out_dir and os.path.isabs(a) else a for a in (argv if argv is not None else sys.argv[1:])]
    result = {"command": f"OMP_NUM_THREADS={args.threads} python -m benchmarks.continual_recipe " + " ".join(shown),
              "lr": LR, "test_seeds": args.seeds, "val_seeds": args.val_seeds, "torch": torch.__version__,
              "threads": args.threads, "smoke": args.smoke,
              "selection": selection, "chosen": chosen, "test": test,
              "targets": targets(test) if {"recipe", "finetune", "EWC", "SI"} <= set(chosen) else None,
              "seconds": time.perf_counter() - t0}
    save(out_dir, "results", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
