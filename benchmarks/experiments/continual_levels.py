"""Suite ``continual_levels`` (experiment ``continual``): do multi-timescale levels reduce forgetting?

Claim tested (Nested Learning, CMS): parameters that learn on slower timescales keep what earlier
tasks taught, so a model with CMS levels forgets less than plain fine-tuning.

Sequences (:mod:`benchmarks.continual_tasks`, one model and one AdamW kept through all tasks):
``shakespeare_genres`` with ``text="raw"`` (raw Markdown, ``nl_layers.TransformerLM``; bits per
character) and ``permuted_digits`` (a ``ResidualMLP`` of :mod:`benchmarks.tasks.digits`; accuracy).
Both models put their feed-forward blocks at ``blocks.<i>.mlp``. Methods (AdamW, one lr per sequence):
- ``finetune``: plain sequential training.
- ``multitimescale``: the MLP of block i gets period ``mts_periods[i * len(mts_periods) // depth]``
  (deeper blocks slower), through ``deepopt.lightning.PeriodicGradients`` on ``torch.optim.AdamW``
  itself, so the base optimizer is byte for byte the one ``finetune`` uses.
- ``nested_cms``: ``nl_layers.nest(model, ffn="blocks.*.mlp", levels=nest_levels)`` turns each MLP
  into a sequential CMS (new zero-output levels at the slower periods); more parameters.
- ``ewc``: AdamW + online EWC (:class:`benchmarks.continual.EWC`, ``ewc_lambda``).
- ``si``: AdamW + synaptic intelligence (:class:`benchmarks.continual_recipe.SI`, ``si_c``).
- ``lwf``: AdamW + learning without forgetting (:class:`benchmarks.continual_recipe.LwF`,
  ``lwf_alpha``: the KL to the model frozen at the last task end, on the current inputs, over the
  whole vocabulary for the text sequence).
- ``replay`` (a reference, it stores data): also the loss on a buffer of earlier tasks' examples.
- ``recipe``: ``deepopt.continual.Recipe(model, lr, weight_decay=...)`` with its defaults
  (``deepopt.continual.DEFAULTS``: the one setting chosen on the validation digit sequences of
  :mod:`benchmarks.continual_recipe`, not tuned on these sequences), ``end_task()`` at each task
  boundary; its AdamW is the one ``finetune`` uses (same lr, same weight decay). A job's
  ``recipe_setting`` (absent in the presets) overrides some of the defaults
  (:mod:`benchmarks.continual_text_validation` sweeps them on a CPU text validation sequence), and
  ``genres`` (absent: comedies, histories, tragedies) orders the text sequence's genres.

A period-C parameter accumulates its gradient over C steps and is stepped every C steps with the
mean. Metrics (:mod:`benchmarks.metrics`): average final, BWT, FWT; for bits per character both
transfers are negated, so **negative BWT = forgetting** everywhere. Learning rates (a CPU sweep of
``finetune`` on the first task): text 3e-3 (bpc 3.04 / 2.96 / 3.21 at 1e-3 / 3e-3 / 1e-2), digits
1e-3. Sizing: 20-steps-per-task runs on an H200 (``calibrate.sh``) gave ``est_step_s`` 0.025 s
(text) and 0.004 s (digits); the ``gpu`` preset is 2 sequences x 8 methods x 3 seeds, text 3 x 400
steps, digits 5 x 500, each job capped at 240 s: 1,426 s of jobs by ``est_step_s`` and
``COST_FACTOR`` (text 1,042 s, of which the recipe 203 s; digits 384 s; the six methods before
``si`` and ``lwf`` 1,014 s). The H200 runs of the first five methods at these sizes took 0.5-1.1x of
their estimate, 0.71x summed (text fine-tuning 17.5 s a run against 30.8 s), so one worker would
need about 17 minutes. The runs are launch-bound
(1.8 M and 0.2 M parameters), so several workers can share one GPU
(``--devices cuda:0,cuda:0,cuda:0,cuda:0``); jobs start largest cost first (text, the recipe first)
and ``--deadline`` stops the rest. Per-sequence entries: ``--set
continual.shakespeare_genres.steps_per_task=400``. Report: :mod:`.continual_levels_report`.

``compile="graphed_loss"`` (the gpu10x preset's) replays each task's training loss, forward and
backward, as CUDA graphs (``nl_layers.graphed_loss``, one capture per task on a batch of a
generator of its own) for the methods whose step is that loss plus eager terms (``GRAPHED``:
finetune, multitimescale, nested_cms, ewc, replay); the recipe's, SI's and LwF's steps read the
model's inputs through hooks or run their own losses, so they stay eager. On the CPU the graphed
loss is the eager one: the same run, bit for bit (test).

Example:
    >>> js = jobs("tiny", None)
    >>> sorted({j.params["method"] for j in js}) == sorted(METHODS)
    True
    >>> res = run({**js[0].params, "steps_per_task": 2}, "cpu")
    >>> len(res["matrix"]) == res["n_tasks"]
    True
"""

