"""Experiment ``lm`` (issue 9, part 1): Transformer++ vs Titans vs HOPE vs HOPE-attention on
Shakespeare characters, the same token budget for all, AdamW at a tuned rate, 3 seeds.

Protocol. Phase ``sweep``: every model at AdamW peak rates ``LR_CENTRES["adam"] x (1/3, 1, 3)``
(1e-3, 3e-3, 9e-3; Titans and HOPE at the first two only, see ``MODEL_FACTORS``), seed 0. Phase ``seeds``: every model at the rate with the lowest final validation loss of its
sweep (ties: the smaller rate), seeds 1..n-1; the sweep's seed-0 run at that rate is the first
seed. ``steps`` (the token budget: steps x batch x seq_len characters) is one number for all
models; :func:`prepare` can pick it on the GPU from the slowest model's measured step time so
that its run fits ``target_seconds``. On the H200 HOPE took 1.49 s per step (100x the
Transformer's 14.5 ms: its mixer is a chunk loop of small kernels), so the gpu preset fixes 200
steps (1.6 M characters, a third of an epoch) to fit the lent GPU time. Data, models and training: see
:mod:`benchmarks.experiments.lm_training`.

    python -m benchmarks run --suite lm --set phase=sweep --out /tmp/ev
    python -m benchmarks run --suite lm --set phase=seeds \\
        --set sweep_records=/tmp/ev/records.jsonl --set steps=<the sweep's> --out /tmp/ev

Example:
    >>> [j.name for j in jobs("tiny", None)][:2]
    ['lm/transformer/lr0.001/s0', 'lm/transformer/lr0.003/s0']
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Sequence

from ..report import markdown_table, write_json
from .lm_training import LR_CENTRES, MODELS, SIZES, measure_step_ms, train
from ..pool import Job, latest_records, load_records

PRESETS = {
    "tiny": dict(SIZES["tiny"], steps=6, eval_every=3, seeds=2, target_seconds=None, max_seconds=60),
    "gpu": dict(SIZES["gpu"], steps=200, eval_every=20, val_windows=64, seeds=3, target_seconds=None, max_seconds=480),
}
FACTORS = (1 / 3, 1.0, 3.0)
# The two slow models are swept over the lower two rates only (1e-3, 3e-3), to fit the GPU budget:
# at 9e-3 HOPE diverged on the CPU within 20 steps (max_lr 0.01, chunk 32) and Titans at every rate
# with max_lr >= 3e-3.
MODEL_FACTORS = {"titans": (1 / 3, 1.0), "hope": (1 / 3, 1.0)}
# seconds per training step (batch 32 x 256) measured on an H200 by ``prepare`` (calibrate.sh, 2026-11-27):
# transformer 0.0145, hope_attention 0.0229, titans 0.543, hope 1.488; job costs (for ordering) use them
GPU_SECONDS_PER_STEP = {"transformer": 0.0145, "hope_attention": 0.0229, "titans": 0.543, "hope": 1.488}


def config(preset: str, **overrides) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    cfg = dict(PRESETS[preset])
    cfg.update(overrides)
    return cfg


def _job(cfg: dict, model: str, lr: float, seed: int, phase: str) -> Job:
    params = dict(cfg, model=model, lr=lr, seed=seed, phase=phase)
    params.pop("seeds", None)
    return Job("lm", f"lm/{model}/lr{lr:.3g}/s{seed}", params, 1.1 * GPU_SECONDS_PER_STEP.get(model, 1.0) * cfg["steps"])


def finished(records: Sequence[dict]) -> list[dict]:
    """One record with a result per job (:func:`~benchmarks.pool.latest_records`: a run cut
    short is dropped where the same job also finished in full)."""
    return [r for r in latest_records(records) if "result" in r]


def best_rates(records: Sequence[dict]) -> dict[str, float]:
    """model -> the rate whose seed-0 run has the lowest final validation loss (ties: smaller rate).

    Seed-0 runs of either phase count (a sweep run cut short and redone in the seeds phase is judged
    by the redone run, see :func:`finished`); a diverged run counts as infinite loss."""
    best: dict[str, tuple[float, float]] = {}
    for r in finished(records):
        if r["job"]["experiment"] != "lm" or r["result"]["seed"] != 0:
            continue
        res = r["result"]
        loss = res["final_val_loss"] if not res["diverged"] and math.isfinite(res["final_val_loss"]) else math.inf
        key = (loss, res["lr"])
        if res["model"] not in best or key < best[res["model"]]:
            best[res["model"]] = key
    return {m: lr for m, (_, lr) in best.items()}


def jobs(preset: str, seeds: Sequence[int] | None = None, phase: str = "sweep", sweep_records: str | None = None,
         models: Sequence[str] = MODELS, **overrides) -> list[Job]:
    """Phase ``sweep`` (3 rates x seed 0) or ``seeds`` (best rate x seeds 1..n-1, read from ``sweep_records``)."""
    cfg = config(preset, **overrides)
    n_seeds = len(seeds) if seeds is not None else cfg["seeds"]
    if phase == "sweep":
        return [_job(cfg, m, LR_CENTRES["adam"] * f, 0, "sweep") for m in models for f in MODEL_FACTORS.get(m, FACTORS)]
    if phase == "seeds":
        if sweep_records is None:
            raise ValueError("phase=seeds needs sweep_records=<records.jsonl of the sweep>")
        rates = best_rates(load_records(Path(sweep_records)))
        missing = [m for m in models if m not in rates]
        if missing:
            raise ValueError(f"the sweep records have no finished run of {missing}")
        # seed 0 at the best rate is the sweep's run: listed again so that a sweep run cut short is redone
        # (the pool skips it when it finished in full)
        return [_job(cfg, m, rates[m], s, "seeds") for m in models for s in range(n_seeds)]
    raise ValueError(f"phase must be 'sweep' or 'seeds', got {phase!r}")


def prepare(preset: str, device: str, models: Sequence[str] = MODELS, **overrides) -> dict:
    """Pick ``steps`` so that the slowest model's run takes about ``target_seconds`` on ``device``."""
    cfg = config(preset, **overrides)
    if cfg.get("target_seconds") is None or "steps" in overrides:
        return {}
    ms = {m: measure_step_ms(dict(cfg, model=m), device) for m in models}
    steps = max(50, int(cfg["target_seconds"] * 1000 / max(ms.values()) / 50) * 50)
    return {"steps": steps, "calibration_ms_per_step": ms}


