"""Evidence run ``continual`` (issue 9): do multi-timescale levels reduce forgetting?

Claim tested (Nested Learning, CMS): parameters that learn on slower timescales keep what earlier
tasks taught, so a model with CMS levels forgets less in continual learning than plain fine-tuning.

Sequences (one model trained through all tasks in order, one AdamW optimizer kept throughout):
- ``shakespeare_genres``: character LM (``nl_layers.TransformerLM``; raw Markdown of the plays,
  ``nl_layers.data.shakespeare`` + ``CharTokenizer`` over the three genres) on comedies, then
  histories, then tragedies; metric: bits per character on fixed windows of each genre's held-out
  last 10% (lower is better).
- ``permuted_digits``: a residual MLP on scikit-learn's 8x8 digits; task j shows the 64 pixels in a
  fixed random order (task 0 = identity); metric: held-out accuracy (360 images).

Both models are ``embed -> blocks[i]: x + mlp(norm(x)) (+ attention for the LM) -> head`` with the
feed-forward blocks at ``blocks.<i>.mlp``. Methods (AdamW, the same lr within a sequence):
- ``finetune``: plain sequential training.
- ``multitimescale``: the same model; the MLP of block i gets period
  ``mts_periods[i * len(mts_periods) // depth]`` (deeper blocks slower, e.g. 1/4/16 for 3 blocks),
  everything else period 1. Applied with ``deepopt.lightning.PeriodicGradients`` -- the rule the
  Lightning ``MultiTimescale`` callback runs -- because it works with ``torch.optim.AdamW`` itself,
  so the base optimizer is byte-for-byte the one ``finetune`` uses (``deepopt.group_by_period``
  would need a deepopt optimizer to honour ``"period"``, changing two things at once).
- ``nested_cms``: ``nl_layers.nest(model, ffn="blocks.*.mlp", levels=nest_levels)`` turns each MLP
  into a sequential CMS (the original MLP is level 1 at period ``nest_levels[0]``, new zero-output
  levels at the others), trained with the returned level spec through ``PeriodicGradients``.
  It has more parameters than the others (``params`` in the result says how many).
- ``ewc``: AdamW + online EWC, :class:`benchmarks.continual.EWC` (Fisher of 64 single examples
  per finished task, summed; ``ewc_lambda``).
- ``replay`` (reference, stores data): at every step also the loss on a batch of a small buffer of
  earlier tasks' examples (``replay_per_task`` per task). Not a competitor.

A period-C parameter accumulates its gradient over C steps and is stepped at t % C == 0 with the
mean; its AdamW moments advance only then.

Metrics (:mod:`benchmarks.metrics`, Lopez-Paz & Ranzato 2017): R[i][j] = metric on task j after
training task i, b[j] = untrained model; average = mean_j R[T-1][j]; BWT = mean_{j<T-1}
(R[T-1][j] - R[j][j]); FWT = mean_{j>0} (R[j-1][j] - b[j]). For bits per character both
transfers are negated, so in every table **negative BWT = forgetting** and positive FWT = help.

Learning rate (AdamW, weight decay 0.01, constant): a CPU sweep of ``finetune`` on the first task
only, seed 0, one thread. Text (a smaller stand-in: dim 128, depth 2, seq 64, batch 16, 150 steps),
held-out bpc at lr 1e-3 / 3e-3 / 1e-2 = 3.04 / 2.96 / 3.21 -> 3e-3. Digits (the gpu preset's model,
300 steps), accuracy at 3e-4 / 1e-3 / 3e-3 / 1e-2 = 0.975 / 0.981 / 0.969 / 0.972 -> 1e-3.
Every method of a sequence uses its sequence's lr (no per-method tuning, so no method gets an
extra sweep; the slow levels' effective step is the same lr applied every C steps).

Timing (measured on the 2-core CPU, one thread, while other jobs loaded it: load average 3-4, so
the numbers are high by perhaps 1.5x), per training step with AdamW, gpu preset models:
text dim 192 / depth 4 / 4 heads / seq 128 / batch 32 (1.80 M params): finetune 1.7-2.0 s,
multitimescale 2.0 s, nested_cms 3.0 s (3.38 M params), ewc 1.7 s, replay 1.7 s; one evaluation
of 64 held-out windows ~1 step. Digits width 128 / depth 3 / hidden 256 / batch 128 (0.21 M
params): finetune 9 ms, multitimescale 9 ms, nested_cms 17 ms, ewc 17 ms, replay 12 ms.
GPU sizing: 20-steps-per-task runs of every (sequence, method) on an H200 (calibrate.sh,
2026-11-27) took 1.5-4.9 s for the text sequence (60 steps + evaluations) and 0.4-4.0 s for
digits (100 steps + evaluations), so ``est_step_s`` is 0.025 s (text) and 0.004 s (digits). The
``gpu`` preset: 2 sequences x 5 methods x 3 seeds = 30 jobs, text 3 tasks x 400 steps, digits 5
tasks x 500 steps; every job capped by ``max_seconds`` = 240. ``steps_per_task`` is a preset entry
(``--set continual.shakespeare_genres.steps_per_task=400`` on the evidence CLI).

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
import json
import math
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.continual import EWC
from benchmarks.metrics import average_final, backward_transfer, forward_transfer, spread
from benchmarks.report import markdown_table, to_jsonable

from .pool import Job

METHODS = ("finetune", "multitimescale", "nested_cms", "ewc", "replay")
SEQUENCES = ("shakespeare_genres", "permuted_digits")
GENRES = ("comedies", "histories", "tragedies")

_TEXT_COMMON = {"lr": 3e-3, "weight_decay": 0.01, "mts_periods": [1, 4, 16], "nest_levels": [1, 4, 16],
                "ewc_lambda": 100.0, "replay_per_task": 64, "replay_batch": 8, "curve_points": 6}
_DIGITS_COMMON = {"lr": 1e-3, "weight_decay": 0.01, "mts_periods": [1, 4, 16], "nest_levels": [1, 4, 16],
                  "ewc_lambda": 100.0, "replay_per_task": 64, "replay_batch": 32, "curve_points": 10}
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
# step time of a method relative to finetune (CPU measurements, see the module doc); evaluations
# (curve points + the matrix rows) cost about one training step each
COST_FACTOR = {
    "shakespeare_genres": {"finetune": 1.0, "multitimescale": 1.0, "nested_cms": 1.6, "ewc": 1.1, "replay": 1.1},
    "permuted_digits": {"finetune": 1.0, "multitimescale": 1.0, "nested_cms": 1.9, "ewc": 1.5, "replay": 1.3},
}


# ----------------------------------------------------------------------------- models and tasks
class ResidualMLP(nn.Module):
    """relu(Linear(64 -> width)), ``depth`` blocks x + mlp(LayerNorm(x)), LayerNorm, Linear(width -> 10)."""

    def __init__(self, width: int, depth: int, hidden: int):
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm": nn.LayerNorm(width),
            "mlp": nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))})
            for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.embed(x))
        for block in self.blocks:
            h = h + block["mlp"](block["norm"](h))
        return self.head(self.norm(h))


class TextGenres:
    """Char LM on Shakespeare genres; ``sample``/``loss_on`` follow benchmarks.continual_tasks (for EWC)."""

    metric, higher_is_better, nest_activation = "bpc", False, "gelu"

    def __init__(self, p: dict, device: str):
        from nl_layers.data import CharTokenizer, shakespeare

        texts = [shakespeare(g)[: p.get("max_chars") or None] for g in GENRES]
        self.tok = CharTokenizer("".join(texts))
        self.p, self.device, self.n_tasks = p, device, len(GENRES)
        self.train, self.eval = [], []
        for text in texts:
            ids = self.tok.encode(text)
            cut = int(0.9 * len(ids))
            self.train.append(ids[:cut].to(device))
            held = ids[cut:]
            starts = torch.linspace(0, len(held) - p["seq_len"] - 2, p["eval_windows"]).long()
            self.eval.append(self._windows(held.to(device), starts.to(device)))

    def _windows(self, ids: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = ids[starts[:, None] + torch.arange(self.p["seq_len"] + 1, device=ids.device)]
        return chunk[:, :-1], chunk[:, 1:]

    def model(self, seed: int) -> nn.Module:
        from nl_layers import TransformerLM

        torch.manual_seed(seed)
        return TransformerLM(self.tok.vocab_size, self.p["dim"], self.p["depth"], heads=self.p["heads"])

    def sample(self, task: int, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.train[task]
        starts = torch.randint(len(ids) - self.p["seq_len"] - 1, (n,), generator=gen)
        return self._windows(ids, starts.to(self.device))

    def loss_on(self, model: nn.Module, task: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def train_loss(self, model: nn.Module, task: int, gen: torch.Generator) -> torch.Tensor:
        return self.loss_on(model, task, *self.sample(task, gen, self.p["batch"]))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, task: int) -> float:
        x, y = self.eval[task]
        total = sum(float(F.cross_entropy(model(xb).flatten(0, 1), yb.flatten(), reduction="sum"))
                    for xb, yb in zip(x.split(32), y.split(32)))
        return total / y.numel() / math.log(2.0)


class PermutedDigits:
    """Permuted 8x8 digits with a residual MLP; data kept on the device."""

    metric, higher_is_better, nest_activation = "accuracy", True, "relu"

    def __init__(self, p: dict, device: str):
        from benchmarks.tasks.digits import digits_split

        self.p, self.device, self.n_tasks = p, device, p["n_tasks"]
        gen = torch.Generator().manual_seed(2024)
        self.perms = [torch.arange(64)] + [torch.randperm(64, generator=gen) for _ in range(self.n_tasks - 1)]
        x_tr, y_tr, x_te, y_te = digits_split()
        self.x_tr = [x_tr[:, perm].to(device) for perm in self.perms]
        self.x_te = [x_te[:, perm].to(device) for perm in self.perms]
        self.y_tr, self.y_te = y_tr.to(device), y_te.to(device)

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return ResidualMLP(self.p["width"], self.p["depth"], self.p["hidden"])

    def sample(self, task: int, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.y_tr), (n,), generator=gen).to(self.device)
        return self.x_tr[task][idx], self.y_tr[idx]

    def loss_on(self, model: nn.Module, task: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def train_loss(self, model: nn.Module, task: int, gen: torch.Generator) -> torch.Tensor:
        return self.loss_on(model, task, *self.sample(task, gen, self.p["batch"]))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, task: int) -> float:
        return float((model(self.x_te[task]).argmax(-1) == self.y_te).float().mean())


TASKS = {"shakespeare_genres": TextGenres, "permuted_digits": PermutedDigits}


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

    if params["sequence"] not in TASKS:
        raise ValueError(f"sequence must be one of {tuple(TASKS)}, got {params['sequence']!r}")
    if params["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {params['method']!r}")
    seq = TASKS[params["sequence"]](params, device)
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
    opt = torch.optim.AdamW(model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    periodic = PeriodicGradients(model.named_parameters(), spec) if spec else None
    return seq, model, opt, periodic, spec


def train_step(seq, model: nn.Module, opt: torch.optim.Optimizer, periodic, task: int, gen: torch.Generator,
               params: dict, ewc: EWC | None = None, buffer: list | None = None) -> torch.Tensor:
    """One AdamW step of the job's method on ``task`` (EWC penalty / replay batch / held slow gradients)."""
    opt.zero_grad(set_to_none=True)
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
    opt.step()
    return loss.detach()