from __future__ import annotations

import copy
import math
import time
from typing import Sequence

import torch
from torch import nn

from ..continual import EWC
from ..metrics import average_final, backward_transfer, forward_transfer
from ..pool import Job
from .continual_levels_report import METHODS, report, summarize  # noqa: F401  (the suite's report)

SEQUENCES = ("shakespeare_genres", "permuted_digits")
COMPILE = ("none", "graphed_loss")
#: methods whose training step is the task's loss plus eager terms (a graphed loss can stand in for it)
GRAPHED = ("finetune", "multitimescale", "nested_cms", "ewc", "replay")
SI_C_TEXT, LWF_ALPHA_TEXT = 0.001, 0.25  # text validation: baselines_text_{a,b} (benchmarks/results/continual_text_validation)

# si_c / lwf_alpha: text from the CPU text validation sequence (benchmarks.continual_text_validation),
# digits the choices of benchmarks.continual_recipe on its digits validation sequences
_TEXT_COMMON = {"lr": 3e-3, "weight_decay": 0.01, "mts_periods": [1, 4, 16], "nest_levels": [1, 4, 16],
                "ewc_lambda": 100.0, "si_c": SI_C_TEXT, "lwf_alpha": LWF_ALPHA_TEXT, "replay_per_task": 64,
                "replay_batch": 8, "curve_points": 6}
_DIGITS_COMMON = {"lr": 1e-3, "weight_decay": 0.01, "mts_periods": [1, 4, 16], "nest_levels": [1, 4, 16],
                  "ewc_lambda": 100.0, "si_c": 0.1, "lwf_alpha": 1.0, "replay_per_task": 64, "replay_batch": 32,
                  "curve_points": 10}
PRESETS = {
    "tiny": {"seeds": [0], "methods": list(METHODS), "sequences": {
        "shakespeare_genres": {**_TEXT_COMMON, "dim": 32, "depth": 2, "heads": 2, "seq_len": 32, "batch": 4,
                               "eval_windows": 4, "steps_per_task": 4, "max_chars": 60_000,
                               "est_step_s": 0.01, "max_seconds": 30},
        "permuted_digits": {**_DIGITS_COMMON, "width": 32, "depth": 3, "hidden": 64, "batch": 32,
                            "n_tasks": 3, "steps_per_task": 8, "est_step_s": 0.002, "max_seconds": 30},
    }},
    "gpu": {"seeds": [0, 1, 2], "methods": list(METHODS), "sequences": {
        "shakespeare_genres": {**_TEXT_COMMON, "dim": 192, "depth": 4, "heads": 4, "seq_len": 128, "batch": 32,
                               "eval_windows": 64, "steps_per_task": 400, "max_chars": None,
                               "est_step_s": 0.025, "max_seconds": 240},
        "permuted_digits": {**_DIGITS_COMMON, "width": 128, "depth": 3, "hidden": 256, "batch": 128,
                            "n_tasks": 5, "steps_per_task": 500, "est_step_s": 0.004, "max_seconds": 240},
    }},
}
# the new budget (gpu10x): each genre trained 5x longer (in the gpu preset's records the first
# genre's validation loss still fell from 2.33 to 2.20 over its last 200 of 400 steps); the digits
# tasks as in gpu (accuracy 0.96-0.98 within 100 of their 500 steps)
PRESETS["gpu10x"] = copy.deepcopy(PRESETS["gpu"])
PRESETS["gpu10x"]["sequences"]["shakespeare_genres"].update(steps_per_task=2000, max_seconds=900)
for _cfg in PRESETS["gpu10x"]["sequences"].values():  # launch-bound small models: replay their losses as graphs
    _cfg["compile"] = "graphed_loss"