def run(params: dict, device: str) -> dict:
    return train(params, "AdamW", params["lr"], params["seed"], device, params.get("max_seconds"))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.inf, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(records: Sequence[dict]) -> dict:
    """Per model: the chosen rate, final bpc mean/std over seeds at that rate, ms per step, params."""
    ok = finished(records)
    rates = best_rates(ok)
    out = {}
    for model, lr in rates.items():
        runs = [r["result"] for r in ok if r["result"]["model"] == model and math.isclose(r["result"]["lr"], lr)]
        bpc = [x["final_bpc"] if not x["diverged"] else math.inf for x in runs]
        mean, std = _mean_std(bpc)
        sweep = {f"{r['result']['lr']:.3g}": (math.inf if r["result"]["diverged"] else r["result"]["final_bpc"]) for r in ok
                 if r["result"]["model"] == model and r["result"]["seed"] == 0}
        other = [x for x in (r["result"] for r in ok) if x["model"] == model and not math.isclose(x["lr"], lr) and x["seed"] > 0]
        out[model] = {"lr": lr, "bpc_mean": mean, "bpc_std": std, "seeds": sorted(x["seed"] for x in runs),
                      "bpc_per_seed": bpc, "sweep_bpc": sweep, "params": runs[0]["params"],
                      "ms_per_step": statistics.median(x["ms_per_step"] for x in runs),
                      "tokens": runs[0]["tokens_per_step"] * runs[0]["steps"],
                      "cut_short": any(x["cut_short"] for x in runs),
                      "other_rate_runs": [{"lr": x["lr"], "seed": x["seed"], "bpc": None if x["diverged"] else x["final_bpc"],
                                           "diverged": x["diverged"], "steps_done": x["steps_done"]} for x in other]}
    return out


