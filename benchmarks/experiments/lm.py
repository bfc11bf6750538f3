"""Experiment ``lm``: Transformer++ vs Titans vs HOPE vs HOPE-attention on
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

Preset ``gpu10x`` (ten times the tokens of ``gpu``; ``--preset gpu10x``): 2,000 steps, 3 seeds,
size ``small`` (dim 384, depth 6: the fast-weight memories at their layer defaults, chunk 64 and
the layers' ``max_lr``, instead of the gpu preset's chunk 16 / max_lr 1e-3, which the defaults no
longer need), every model over all three rates, ``compile="graphed"`` (each AdamW step replayed as
a CUDA graph, ``nl_layers.graphed_step``; picked by compile + 2,000 steps on one worker, see
``COMPILE_CHOICE``; evaluation stays eager). Phase
``extend`` adds, per model whose best seed-0 rate is at an edge of the tried ones
(:func:`edge_rates`), one rate x3 beyond it; repeat it until it makes no jobs, then run ``seeds``.
``--set compile=blocks`` (regional compilation) or ``full`` compile instead; graphed runs AdamW only.
The committed run (benchmarks/results/lm10x/, one H100, 2026-12-05) is this preset.
``--set size=large`` (about 57 M parameters, dim 768, depth 8) names its jobs ``model@large`` so
that they are chosen and reported apart from the small ones. The one-H200 command lines and
their estimated wall times are in benchmarks/README.md ("lm at ten times the tokens").

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
from .lm_training import LR_CENTRES, MODELS, SIZES, compile_mode, measure_step_ms, train
from ..pool import Job, latest_records, load_records

PRESETS = {
    "tiny": dict(SIZES["tiny"], steps=6, eval_every=3, seeds=2, target_seconds=None, max_seconds=60),
    "gpu": dict(SIZES["gpu"], steps=200, eval_every=20, val_windows=64, seeds=3, target_seconds=None, max_seconds=480),
    # ten times the tokens (2,000 x 32 x 256 = 16.4 M characters, about 3.3 epochs of the
    # training text), the fast-weight memories at their layer defaults (size "small"), every model
    # over all three rates, CUDA-graphed steps (see COMPILE_CHOICE); ``--set size=large`` for the
    # 40-60 M-parameter runs
    "gpu10x": dict(SIZES["small"], size="small", steps=2000, eval_every=100, seeds=3, target_seconds=None,
                   max_seconds=1500, compile="graphed"),
}
FACTORS = (1 / 3, 1.0, 3.0)
# The two slow models are swept over the lower two rates only (1e-3, 3e-3), to fit the GPU budget:
# at 9e-3 HOPE diverged on the CPU within 20 steps (max_lr 0.01, chunk 32) and Titans at every rate
# with max_lr >= 3e-3. Only in the presets of that time (``RESTRICTED_PRESETS``); gpu10x sweeps all three.
MODEL_FACTORS = {"titans": (1 / 3, 1.0), "hope": (1 / 3, 1.0)}
RESTRICTED_PRESETS = ("tiny", "gpu")
EXTEND_FACTOR = 3.0  # phase extend: one more rate x3 beyond the edge of the tried ones
# Seconds per AdamW training step (batch 32 x 256, dim 384, depth 6, fp32/TF32) on one H200, one
# worker, measured 2026-12 (layers suite / lm_compile; the range's upper end): eager, and after
# ``model.compile(fullgraph=True)`` ("full") or ``model.compile_blocks()`` ("blocks"). hope_attention
# and the transformer's "blocks" are not measured: estimates (the 2026-11 eager 22.9 ms; compiled
# from the transformer's ratio). Job costs (largest job first) and the docs' wall times use them.
GPU_SECONDS_PER_STEP = {"transformer": 0.019, "hope_attention": 0.023, "titans": 0.057, "hope": 0.082}
# "graphed" (nl_layers.graphed_step, AdamW only), one H100 alone (2026-12-05): the transformer's from
# its lone gpu10x run (9.8 ms), titans and the suite's HOPE (CMS 1/4/16) from lm_graphed (16.7, 25.8
# ms), hope_attention from its runs sharing the GPU (22 ms with two, 33.6 with three); the "compile"
# seconds are the first two steps of those runs (the captures: 0.1-3.3 s)
GPU_SECONDS_PER_STEP_COMPILED = {
    "full": {"transformer": 0.0103, "hope_attention": 0.015, "titans": 0.0215, "hope": 0.0333},
    "blocks": {"transformer": 0.013, "hope_attention": 0.018, "titans": 0.033, "hope": 0.0407},
    "graphed": {"transformer": 0.0099, "hope_attention": 0.011, "titans": 0.0167, "hope": 0.0258,
                "hope_p1": 0.0196, "hope_attention_p1": 0.011},  # (p1: HopeLM() 19.6 ms, one graph; estimates)
    # forward and backward graphed, the optimizer eager (nl_layers.graphed_loss): not yet measured,
    # estimated as the graphed step plus an eager fused AdamW step's host time (~1 ms)
    "graphed_loss": {"transformer": 0.011, "hope_attention": 0.012, "titans": 0.018, "hope": 0.027},
}
GPU_COMPILE_SECONDS = {"full": {"transformer": 19, "hope_attention": 25, "titans": 43, "hope": 52},
                       "blocks": {"transformer": 10, "hope_attention": 12, "titans": 17, "hope": 17},
                       "graphed": {"transformer": 1, "hope_attention": 1, "titans": 1, "hope": 3},
                       "graphed_loss": {"transformer": 1, "hope_attention": 1, "titans": 1, "hope": 2}}
# step-time factor of a size relative to dim 384 / depth 6 (large: an estimate, ~5.6x the weights
# but the small models are partly launch-bound); measure with a short run before sizing a deadline
SIZE_STEP_FACTOR = {"large": 3.0}
# COMPILE_CHOICE: total seconds for 2,000 steps = compile + 2000 x step. Titans: full 43 + 43.0 = 86,
# blocks 17 + 66 = 83, eager 114; HOPE: full 52 + 66.6 = 119, blocks 17 + 81.4 = 98, eager 164;
# Transformer: full 19 + 20.6 = 40, eager 38. Graphed (H100): Transformer 1 + 19.8 = 21, Titans 1 +
# 33.4 = 34, HOPE 3 + 51.6 = 55: gpu10x replays graphs (for every model: one rule); it ran so.


def step_seconds(model: str, cfg: dict) -> float:
    """Estimated H200 seconds per training step of ``model`` under ``cfg`` (compile mode, size)."""
    mode = compile_mode(dict(cfg, model=model))
    table = GPU_SECONDS_PER_STEP if mode == "none" else GPU_SECONDS_PER_STEP_COMPILED[mode]
    return table.get(model, 0.1) * SIZE_STEP_FACTOR.get(cfg.get("size"), 1.0)


def job_seconds(model: str, cfg: dict) -> float:
    """Estimated H200 seconds of one run (one worker): compile + steps x step time."""
    mode = compile_mode(dict(cfg, model=model))
    compile_s = 0.0 if mode == "none" else GPU_COMPILE_SECONDS[mode].get(model, 30)
    return compile_s + cfg["steps"] * step_seconds(model, cfg)


# assumed throughput of 4 workers on one H200 relative to one worker: eager steps are host-bound and
# overlap well, compiled ones much less (estimates); graphed ones not at all (measured on the H100:
# two transformer runs sharing it took 20.5-21.3 ms a step each against 9.8 alone)
POOL_SPEEDUP = {"none": 2.5, "blocks": 1.3, "full": 1.3, "graphed": 1.0, "graphed_loss": 1.0}


def pool_wall_seconds(jobs: Sequence[Job], workers_per_gpu: int = 4) -> float:
    """Estimated wall seconds of ``jobs`` on one H200 with ``workers_per_gpu`` workers (4: the
    ``POOL_SPEEDUP`` estimates; 1: the plain sum), at least the longest single job."""
    speedup = (lambda mode: POOL_SPEEDUP[mode]) if workers_per_gpu == 4 else (lambda mode: 1.0)
    total = sum(job_seconds(j.params["model"], j.params) / speedup(compile_mode(j.params)) for j in jobs)
    longest = max((job_seconds(j.params["model"], j.params) for j in jobs), default=0.0)
    return max(total, longest)


def config(preset: str, **overrides) -> dict:
    """The preset's entries, then ``size`` (a name of ``SIZES``: its entries replace the preset's
    model and batch sizes), then the other overrides."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    cfg = dict(PRESETS[preset])
    if "size" in overrides:
        if overrides["size"] not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {overrides['size']!r}")
        cfg.update(SIZES[overrides["size"]])
    cfg.update(overrides)
    return cfg