def run(params: dict, device: str) -> dict:
    """Train one (sequence, method, seed) through every task; the R matrix, transfers, timing."""
    start = time.perf_counter()
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    max_seconds = params.get("max_seconds")
    seq, model, opt, periodic, spec = build(params, device)
    gen = torch.Generator().manual_seed(10_007 * params["seed"] + 777)
    method, steps, n = params["method"], params["steps_per_task"], seq.n_tasks
    ewc, buffer, matrix, curve = EWC(params["ewc_lambda"]), [], [], []
    every = max(1, steps // max(1, params.get("curve_points", 8)))
    model.eval()
    untrained = [seq.evaluate(model, j) for j in range(n)]
    model.train()
    done, cut_short, train_seconds = 0, False, 0.0
    for task in range(n):
        t0 = time.perf_counter()
        for step in range(steps):
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                cut_short = True
                break
            train_step(seq, model, opt, periodic, task, gen, params, ewc, buffer)
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
    }


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
        if name not in TASKS:
            raise ValueError(f"sequences: {name!r} is not one of {tuple(TASKS)}")
    seeds = list(base["seeds"] if seeds is None else seeds)
    out = []
    for seq_name in sequences:
        cfg = dict(base["sequences"][seq_name])
        cfg.update({k: v for k, v in overrides.items() if "." not in k})
        cfg.update({k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith(seq_name + ".")})
        n_tasks = cfg.get("n_tasks", len(GENRES))
        evals = n_tasks * (cfg["curve_points"] + n_tasks) + n_tasks
        for method in methods:
            steps = cfg["steps_per_task"] * n_tasks + evals
            cost = cfg["est_step_s"] * steps * COST_FACTOR[seq_name][method]
            cost = min(cost, cfg.get("max_seconds") or cost)
            for seed in seeds:
                params = {**cfg, "sequence": seq_name, "method": method, "seed": seed}
                out.append(Job("continual", f"continual/{seq_name}/{method}/seed{seed}", params, float(cost)))
    return out


