"""Experiment ``lm_optimizers``: optimizers on an ``lm`` model (``model=``; ``auto``: the best of the ``lm`` sweep).

AdamW, Muon (torch.optim.Muon on hidden matrices + AdamW on embeddings, head and vectors),
MuonMemory, M3, DeltaMomentum and DeepMomentum train the same model on the same token budget as
the ``lm`` experiment (same data, schedule, clipping, CMS periods), each at its family's rate
centre x (1/3, 1, 3) (:data:`benchmarks.experiments.lm_training.LR_CENTRES`: adam 3e-3 for AdamW and
M3, muon 2e-2 for Muon and MuonMemory, sgd 0.1 for DeltaMomentum and DeepMomentum), seed 0.
AdamW's runs come from this experiment when it ran them (the same machine as the others, so
step times compare), else from the ``lm`` experiment's sweep (same model, seed and budget).

Phases (``--set phase=...``; each later one reads the runs so far from ``sweep_records``, the
records file of the output folder): ``sweep`` (the above, seed 0), ``knobs`` (M3's own knobs one
at a time around its defaults, ``M3_KNOBS``: slow-momentum period, beta3, alpha, at M3's best
rate), ``extend`` (each optimizer whose best seed-0 rate is an end of the tried ones gets one more
rate x3 beyond it; repeat until it makes no jobs) and ``seeds`` (seeds 0..n-1 at each optimizer's
best rate, and at the best M3 variant's when one beat M3). Job names end in ``/s<seed>`` for seeds
above 0.

Reported per optimizer at its best rate: final validation bpc (mean and spread over the seeds
run), steps to reach AdamW's final validation loss (first evaluation at or below it; evaluations
every ``eval_every`` steps; each seed against AdamW's run of the same seed) as a fraction of the
budget with its spread, and wall-clock per training step measured in the same run
(``ms_per_step``), so time to target is steps x ms.

    python -m benchmarks run --suite lm_optimizers --set model=transformer --set steps=N --out /tmp/ev
    python -m benchmarks run --suite lm_optimizers --set model=transformer --set phase=knobs \\
        --set sweep_records=/tmp/ev/records.jsonl --out /tmp/ev       # then extend, then seeds

Example:
    >>> [j.name for j in jobs("tiny", None, model="transformer")][:1]
    ['lmopt/transformer/AdamW/lr0.001']
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Sequence

from ..optimizers import select_optimizers
from ..pool import Job, latest_records, load_records
from ..report import markdown_table, write_json
from .lm import EXTEND_FACTOR, edges, mean_std
from .lm import PRESETS as LM_PRESETS
from .lm import GPU_SECONDS_PER_STEP
from .lm_training import LR_CENTRES, train

OPTIMIZERS = ("AdamW", "Muon", "MuonMemory", "M3", "DeltaMomentum", "DeepMomentum")
FACTORS = (1 / 3, 1.0, 3.0)
PHASES = ("sweep", "knobs", "extend", "seeds")
#: M3's knobs one at a time around its defaults (frequency 10, betas (0.9, 0.999, 0.99), alpha 0.5)
M3_KNOBS = ("M3(frequency=5)", "M3(frequency=25)", "M3(betas=(0.9, 0.999, 0.9))", "M3(betas=(0.9, 0.999, 0.999))",
            "M3(alpha=0.25)", "M3(alpha=1.0)")
PRESETS = {name: dict(cfg, seeds=1) for name, cfg in LM_PRESETS.items()}
PRESETS["gpu"]["eval_every"] = 10  # finer steps-to-target
PRESETS["gpu10x"]["seeds"] = 3
# a CUDA-graphed step ("graphed", lm's choice) replays AdamW only; graphed forward and backward take any optimizer
PRESETS["gpu10x"]["compile"] = "graphed_loss"


def best_model(records: Sequence[dict], candidates: Sequence[str] | None = None) -> str:
    """The model whose best seed-0 sweep run of ``lm`` has the lowest final validation loss (among ``candidates``)."""
    from .lm import best_rates

    rates = best_rates(records)
    finals = {}
    for r in records:
        res = r.get("result")
        if r["job"]["experiment"] != "lm" or res is None or r["job"]["params"].get("phase") != "sweep":
            continue
        if res["model"] in rates and math.isclose(res["lr"], rates[res["model"]]) and not res["diverged"]:
            if candidates is None or res["model"] in candidates:
                finals[res["model"]] = min(finals.get(res["model"], math.inf), res["final_val_loss"])
    if not finals:
        raise ValueError("no finished lm sweep run among the candidates: run the lm sweep first")
    return min(finals, key=finals.get)


def job_name(model: str, optimizer: str, lr: float, seed: int) -> str:
    """``lmopt/<model>/<optimizer>/lr<lr>``, with ``/s<seed>`` for seeds above 0."""
    base = f"lmopt/{model}/{optimizer}/lr{lr:.3g}"
    return base if seed == 0 else f"{base}/s{seed}"


def jobs(preset: str, seeds: Sequence[int] | None = None, model: str | None = None,
         optimizers: Sequence[str] = OPTIMIZERS, sweep_records: str | None = None,
         candidates: Sequence[str] | None = None, phase: str = "sweep", **overrides) -> list[Job]:
    """The jobs of ``phase`` (module doc) on ``model``. ``model="auto"`` takes the best model of the
    lm sweep in ``sweep_records`` (among ``candidates``, if given); the later phases read this
    experiment's runs from the same file."""
    if model is None:
        raise ValueError("lm_optimizers needs model=<the best model of the lm experiment>, e.g. --set model=hope")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    records = load_records(Path(sweep_records)) if sweep_records is not None else None
    if model == "auto":
        if records is None:
            raise ValueError("model=auto needs sweep_records=<records.jsonl of the lm sweep>")
        model = best_model(records, candidates)
        print(f"lm_optimizers: best model of the sweep{' among ' + str(list(candidates)) if candidates else ''}: {model}")
    if phase != "sweep" and records is None:
        raise ValueError(f"phase={phase} needs sweep_records=<the records.jsonl of this experiment's runs so far>")
    cfg = dict(PRESETS[preset])
    cfg.update(overrides)
    preset_seeds = cfg.pop("seeds", 1)
    n_seeds = len(seeds) if seeds is not None else preset_seeds
    cfg.pop("target_seconds", None)

    def job(name: str, lr: float, seed: int) -> Job:
        params = dict(cfg, model=model, optimizer=name, lr=lr, seed=seed, phase=phase)
        slow = 2.0 if name.split("(")[0] in ("M3", "MuonMemory", "Muon") else 1.0
        return Job("lm_optimizers", job_name(model, name, lr, seed), params,
                   GPU_SECONDS_PER_STEP.get(model, 1.0) * cfg["steps"] * slow)

    if phase == "sweep":
        specs = select_optimizers(optimizers)
        return [job(name, LR_CENTRES[spec.family] * f, 0) for name, spec in specs.items() for f in FACTORS]
    losses = seed0_losses(records, model, cfg["steps"], cfg.get("size"))
    best = {name: min(by_rate, key=lambda lr: (by_rate[lr], lr)) for name, by_rate in losses.items()}
    if phase == "knobs":
        if "M3" not in best:
            raise ValueError("phase=knobs needs M3's sweep runs in sweep_records (run phase=sweep with M3 first)")
        select_optimizers(M3_KNOBS)  # the knob names are valid
        return [job(name, best["M3"], 0) for name in M3_KNOBS]
    missing = [n for n in optimizers if n not in best]
    if missing:
        raise ValueError(f"sweep_records has no finished seed-0 run of {missing} on {model} at {cfg['steps']} steps")
    if phase == "extend":
        out = [job(n, lr, 0) for n, rates in edges({n: losses[n] for n in optimizers}, EXTEND_FACTOR).items()
               for lr in rates]
        if not out:
            print("lm_optimizers extend: every optimizer's best rate is interior, nothing to extend", flush=True)
        return out
    chosen = list(optimizers)
    variants = [n for n in M3_KNOBS if n in best]
    if "M3" in best and variants:
        top = min(variants, key=lambda n: losses[n][best[n]])
        if losses[top][best[top]] < losses["M3"][best["M3"]]:
            chosen.append(top)
    return [job(n, best[n], s) for n in chosen for s in range(n_seeds)]