def label(model: str, size: str | None) -> str:
    """How a run is grouped in reports and rate choices: the model, plus ``@size`` for sizes
    other than the presets' own (``transformer@large``)."""
    return model if size in (None, "tiny", "gpu", "small") else f"{model}@{size}"


def _job(cfg: dict, model: str, lr: float, seed: int, phase: str) -> Job:
    params = dict(cfg, model=model, lr=lr, seed=seed, phase=phase)
    params.pop("seeds", None)
    params.pop("models", None)
    return Job("lm", f"lm/{label(model, cfg.get('size'))}/lr{lr:.3g}/s{seed}", params, 1.1 * job_seconds(model, cfg))


def sweep_factors(preset: str, model: str) -> tuple[float, ...]:
    """The sweep's factors of ``LR_CENTRES["adam"]`` for ``model`` in ``preset``."""
    return MODEL_FACTORS.get(model, FACTORS) if preset in RESTRICTED_PRESETS else FACTORS


def finished(records: Sequence[dict]) -> list[dict]:
    """One record with a result per job (:func:`~benchmarks.pool.latest_records`: a run cut
    short is dropped where the same job also finished in full)."""
    return [r for r in latest_records(records) if "result" in r]


def _label(res: dict) -> str:
    return label(res["model"], res.get("size"))