# ----------------------------------------------------------------------------- report
def _fmt(s: dict, digits: int = 3) -> str:
    if not s or not s.get("n") or s["n"] == s["failed"]:
        return "-"
    text = f"{s['mean']:.{digits}f} +- {s['std']:.{digits}f}"
    return text + (f" ({s['n'] - s['failed']}/{s['n']})" if s["failed"] else "")


def summarize(records: list[dict]) -> dict:
    """Per sequence and method: spreads over seeds of average final / BWT / FWT, mean matrix, curves."""
    out: dict = {}
    for r in records:
        if "result" not in r:
            continue
        res = r["result"]
        seq = out.setdefault(res["sequence"], {"metric": res["metric"], "higher_is_better": res["higher_is_better"],
                                               "n_tasks": res["n_tasks"], "methods": {}})
        seq["methods"].setdefault(res["method"], []).append(res)
    for seq in out.values():
        for method, runs in list(seq["methods"].items()):
            full = [x for x in runs if x["average_final"] is not None]
            n = seq["n_tasks"]
            seq["methods"][method] = {
                "seeds": [x["seed"] for x in runs], "cut_short": [x["seed"] for x in runs if x["cut_short"]],
                "average_final": spread([x["average_final"] for x in runs]),
                "bwt": spread([x["bwt"] for x in runs]), "fwt": spread([x["fwt"] for x in runs]),
                "matrix_mean": [[statistics.fmean(x["matrix"][i][j] for x in full) for j in range(n)]
                                for i in range(n)] if full else None,
                "curves_task0": [x["curve_task0"] for x in runs], "params": runs[0]["params"],
                "steps": [x["steps"] for x in runs], "seconds": spread([x["seconds"] for x in runs]),
            }
    return out


