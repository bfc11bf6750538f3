"""Experiment ``lm_optimizers`` (issue 9, part 2): optimizers on the best ``lm`` model.

AdamW, Muon (torch.optim.Muon on hidden matrices + AdamW on embeddings, head and vectors),
MuonMemory, M3, DeltaMomentum and DeepMomentum train the same model on the same token budget as
the ``lm`` experiment (same data, schedule, clipping, CMS periods), each at its family's rate
centre x (1/3, 1, 3) (:data:`benchmarks.experiments.lm_training.LR_CENTRES`: adam 3e-3 for AdamW and
M3, muon 2e-2 for Muon and MuonMemory, sgd 0.1 for DeltaMomentum and DeepMomentum), seed 0.
AdamW's runs come from this experiment when it ran them (the same machine as the others, so
step times compare), else from the ``lm`` experiment's sweep (same model, seed and budget).

Reported per optimizer at its best rate: final validation bpc, steps to reach AdamW's final
validation loss (first evaluation at or below it; evaluations every ``eval_every`` steps), and
wall-clock per training step measured in the same run (``ms_per_step``), so time to target is
steps x ms.

    python -m benchmarks run --suite lm_optimizers --set model=transformer --set steps=N --out /tmp/ev

Example:
    >>> [j.name for j in jobs("tiny", None, model="transformer")][:1]
    ['lmopt/transformer/AdamW/lr0.001']
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from ..optimizers import select_optimizers
from ..report import markdown_table, write_json
from .lm import PRESETS as LM_PRESETS
from .lm import GPU_SECONDS_PER_STEP
from .lm_training import LR_CENTRES, train
from ..pool import Job

OPTIMIZERS = ("AdamW", "Muon", "MuonMemory", "M3", "DeltaMomentum", "DeepMomentum")
FACTORS = (1 / 3, 1.0, 3.0)
PRESETS = {name: dict(cfg, seeds=1) for name, cfg in LM_PRESETS.items()}
PRESETS["gpu"]["eval_every"] = 10  # finer steps-to-target
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


def jobs(preset: str, seeds: Sequence[int] | None = None, model: str | None = None,
         optimizers: Sequence[str] = OPTIMIZERS, sweep_records: str | None = None,
         candidates: Sequence[str] | None = None, **overrides) -> list[Job]:
    """One job per (optimizer, rate) on ``model`` at seed 0. ``model="auto"`` takes the best model of
    the lm sweep in ``sweep_records`` (among ``candidates``, if given)."""
    if model is None:
        raise ValueError("lm_optimizers needs model=<the best model of the lm experiment>, e.g. --set model=hope")
    if model == "auto":
        if sweep_records is None:
            raise ValueError("model=auto needs sweep_records=<records.jsonl of the lm sweep>")
        from ..pool import load_records

        model = best_model(load_records(Path(sweep_records)), candidates)
        print(f"lm_optimizers: best model of the sweep{' among ' + str(list(candidates)) if candidates else ''}: {model}")
    cfg = dict(PRESETS[preset])
    cfg.update(overrides)
    cfg.pop("seeds", None)
    cfg.pop("target_seconds", None)
    specs = select_optimizers(optimizers)
    out = []
    for name, spec in specs.items():
        for f in FACTORS:
            lr = LR_CENTRES[spec.family] * f
            params = dict(cfg, model=model, optimizer=name, lr=lr, seed=0)
            out.append(Job("lm_optimizers", f"lmopt/{model}/{name}/lr{lr:.3g}", params,
                           GPU_SECONDS_PER_STEP.get(model, 1.0) * cfg["steps"] * (2.0 if name in ("M3", "MuonMemory", "Muon") else 1.0)))
    return out


def run(params: dict, device: str) -> dict:
    return train(params, params["optimizer"], params["lr"], params["seed"], device, params.get("max_seconds"))


def _runs(records: Sequence[dict], model: str, steps: int) -> list[dict]:
    """Finished seed-0 runs of ``model`` at ``steps`` steps: this experiment's, and AdamW's from ``lm``."""
    out = []
    for r in records:
        if "result" not in r:
            continue
        res = dict(r["result"])
        res.setdefault("optimizer", "AdamW")
        if res["model"] == model and res["seed"] == 0 and res["steps"] == steps:
            out.append(res)
    return out


def steps_to_reach(res: dict, target: float) -> int | None:
    """First evaluated step whose validation loss is <= ``target`` (None: never)."""
    for step, loss in zip(res["eval_steps"], res["val_loss"]):
        if loss is not None and loss <= target:
            return step
    return None


def summarize(records: Sequence[dict], other_records: Sequence[dict] = ()) -> dict:
    """Best rate per optimizer, AdamW's final loss as the target, steps and time to reach it."""
    own = [r for r in records if "result" in r]
    if not own:
        return {}
    model, steps = own[0]["result"]["model"], own[0]["result"]["steps"]
    own_adamw = any(r["result"].get("optimizer") == "AdamW" for r in own)
    lm_adamw = [] if own_adamw else [r for r in other_records if r["job"]["experiment"] == "lm"
                                     and r["job"]["params"].get("phase") == "sweep"]
    runs = _runs(list(own) + lm_adamw, model, steps)
    best: dict[str, dict] = {}
    sweeps: dict[str, dict] = {}
    for res in runs:
        loss = res["final_val_loss"] if not res["diverged"] and res["final_val_loss"] is not None else math.inf
        sweeps.setdefault(res["optimizer"], {})[f"{res['lr']:.3g}"] = loss / math.log(2)
        cur = best.get(res["optimizer"])
        if cur is None or (loss, res["lr"]) < (cur["_loss"], cur["lr"]):
            best[res["optimizer"]] = dict(res, _loss=loss)
    target = best["AdamW"]["_loss"] if "AdamW" in best else math.inf
    out = {"model": model, "steps": steps, "target_val_loss": target, "optimizers": {}}
    for name, res in best.items():
        reached = steps_to_reach(res, target) if math.isfinite(target) else None
        out["optimizers"][name] = {
            "lr": res["lr"], "final_bpc": res["_loss"] / math.log(2), "steps_to_adamw": reached,
            "ms_per_step": res["ms_per_step"], "seconds_to_adamw": None if reached is None else reached * res["ms_per_step"] / 1000,
            "sweep_bpc": sweeps[name], "edge": len(sweeps[name]) > 1 and any(math.isclose(res["lr"], float(e), rel_tol=1e-3) for e in
                                                   (min(sweeps[name], key=float), max(sweeps[name], key=float))),
            "cut_short": res["cut_short"]}
    return out