# step time of a method relative to finetune (CPU measurements, see the module doc); evaluations
# (curve points + the matrix rows) cost about one training step each
COST_FACTOR = {
    "shakespeare_genres": {"finetune": 1.0, "multitimescale": 1.0, "nested_cms": 1.6, "ewc": 1.1, "si": 1.3,
                           "lwf": 2.0, "replay": 1.1, "recipe": 2.2},
    "permuted_digits": {"finetune": 1.0, "multitimescale": 1.0, "nested_cms": 1.9, "ewc": 1.5, "si": 1.5,
                        "lwf": 2.0, "replay": 1.3, "recipe": 2.2},
}


def make_sequence(p: dict, device: str):
    """The job's task sequence, from :mod:`benchmarks.continual_tasks` at this suite's sizes."""
    from nl_layers import TransformerLM

    from ..continual_tasks import PermutedDigits, ShakespeareGenres
    from ..tasks.digits import ResidualMLP

    if p["sequence"] == "shakespeare_genres":
        return ShakespeareGenres(p["steps_per_task"], context=p["seq_len"], batch=p["batch"],
                                 eval_windows=p["eval_windows"], text="raw", max_chars=p.get("max_chars"),
                                 model=lambda vocab: TransformerLM(vocab, p["dim"], p["depth"], heads=p["heads"]),
                                 device=device, genres=p.get("genres"))
    if p["sequence"] == "permuted_digits":
        return PermutedDigits(p["n_tasks"], p["steps_per_task"], batch=p["batch"],
                              model=lambda: ResidualMLP(p["width"], p["depth"], p["hidden"]), device=device)
    raise ValueError(f"sequence must be one of {SEQUENCES}, got {p['sequence']!r}")