def _plot(summary: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for seq_name, seq in summary.items():
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, (method, m) in enumerate(sorted(seq["methods"].items())):
            for k, curve in enumerate(m["curves_task0"]):
                if curve:
                    xs, ys = zip(*curve)
                    ax.plot(xs, ys, color=f"C{i}", alpha=0.8, lw=1.2, label=method if k == 0 else None)
        first = next((m for m in seq["methods"].values() if m["curves_task0"] and m["curves_task0"][0]), None)
        if first is not None:
            total = max(c[-1][0] for c in first["curves_task0"] if c)
            for t in range(1, seq["n_tasks"]):
                ax.axvline(total * t / seq["n_tasks"], color="grey", lw=0.5, ls="--")
        ax.set_xlabel("training step (dashed: next task starts)")
        ax.set_ylabel(f"{seq['metric']} on task 0 ({'higher' if seq['higher_is_better'] else 'lower'} is better)")
        ax.set_title(f"{seq_name}: task 0 over the sequence (one line per seed)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{seq_name}_task0.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def _sentences(summary: dict) -> list[str]:
    lines = []
    for seq_name, seq in summary.items():
        ms = {k: v for k, v in seq["methods"].items() if v["bwt"]["n"] > v["bwt"]["failed"]}
        if "finetune" not in ms:
            lines.append(f"- {seq_name}: no complete finetune runs, no comparison made.")
            continue
        base = ms["finetune"]
        for method in ("multitimescale", "nested_cms", "ewc", "replay"):
            if method not in ms:
                continue
            m = ms[method]
            d_bwt = m["bwt"]["mean"] - base["bwt"]["mean"]
            noise = math.hypot(m["bwt"]["std"], base["bwt"]["std"])
            seeds = min(m["bwt"]["n"] - m["bwt"]["failed"], base["bwt"]["n"] - base["bwt"]["failed"])
            verdict = ("fewer than 2 complete seeds: no verdict on forgetting" if seeds < 2 else
                       "less forgetting than finetune" if d_bwt > noise else
                       "more forgetting than finetune" if d_bwt < -noise else
                       "no BWT difference from finetune beyond the seed spread")
            sign = 1 if seq["higher_is_better"] else -1
            d_avg = sign * (m["average_final"]["mean"] - base["average_final"]["mean"])
            lines.append(f"- {seq_name} / {method}: {verdict} (BWT {m['bwt']['mean']:+.3f} vs "
                         f"{base['bwt']['mean']:+.3f}, spread {noise:.3f}); final average "
                         f"{'better' if d_avg > 0 else 'worse'} by {abs(d_avg):.3f} {seq['metric']}.")
    return lines


def report(records: list[dict], out_dir: Path, header: dict) -> None:
    """results.json, results.md and one plot per sequence under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    errors = [(r["job"]["name"], r["error"]) for r in records if "error" in r]
    gpus = sorted({r.get("gpu") or r.get("device", "?") for r in records})
    dates = sorted(time.strftime("%Y-%m-%d", time.gmtime(r["started"])) for r in records if "started" in r)
    with (out_dir / "results.json").open("w", encoding="utf-8") as fh:
        json.dump(to_jsonable({"header": header, "devices": gpus, "summary": summary, "errors": errors,
                               "records": records}), fh, indent=1, allow_nan=False)
        fh.write("\n")
    plots = _plot(summary, out_dir)
    lines = ["# Continual learning: fine-tuning vs multi-timescale levels vs nested CMS vs EWC", "",
             f"- command: `{header.get('command', '?')}`", f"- record files: {header.get('record_files', [])}",
             f"- device(s): {', '.join(gpus)}", f"- run date(s): {', '.join(sorted(set(dates))) or '?'}",
             f"- report written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "Average final = mean metric over all tasks after the last task; BWT/FWT as in GEM "
             "(benchmarks/metrics.py); for bits per character both are negated, so **negative BWT = "
             "forgetting** everywhere. Mean +- std over seeds. `replay` stores data: a reference, not a "
             "competitor. `nested_cms` has more parameters (column params).", ""]
    for seq_name, seq in summary.items():
        better = "higher" if seq["higher_is_better"] else "lower"
        any_run = next(r["job"]["params"] for r in records if r["job"]["params"]["sequence"] == seq_name)
        lines += [f"## {seq_name} ({seq['metric']}, {better} is better; {seq['n_tasks']} tasks, "
                  f"{any_run['steps_per_task']} steps each, lr {any_run['lr']})", ""]
        rows = []
        for method in METHODS:
            if method in seq["methods"]:
                m = seq["methods"][method]
                cut = f" cut short: seeds {m['cut_short']}" if m["cut_short"] else ""
                rows.append([method, _fmt(m["average_final"]), _fmt(m["bwt"]), _fmt(m["fwt"]),
                             f"{m['params'] / 1e6:.2f} M", f"{m['seconds']['mean']:.0f}{cut}"])
        lines += [markdown_table(["method", f"average final ({seq['metric']})", "BWT", "FWT", "params",
                                  "seconds/run"], rows), ""]
        if "finetune" in seq["methods"] and seq["methods"]["finetune"]["matrix_mean"]:
            mat = seq["methods"]["finetune"]["matrix_mean"]
            lines += ["finetune, mean R[i][j] (row: after task i; column: task j):", "",
                      markdown_table(["after"] + [f"task {j}" for j in range(len(mat))],
                                     [[f"task {i}"] + [f"{v:.3f}" for v in row] for i, row in enumerate(mat)]), ""]
        lines += [f"![{seq_name}]({seq_name}_task0.png)", ""]
    lines += ["## What held", ""] + (_sentences(summary) or ["- no complete runs."]) + [""]
    if errors:
        lines += ["## Errors", ""] + [f"- {name}: `{err[:300]}`" for name, err in errors] + [""]
    (out_dir / "results.md").write_text("\n".join(lines), encoding="utf-8")