def seed0_losses(records: Sequence[dict], model: str, steps: int, size: str | None = None) -> dict[str, dict[float, float]]:
    """optimizer -> {rate: final validation loss of its seed-0 run (diverged: inf)} on ``model`` at
    ``steps`` steps: this experiment's finished runs, and AdamW's from ``lm`` where this experiment
    has none."""
    out: dict[str, dict[float, float]] = {}
    for res in _runs(records, model, steps, size):
        if res["seed"] == 0:
            loss = res["final_val_loss"]
            finite = not res["diverged"] and loss is not None and math.isfinite(loss)
            out.setdefault(res["optimizer"], {})[res["lr"]] = loss if finite else math.inf
    return out


def run(params: dict, device: str) -> dict:
    return train(params, params["optimizer"], params["lr"], params["seed"], device, params.get("max_seconds"))


def _runs(records: Sequence[dict], model: str, steps: int, size: str | None = None) -> list[dict]:
    """Results of ``model``'s runs at ``steps`` steps and ``size``, every seed (the last run of each
    job): this experiment's, and AdamW's from ``lm`` where this experiment ran no AdamW on it."""
    own, lm_adamw = [], []
    for r in latest_records(records):
        experiment = r["job"]["experiment"]
        if "result" not in r or experiment not in ("lm", "lm_optimizers"):
            continue
        res = dict(r["result"])
        res.setdefault("optimizer", "AdamW")
        if (res["model"], res["steps"], res.get("size")) == (model, steps, size):
            (own if experiment == "lm_optimizers" else lm_adamw).append(res)
    if not any(res["optimizer"] == "AdamW" for res in own):  # lm's AdamW, at the seeds run here
        seeds = {res["seed"] for res in own} or {0}
        own += [res for res in lm_adamw if res["optimizer"] == "AdamW" and res["seed"] in seeds]
    return own