def _seed0_losses(records: Sequence[dict]) -> dict[str, dict[float, float]]:
    """label -> {rate: final validation loss of its seed-0 run (diverged: inf)}, either phase."""
    out: dict[str, dict[float, float]] = {}
    for r in finished(records):
        if r["job"]["experiment"] != "lm" or r["result"]["seed"] != 0:
            continue
        res = r["result"]
        loss = res["final_val_loss"] if not res["diverged"] and math.isfinite(res["final_val_loss"]) else math.inf
        out.setdefault(_label(res), {})[res["lr"]] = loss
    return out


def best_rates(records: Sequence[dict]) -> dict[str, float]:
    """label (the model, ``model@size`` for a size other than the preset's) -> the rate whose
    seed-0 run has the lowest final validation loss (ties: smaller rate).

    Seed-0 runs of any phase count (a sweep run cut short and redone in the seeds phase is judged
    by the redone run, see :func:`finished`); a diverged run counts as infinite loss."""
    return {m: min(losses, key=lambda lr: (losses[lr], lr)) for m, losses in _seed0_losses(records).items()}


def edge_rates(records: Sequence[dict], factor: float = EXTEND_FACTOR) -> dict[str, list[float]]:
    """label -> the next rates to try where the best rate of the seed-0 runs is at an edge of the
    tried ones: ``factor`` beyond the smallest (best is the smallest, or every run diverged) or
    beyond the largest. A label whose best rate is interior is left out; one tried rate is both
    edges (both neighbours proposed).

    Example:
        >>> recs = [{"job": {"experiment": "lm", "name": f"{m}{lr}"}, "result": {"model": m, "lr": lr, "seed": 0,
        ...          "final_val_loss": loss, "diverged": False}} for m, lr, loss in
        ...         [("a", 1e-3, 2.0), ("a", 3e-3, 1.5), ("a", 9e-3, 1.8), ("b", 1e-3, 2.0), ("b", 3e-3, 1.9)]]
        >>> {m: [round(x, 6) for x in v] for m, v in edge_rates(recs).items()}
        {'b': [0.009]}
    """
    return edges(_seed0_losses(records), factor)


def edges(losses: dict[str, dict[float, float]], factor: float = EXTEND_FACTOR) -> dict[str, list[float]]:
    """key -> the rates ``factor`` beyond the tried ones where the best (lowest loss; ties: the
    smaller rate) is the smallest or the largest tried (the largest only if it is finite); keys whose
    best rate is interior are left out (see :func:`edge_rates`)."""
    out = {}
    for m, by_rate in losses.items():
        tried = sorted(by_rate)
        best = min(tried, key=lambda lr: (by_rate[lr], lr))
        nxt = []
        if best == tried[0]:
            nxt.append(tried[0] / factor)
        if best == tried[-1] and math.isfinite(by_rate[best]):
            nxt.append(tried[-1] * factor)
        if nxt:
            out[m] = nxt
    return out