def plot(records: Sequence[dict], summary: dict, path: Path, other_records: Sequence[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own_adamw = any(r["result"].get("optimizer") == "AdamW" for r in records if "result" in r)
    lm = [] if own_adamw else [r for r in other_records if r["job"]["experiment"] == "lm"]
    runs = _runs(list(records) + lm, summary["model"], summary["steps"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, s) in enumerate(summary["optimizers"].items()):
        res = next(r for r in runs if r["optimizer"] == name and math.isclose(r["lr"], s["lr"]))
        bpc = [math.nan if v is None else v / math.log(2) for v in res["val_loss"]]
        ax.plot(res["eval_steps"], bpc, color=f"C{i}", label=f"{name} (lr {s['lr']:.2g})")
        bx.plot([t * res["ms_per_step"] / 1000 for t in res["eval_steps"]], bpc, color=f"C{i}")
    target = summary["target_val_loss"] / math.log(2)
    for a, label in ((ax, "optimizer steps"), (bx, "training seconds (eval excluded)")):
        a.axhline(target, color="k", ls=":", lw=1)
        a.set_xlabel(label)
        a.set_ylabel("validation bpc")
        finals = [x["final_bpc"] for x in summary["optimizers"].values() if math.isfinite(x["final_bpc"])]
        a.set_ylim(min(finals + [target]) - 0.05, target + 1.0)
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
    md = ["# Optimizers on the best language model (issue 9, part 2)", "", f"- GPU: {', '.join(gpus)}",
          f"- report command: `{header.get('command')}`"]
    if summary:
        plot(records, summary, out_dir / "optimizer_curves.png", other_records)
        rows = []
        for name, s in sorted(summary["optimizers"].items(), key=lambda kv: kv[1]["final_bpc"]):
            sweep = ", ".join(f"{k}: {v:.3f}" for k, v in sorted(s["sweep_bpc"].items(), key=lambda kv: float(kv[0])))
            reach = "-" if s["steps_to_adamw"] is None else f"{s['steps_to_adamw']} ({s['seconds_to_adamw']:.0f} s)"
            rows.append([name, f"{s['lr']:.3g}" + ("*" if s["edge"] else ""), f"{s['final_bpc']:.3f}", reach,
                         f"{s['ms_per_step']:.1f}", sweep + (" (cut short)" if s["cut_short"] else "")])
        md += [f"- model: {summary['model']}, {summary['steps']} steps, seed 0; target: AdamW's final validation "
               f"loss {summary['target_val_loss'] / math.log(2):.3f} bpc", "",
               markdown_table(["optimizer", "lr", "final val bpc", "steps (time) to AdamW's final", "ms/step", "sweep (bpc)"], rows),
               "", "`*`: the best rate is at an end of the sweep. `-`: never reached AdamW's final loss.", "",
               "![curves](optimizer_curves.png)", ""]
    if errors:
        md += ["Failed runs:", *errors, ""]
    (out_dir / "results.md").write_text("\n".join(md), encoding="utf-8")