def steps_to_reach(res: dict, target: float) -> int | None:
    """First evaluated step whose validation loss is <= ``target`` (None: never)."""
    for step, loss in zip(res["eval_steps"], res["val_loss"]):
        if loss is not None and loss <= target:
            return step
    return None


def _loss(res: dict) -> float:
    loss = res["final_val_loss"]
    return loss if not res["diverged"] and loss is not None and math.isfinite(loss) else math.inf


def summarize(records: Sequence[dict], other_records: Sequence[dict] = ()) -> dict:
    """Per optimizer: its best seed-0 rate; at that rate every seed's final loss (mean, spread) and
    the steps to AdamW's final loss of the same seed (seed 0's target where AdamW lacks that seed),
    as a fraction of the budget; AdamW's seed-0 final loss as the headline target."""
    own = [r for r in records if "result" in r]
    if not own:
        return {}
    first = own[0]["result"]
    model, steps, size = first["model"], first["steps"], first.get("size")
    runs = _runs(list(own) + [r for r in other_records if r["job"]["experiment"] == "lm"], model, steps, size)
    by_opt: dict[str, list[dict]] = {}
    for res in runs:
        by_opt.setdefault(res["optimizer"], []).append(res)
    best: dict[str, float] = {}
    for name, rs in by_opt.items():
        seed0 = [r for r in rs if r["seed"] == 0] or rs
        best[name] = min(seed0, key=lambda r: (_loss(r), r["lr"]))["lr"]
    at_best = {name: sorted((r for r in rs if math.isclose(r["lr"], best[name], rel_tol=1e-9)), key=lambda r: r["seed"])
               for name, rs in by_opt.items()}
    targets = {r["seed"]: _loss(r) for r in at_best.get("AdamW", [])}
    target = targets.get(0, math.inf)
    out = {"model": model, "steps": steps, "target_val_loss": target, "optimizers": {}}
    for name, rs in at_best.items():
        sweep = {f"{r['lr']:.3g}": _loss(r) / math.log(2) for r in by_opt[name] if r["seed"] == 0}
        r0 = next((r for r in rs if r["seed"] == 0), rs[0])
        reached0 = steps_to_reach(r0, target) if math.isfinite(target) else None
        ratios = []
        for r in rs:
            t = targets.get(r["seed"], target)
            hit = steps_to_reach(r, t) if math.isfinite(t) else None
            ratios.append(None if hit is None else hit / steps)
        bpc, bpc_std = mean_std([_loss(r) / math.log(2) for r in rs])
        ratio, ratio_std = mean_std([x for x in ratios if x is not None])
        lrs = sorted(float(k) for k in sweep)
        out["optimizers"][name] = {
            "lr": best[name], "final_bpc": bpc, "final_bpc_std": bpc_std, "seeds": [r["seed"] for r in rs],
            "steps_to_adamw": reached0, "seconds_to_adamw": None if reached0 is None else reached0 * r0["ms_per_step"] / 1000,
            "steps_ratio": ratio if ratios and None not in ratios else None, "steps_ratio_std": ratio_std,
            "reached": sum(x is not None for x in ratios), "ms_per_step": statistics.median(r["ms_per_step"] for r in rs),
            "sweep_bpc": sweep, "edge": len(lrs) > 1 and any(math.isclose(best[name], e, rel_tol=1e-3) for e in (lrs[0], lrs[-1])),
            "cut_short": any(r["cut_short"] for r in rs)}
    return out