def plot(records: Sequence[dict], summary: dict, path: Path) -> None:
    records = finished(records)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (model, s) in enumerate(sorted(summary.items(), key=lambda kv: kv[1]["bpc_mean"])):
        color = f"C{i}"
        for j, r in enumerate(x["result"] for x in records if "result" in x and x["result"]["model"] == model
                              and math.isclose(x["result"]["lr"], s["lr"])):
            bpc = [v / math.log(2) for v in r["val_loss"]]
            tokens = [t * r["tokens_per_step"] / 1e6 for t in r["eval_steps"]]
            ax.plot(tokens, bpc, color=color, alpha=0.8, label=f"{model} (lr {s['lr']:.2g})" if j == 0 else None)
    ax.set_xlabel("training characters (millions)")
    ax.set_ylabel("validation bits per character")
    finals = [s["bpc_mean"] for s in summary.values() if math.isfinite(s["bpc_mean"])]
    if finals:
        ax.set_ylim(min(finals) - 0.1, min(finals) + 1.5)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Shakespeare characters: validation bpc (each line one seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(records: list[dict], out_dir: Path, header: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = finished(records)
    summary = summarize(records)
    gpus = sorted({r.get("gpu", r["device"]) for r in records})
    first = next(r["result"] for r in records if "result" in r)
    write_json({"header": header, "gpus": gpus, "summary": summary, "records": records}, str(out_dir / "results.json"))
    plot(records, summary, out_dir / "bpc_curves.png")
    rows = []
    for model, s in sorted(summary.items(), key=lambda kv: kv[1]["bpc_mean"]):
        sweep = ", ".join(f"{k}: {v:.3f}" for k, v in sorted(s["sweep_bpc"].items(), key=lambda kv: float(kv[0])))
        diverged = sum(not math.isfinite(v) for v in s["bpc_per_seed"])
        others = "; ".join(f"lr {o['lr']:.3g} seed {o['seed']}: " + ("diverged at step " + str(o["steps_done"]) if o["diverged"]
                                                                      else f"{o['bpc']:.3f}") for o in s["other_rate_runs"])
        rows.append([model, f"{s['params'] / 1e6:.2f} M", f"{s['lr']:.3g}", f"{s['bpc_mean']:.3f} +- {s['bpc_std']:.3f}",
                     f"{len(s['bpc_per_seed']) - diverged} / {len(s['bpc_per_seed'])}", f"{s['ms_per_step']:.0f}",
                     sweep.replace("inf", "diverged") + (" (cut short)" if s["cut_short"] else "") + (f"; also {others}" if others else "")])
    errors = [f"- {r['job']['name']}: {r['error'][:300]}" for r in records if "error" in r]
    md = ["# Language models on Shakespeare characters (issue 9, part 1)", "",
          f"- GPU: {', '.join(gpus)}", f"- report command: `{header.get('command')}`",
          f"- token budget: {first['steps']} steps x {first['tokens_per_step']} characters = "
          f"{first['steps'] * first['tokens_per_step'] / 1e6:.2f} M characters per run, every model",
          "- AdamW (torch, fused), warm-up 5 % + cosine to 10 %, clip 1.0, no weight decay; CMS periods 1/4/16 "
          "through PeriodicGradients; rate chosen on seed 0 from 1e-3, 3e-3, 9e-3 (Titans and HOPE: 1e-3, 3e-3)", "",
          markdown_table(["model", "params", "AdamW lr", "val bpc (mean +- std of finished seeds)", "seeds finished / run",
                          "ms/step", "sweep (seed 0 bpc)"], rows),
          "", "![validation bpc](bpc_curves.png)", ""]
    if errors:
        md += ["Failed runs:", *errors, ""]
    (out_dir / "results.md").write_text("\n".join(md), encoding="utf-8")