# ----------------------------------------------------------------------------- one run
def depth_periods(depth: int, periods: Sequence[int]) -> dict[str, int]:
    """Level spec of ``multitimescale``: the MLP of block i gets periods[i * len(periods) // depth].

    Example:
        >>> depth_periods(3, [1, 4, 16])
        {'blocks.1.mlp.*': 4, 'blocks.2.mlp.*': 16}
    """
    spec = {f"blocks.{i}.mlp.*": int(periods[i * len(periods) // depth]) for i in range(depth)}
    return {k: c for k, c in spec.items() if c > 1}


def build(params: dict, device: str):
    """(task sequence, model on ``device``, AdamW, PeriodicGradients or None, level spec) of one job."""
    from deepopt.lightning import PeriodicGradients

    if params["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {params['method']!r}")
    seq = make_sequence(params, device)
    model = seq.model(params["seed"])
    spec: dict[str, int] = {}
    if params["method"] == "multitimescale":
        spec = depth_periods(params["depth"], params["mts_periods"])
    elif params["method"] == "nested_cms":
        import nl_layers

        spec = nl_layers.nest(model, ffn="blocks.*.mlp", levels=tuple(params["nest_levels"]),
                              activation=seq.nest_activation)
        spec = {k: c for k, c in spec.items() if c > 1}
    model = model.to(device)
    if params["method"] == "recipe":
        from deepopt.continual import Recipe

        # the Recipe's optimizer is torch.optim.AdamW at the same lr and weight decay as finetune's
        return seq, model, Recipe(model, params["lr"], weight_decay=params["weight_decay"],
                                  **(params.get("recipe_setting") or {})), None, spec
    opt = torch.optim.AdamW(model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    periodic = PeriodicGradients(model.named_parameters(), spec) if spec else None
    return seq, model, opt, periodic, spec


def learner(params: dict, seq, model: nn.Module, opt, gen: torch.Generator):
    """The ``si`` / ``lwf`` job's learner of :mod:`benchmarks.continual_recipe` around this job's AdamW
    and minibatch (its ``train_step(task)`` and ``end_task(task)``); None for the other methods."""
    from .. import continual_recipe as cr

    if params["method"] == "si":
        return cr.SI(model, seq, gen, c=params["si_c"], opt=opt, batch=seq.batch)
    if params["method"] == "lwf":
        return cr.LwF(model, seq, gen, alpha=params["lwf_alpha"], opt=opt, batch=seq.batch)
    return None


def task_loss(seq, model: nn.Module, task: int):
    """``loss_of(x, y)``: ``seq.loss_on(model, task, x, y)`` with its forward and backward replayed
    as CUDA graphs (``nl_layers.graphed_loss``; the eager loss on the CPU), captured on a batch drawn
    with a generator of its own, so the job's minibatch stream is untouched."""
    import nl_layers

    example = seq.sample(task, torch.Generator().manual_seed(task), seq.batch)
    return nl_layers.graphed_loss(model, example, lambda m, x, y: seq.loss_on(m, task, x, y), check_inputs=False)


def train_step(seq, model: nn.Module, opt, periodic, task: int, gen: torch.Generator,
               params: dict, ewc: EWC | None = None, buffer: list | None = None, loss_of=None) -> torch.Tensor:
    """One AdamW step of the job's method on ``task`` (EWC penalty / replay batch / held slow gradients;
    for ``recipe``, ``opt`` is the :class:`deepopt.continual.Recipe`, whose step adds its pull and
    distillation). ``loss_of``: the task's loss from :func:`task_loss` (default: the eager one)."""
    opt.zero_grad(set_to_none=True)
    if loss_of is not None:  # the same draws as seq.train_loss
        loss = loss_of(*seq.sample(task, gen, seq.batch))
    else:
        loss = seq.train_loss(model, task, gen)
    if params["method"] == "ewc" and ewc is not None:
        loss = loss + ewc.penalty(model)
    if params["method"] == "replay" and buffer:
        old, x, y = buffer[int(torch.randint(len(buffer), (1,), generator=gen))]
        pick = torch.randint(len(y), (params["replay_batch"],), generator=gen).to(y.device)
        loss = loss + seq.loss_on(model, old, x[pick], y[pick])
    loss.backward()
    if periodic is not None:
        periodic.before_step()
    if params["method"] == "recipe":
        opt.step(loss.detach())
    else:
        opt.step()
    return loss.detach()


def run(params: dict, device: str) -> dict:
    """Train one (sequence, method, seed) through every task; the R matrix, transfers, timing."""
    start = time.perf_counter()
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    max_seconds = params.get("max_seconds")
    mode = params.get("compile", "none")
    if mode not in COMPILE:
        raise ValueError(f"compile must be one of {COMPILE}, got {mode!r}")
    seq, model, opt, periodic, spec = build(params, device)
    gen = torch.Generator().manual_seed(10_007 * params["seed"] + 777)
    method, steps, n = params["method"], params["steps_per_task"], seq.n_tasks
    penalty = learner(params, seq, model, opt, gen)
    ewc, buffer, matrix, curve = EWC(params["ewc_lambda"]), [], [], []
    every = max(1, steps // max(1, params.get("curve_points", 8)))
    model.eval()
    untrained = [seq.evaluate(model, j) for j in range(n)]
    model.train()
    done, cut_short, train_seconds = 0, False, 0.0
    graphed = mode == "graphed_loss" and method in GRAPHED
    for task in range(n):
        t0 = time.perf_counter()
        loss_of = task_loss(seq, model, task) if graphed else None
        for step in range(steps):
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                cut_short = True
                break
            if penalty is not None:
                penalty.train_step(task)
            else:
                train_step(seq, model, opt, periodic, task, gen, params, ewc, buffer, loss_of)
            done += 1
            if (step + 1) % every == 0:
                model.eval()
                curve.append([done, seq.evaluate(model, 0)])
                model.train()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t0
        if not cut_short:
            if method == "ewc":
                ewc.consolidate(model, seq, task, gen)
            if method == "replay":
                buffer.append((task, *seq.sample(task, gen, params["replay_per_task"])))
            if method == "recipe":
                opt.end_task()
            if penalty is not None:
                penalty.end_task(task)
        model.eval()
        matrix.append([seq.evaluate(model, j) for j in range(n)])
        model.train()
        if not all(math.isfinite(v) for v in matrix[-1]):
            raise FloatingPointError(f"metric became non-finite after task {task}: {matrix[-1]}")
        if cut_short:
            break
    complete = len(matrix) == n and not cut_short
    hib = seq.higher_is_better
    return {
        "sequence": params["sequence"], "method": method, "seed": params["seed"], "metric": seq.metric,
        "higher_is_better": hib, "n_tasks": n, "matrix": matrix, "untrained": untrained, "curve_task0": curve,
        "average_final": average_final(matrix) if complete else None,
        "bwt": backward_transfer(matrix, hib) if complete else None,
        "fwt": forward_transfer(matrix, untrained, hib) if complete else None,
        "steps": done, "steps_planned": steps * n, "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start, "cut_short": cut_short,
        "params": sum(p.numel() for p in model.parameters()), "level_spec": spec,
        "recipe_knobs": _recipe_knobs(params.get("recipe_setting")) if method == "recipe" else None,
        "compile": "graphed_loss" if graphed and device.startswith("cuda") else "none",
    }


def _recipe_knobs(setting: dict | None = None) -> dict:
    """The recipe's knobs of a run: its defaults, with ``setting`` (params' ``recipe_setting``) over them."""
    from deepopt.continual import DEFAULTS

    return {**DEFAULTS, **(setting or {})}


# ----------------------------------------------------------------------------- jobs
def jobs(preset: str, seeds: Sequence[int] | None = None, **overrides) -> list[Job]:
    """One job per (sequence, method, seed). ``overrides``: ``methods``/``sequences`` (lists) select;
    ``<sequence>.<key>=v`` sets one sequence's entry; any other ``key=v`` sets it for every sequence."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    base = copy.deepcopy(PRESETS[preset])
    methods = list(overrides.pop("methods", base["methods"]))
    sequences = list(overrides.pop("sequences", base["sequences"]))
    for name in methods:
        if name not in METHODS:
            raise ValueError(f"methods: {name!r} is not one of {METHODS}")
    for name in sequences:
        if name not in SEQUENCES:
            raise ValueError(f"sequences: {name!r} is not one of {SEQUENCES}")
    seeds = list(base["seeds"] if seeds is None else seeds)
    out = []
    for seq_name in sequences:
        cfg = dict(base["sequences"][seq_name])
        cfg.update({k: v for k, v in overrides.items() if "." not in k})
        cfg.update({k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith(seq_name + ".")})
        n_tasks = cfg.get("n_tasks", 3)  # the three genres
        evals = n_tasks * (cfg["curve_points"] + n_tasks) + n_tasks
        for method in methods:
            steps = cfg["steps_per_task"] * n_tasks + evals
            cost = cfg["est_step_s"] * steps * COST_FACTOR[seq_name][method]
            cost = min(cost, cfg.get("max_seconds") or cost)
            for seed in seeds:
                params = {**cfg, "sequence": seq_name, "method": method, "seed": seed}
                out.append(Job("continual", f"continual/{seq_name}/{method}/seed{seed}", params, float(cost)))
    return out