def jobs(preset: str, seeds: Sequence[int] | None = None, phase: str = "sweep", sweep_records: str | None = None,
         models: Sequence[str] = MODELS, **overrides) -> list[Job]:
    """Phase ``sweep`` (the rates of :func:`sweep_factors` x seed 0), ``extend`` (seed 0 at the
    rates :func:`edge_rates` proposes from ``sweep_records``; none when every best rate is interior)
    or ``seeds`` (best rate x seeds 0..n-1, read from ``sweep_records``)."""
    cfg = config(preset, **overrides)
    n_seeds = len(seeds) if seeds is not None else cfg["seeds"]
    size = cfg.get("size")
    if phase == "sweep":
        return [_job(cfg, m, LR_CENTRES["adam"] * f, 0, "sweep") for m in models for f in sweep_factors(preset, m)]
    if phase not in ("extend", "seeds"):
        raise ValueError(f"phase must be 'sweep', 'extend' or 'seeds', got {phase!r}")
    if sweep_records is None:
        raise ValueError(f"phase={phase} needs sweep_records=<records.jsonl of the sweep>")
    records = load_records(Path(sweep_records))
    rates = best_rates(records)
    missing = [m for m in models if label(m, size) not in rates]
    if missing:
        raise ValueError(f"the sweep records have no finished run of {missing} (size {size})")
    if phase == "extend":
        edges = edge_rates(records)
        out = [_job(cfg, m, lr, 0, "extend") for m in models for lr in edges.get(label(m, size), [])]
        if not out:
            print("lm extend: every model's best rate is interior, nothing to extend", flush=True)
        return out
    # seed 0 at the best rate is the sweep's run: listed again so that a sweep run cut short is redone
    # (the pool skips it when it finished in full)
    return [_job(cfg, m, rates[label(m, size)], s, "seeds") for m in models for s in range(n_seeds)]


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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample spread of the finite values (inf, nan when none; spread 0 for one)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.inf, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(records: Sequence[dict]) -> dict:
    """Per model: the chosen rate, final bpc mean/std over seeds at that rate, ms per step, params."""
    ok = finished(records)
    rates = best_rates(ok)
    edges = edge_rates(ok)
    out = {}
    for model, lr in rates.items():
        runs = [r["result"] for r in ok if _label(r["result"]) == model and math.isclose(r["result"]["lr"], lr)]
        bpc = [x["final_bpc"] if not x["diverged"] else math.inf for x in runs]
        mean, std = mean_std(bpc)
        sweep = {f"{r['result']['lr']:.3g}": (math.inf if r["result"]["diverged"] else r["result"]["final_bpc"]) for r in ok
                 if _label(r["result"]) == model and r["result"]["seed"] == 0}
        other = [x for x in (r["result"] for r in ok) if _label(x) == model and not math.isclose(x["lr"], lr) and x["seed"] > 0]
        out[model] = {"lr": lr, "bpc_mean": mean, "bpc_std": std, "seeds": sorted(x["seed"] for x in runs),
                      "bpc_per_seed": bpc, "sweep_bpc": sweep, "params": runs[0]["params"],
                      "ms_per_step": statistics.median(x["ms_per_step"] for x in runs),
                      "tokens_per_second": statistics.median(x["tokens_per_step"] / x["ms_per_step"] * 1000 for x in runs),
                      "compile": runs[0].get("compile", "none"),
                      # records before the compile option timed every step and have no compile_seconds
                      "compile_seconds": (statistics.median(x["compile_seconds"] for x in runs)
                                          if all("compile_seconds" in x for x in runs) else None),
                      "rate_at_edge": model in edges,
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
        for j, r in enumerate(x["result"] for x in records if "result" in x and _label(x["result"]) == model
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
                     f"{len(s['bpc_per_seed']) - diverged} / {len(s['bpc_per_seed'])}", f"{s['ms_per_step']:.1f}",
                     f"{s['tokens_per_second'] / 1e3:.0f} K", s["compile"] + ("" if s["compile_seconds"] is None else f", {s['compile_seconds']:.0f} s"),
                     sweep.replace("inf", "diverged") + (" (best at an edge: run phase=extend)" if s["rate_at_edge"] else "")
                     + (" (cut short)" if s["cut_short"] else "") + (f"; also {others}" if others else "")])
    errors = [f"- {r['job']['name']}: {r['error'][:300]}" for r in records if "error" in r]
    md = ["# Language models on Shakespeare characters", "",
          f"- GPU: {', '.join(gpus)}", f"- report command: `{header.get('command')}`",
          f"- token budget: {first['steps']} steps x {first['tokens_per_step']} characters = "
          f"{first['steps'] * first['tokens_per_step'] / 1e6:.2f} M characters per run, every model",
          "- AdamW (torch, fused), warm-up 5 % + cosine to 10 %, clip 1.0, no weight decay; CMS periods 1/4/16 "
          "through PeriodicGradients; rate chosen on seed 0 from the rates of the sweep column (phase sweep, "
          "then phase extend while the best rate is at an edge)",
          ("- ms/step and tokens/s: median over the chosen rate's seeds, steps 3 onwards; the first two steps "
           "(compilation included) are the compile column's seconds; with several workers per GPU, shared-GPU times"
           if all(s["compile_seconds"] is not None for s in summary.values()) else
           "- ms/step and tokens/s: median over the chosen rate's seeds, every step (records from before the compile option)"), "",
          markdown_table(["model", "params", "AdamW lr", "val bpc (mean +- std of finished seeds)", "seeds finished / run",
                          "ms/step", "tokens/s", "compile", "sweep (seed 0 bpc)"], rows),
          "", "![validation bpc](bpc_curves.png)", ""]
    if errors:
        md += ["Failed runs:", *errors, ""]
    (out_dir / "results.md").write_text("\n".join(md), encoding="utf-8")