def plot(records: Sequence[dict], summary: dict, path: Path, other_records: Sequence[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = [r for r in records if "result" in r]
    runs = _runs(own + [r for r in other_records if r["job"]["experiment"] == "lm"], summary["model"],
                 summary["steps"], own[0]["result"].get("size"))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, s) in enumerate(summary["optimizers"].items()):
        res = min((r for r in runs if r["optimizer"] == name and math.isclose(r["lr"], s["lr"])), key=lambda r: r["seed"])
        bpc = [math.nan if v is None else v / math.log(2) for v in res["val_loss"]]
        ax.plot(res["eval_steps"], bpc, color=f"C{i}", label=f"{name} (lr {s['lr']:.2g})")
        bx.plot([t * res["ms_per_step"] / 1000 for t in res["eval_steps"]], bpc, color=f"C{i}")
    target = summary["target_val_loss"] / math.log(2)  # inf until AdamW has run
    finals = [x["final_bpc"] for x in summary["optimizers"].values()
              if x["final_bpc"] is not None and math.isfinite(x["final_bpc"])]
    # AdamW's final loss sets the window; without an AdamW run yet (a sweep in pieces), the best final does
    low = min(finals + ([target] if math.isfinite(target) else []), default=math.inf)
    top = target if math.isfinite(target) else low
    for a, label in ((ax, "optimizer steps"), (bx, "training seconds (eval excluded)")):
        if math.isfinite(target):
            a.axhline(target, color="k", ls=":", lw=1)
        a.set_xlabel(label)
        a.set_ylabel("validation bpc")
        if math.isfinite(low):
            a.set_ylim(low - 0.05, top + 1.0)
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"Optimizers on {summary['model']} (seed 0; dotted: AdamW's final loss)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(records: list[dict], out_dir: Path, header: dict, other_records: Sequence[dict] = ()) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, other_records)
    gpus = sorted({r.get("gpu", r["device"]) for r in records})
    write_json({"header": header, "gpus": gpus, "summary": summary, "records": records}, str(out_dir / "results.json"))
    errors = [f"- {r['job']['name']}: {r['error'][:300]}" for r in records if "error" in r]
    title = "# Optimizers on a language model" + (f" ({summary['model']})" if summary else "")
    md = [title, "", f"- GPU: {', '.join(gpus)}",
          f"- report command: `{header.get('command')}`"]
    if summary:
        plot(records, summary, out_dir / "optimizer_curves.png", other_records)
        seeded = any(len(s["seeds"]) > 1 for s in summary["optimizers"].values())
        rows = []
        for name, s in sorted(summary["optimizers"].items(), key=lambda kv: kv[1]["final_bpc"]):
            sweep = ", ".join(f"{k}: {v:.3f}" for k, v in sorted(s["sweep_bpc"].items(), key=lambda kv: float(kv[0])))
            reach = "-" if s["steps_to_adamw"] is None else f"{s['steps_to_adamw']} ({s['seconds_to_adamw']:.0f} s)"
            bpc = f"{s['final_bpc']:.3f}"
            row = [name, f"{s['lr']:.3g}" + ("*" if s["edge"] else "")]
            if seeded:
                n = len(s["seeds"])
                ratio = "-" if s["steps_ratio"] is None else f"{s['steps_ratio']:.2f} +- {s['steps_ratio_std']:.2f}"
                row += [f"{bpc} +- {s['final_bpc_std']:.3f} ({n})", f"{ratio} ({s['reached']}/{n})"]
            else:
                row += [bpc]
            rows.append(row + [reach, f"{s['ms_per_step']:.1f}", sweep + (" (cut short)" if s["cut_short"] else "")])
        heads = ["optimizer", "lr"] + (["final val bpc (seeds)", "steps to AdamW's final / budget (reached)"] if seeded
                                       else ["final val bpc"])
        heads += ["steps (time) to AdamW's final" + (", seed 0" if seeded else ""), "ms/step", "sweep (bpc, seed 0)"
                  if seeded else "sweep (bpc)"]
        md += [f"- model: {summary['model']}, {summary['steps']} steps, " + (
                   "seeds as listed (each against AdamW's run of the same seed)" if seeded else "seed 0")
               + (f"; target: AdamW's final validation loss {summary['target_val_loss'] / math.log(2):.3f} bpc"
                  + (" (seed 0)" if seeded else "") if math.isfinite(summary["target_val_loss"])
                  else "; target: none yet (no AdamW run at this budget)"), "",
               markdown_table(heads, rows),
               "", "`*`: the best rate is at an end of the sweep. `-`: never reached AdamW's final loss.", "",
               "![curves](optimizer_curves.png)", ""]
    if errors:
        md += ["Failed runs:", *errors, ""]
    (out_dir / "results.md").write_text("\n".join(md), encoding="utf-8")
