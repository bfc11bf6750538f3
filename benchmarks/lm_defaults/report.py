"""Tables, Markdown and loss-curve plot of ``lm_defaults`` records (see :mod:`.train`).

A row per model and seed: status (``finite``, ``NaN at step N``, ``cut short at step N`` when the
per-job time cap stopped it, ``error``, or ``not started`` when the deadline came first), steps
done, initial and final train loss (nats; final = mean of the last check window), validation bits
per character, ms per step; then per model the mean validation bpc over finished finite seeds and
the ms per step relative to the Transformer's.

Example:
    >>> rec = {"job": {"name": "lm_defaults/transformer/s0", "params": {"model": "transformer", "seed": 0}},
    ...        "device": "cpu", "result": {"model": "transformer", "seed": 0, "finite": True, "first_nan_step": None,
    ...        "cut_short": False, "steps_done": 10, "steps": 10, "initial_train_loss": 4.4, "final_train_loss": 3.1,
    ...        "val_bpc": 4.5, "ms_per_step": 2.0, "params": 1000, "heads": 4}}
    >>> status(rec)
    'finite'
    >>> seed_rows([rec])[1][0][:4]
    ['transformer', '0', 'finite', '10 / 10']
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Sequence

from ..report import markdown_table, to_jsonable, write_json


def status(record: dict) -> str:
    """One word or phrase for how the job ended."""
    if "error" in record:
        return "error"
    if "result" not in record:
        return "not started (deadline)"
    r = record["result"]
    if r["first_nan_step"] is not None:
        return f"NaN at step {r['first_nan_step']}"
    if not r["finite"]:
        return "validation loss not finite"
    if r["cut_short"]:
        return f"cut short at step {r['steps_done']} (time cap)"
    return "finite"


def _f(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def seed_rows(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per model and seed."""
    header = ["model", "seed", "status", "steps", "initial train loss", "final train loss", "val bpc", "ms/step"]
    rows = []
    for rec in records:
        job, r = rec["job"]["params"], rec.get("result", {})
        steps = f"{r.get('steps_done', 0)} / {r.get('steps', job.get('steps', '-'))}"
        rows.append([job["model"], str(job["seed"]), status(rec), steps,
                     _f(r.get("initial_train_loss"), ".3f"), _f(r.get("final_train_loss"), ".3f"),
                     _f(r.get("val_bpc"), ".3f"), _f(r.get("ms_per_step"), ".1f")])
    return header, rows


def model_rows(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Per model: params, heads, finite seeds, mean val bpc of finite seeds, median ms/step, x Transformer."""
    models = list(dict.fromkeys(rec["job"]["params"]["model"] for rec in records))
    ms = {}
    rows = []
    for m in models:
        res = [rec["result"] for rec in records if rec["job"]["params"]["model"] == m and "result" in rec]
        times = [r["ms_per_step"] for r in res if r.get("ms_per_step")]
        ms[m] = statistics.median(times) if times else None
    header = ["model", "params (M)", "heads", "finite / run", "val bpc (finite seeds, mean)", "ms/step", "x Transformer"]
    for m in models:
        mine = [rec for rec in records if rec["job"]["params"]["model"] == m]
        res = [rec["result"] for rec in mine if "result" in rec]
        ok = [r["val_bpc"] for r in res if r["finite"] and r.get("val_bpc") is not None]
        base = ms.get("transformer")
        rows.append([m, _f(res[0]["params"] / 1e6 if res else None, ".2f"), str(res[0]["heads"]) if res else "-",
                     f"{sum(r['finite'] for r in res)} / {len(mine)}", _f(statistics.fmean(ok) if ok else None, ".3f"),
                     _f(ms[m], ".1f"), f"{ms[m] / base:.1f}x" if ms[m] and base else "-"])
    return header, rows


def plot_losses(records: Sequence[dict], path: str, smooth: int = 20) -> str:
    """Train loss (moving average over ``smooth`` steps) against step, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours, labelled = {}, set()
    for rec in records:
        r = rec.get("result")
        if not r or not r.get("train_loss"):
            continue
        m = r["model"]
        colour = colours.setdefault(m, f"C{len(colours)}")
        ys = [v for v in r["train_loss"] if v is not None]
        w = max(1, min(smooth, len(ys)))
        avg = [sum(ys[i - w + 1:i + 1]) / w for i in range(w - 1, len(ys))]
        ax.plot(range(w, len(ys) + 1), avg, color=colour, alpha=0.8, label=None if m in labelled else m)
        labelled.add(m)
        if r["first_nan_step"] is not None:
            ax.axvline(r["first_nan_step"], color=colour, linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (nats, mean of {smooth} steps)")
    ax.set_title("default-argument LMs on Shakespeare characters (each line one seed; dotted: first NaN)")
    ax.grid(alpha=0.3)
    if colours:
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(records: Sequence[dict], out_dir: str, header: dict, plots_too: bool = True) -> list[str]:
    """results.json, results.md and loss_curves.png in ``out_dir``; returns the paths."""
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
    write_json(to_jsonable({"header": header, "records": list(records)}), paths[0])
    made = []
    if plots_too:
        try:
            made.append(plot_losses(records, os.path.join(out_dir, "loss_curves.png")))
        except Exception as err:  # e.g. no matplotlib on the GPU machine: the numbers matter more
            print(f"lm_defaults: no plot ({type(err).__name__}: {err})", flush=True)
    cfg = header["config"]
    versions = header["versions"]
    errors = [f"- {rec['job']['name']}: {rec['error'][:300]}" for rec in records if "error" in rec]
    md = ["# `lm_defaults`: language models at their default arguments", "",
          f"- command: `{header['command']}`", f"- date: {header['date']}; devices: {', '.join(header['gpus'])}",
          f"- torch {versions['torch']}, git {versions.get('git_commit')}; wall time {header.get('wall_seconds', 0):.0f} s",
          f"- sizes: dim {cfg['dim']}, depth {cfg['depth']}, heads {cfg['heads'] or 'constructor default'}, vocabulary "
          f"from the Shakespeare text; everything else at the constructors' defaults",
          f"- training: {cfg['steps']} AdamW steps (torch defaults, fused on CUDA), lr {cfg['lr']:g} after a "
          f"{cfg['warmup']}-step linear warm-up, clip {cfg['clip']:g}, batch {cfg['batch']} x {cfg['seq_len']} "
          f"characters, {cfg['precision']}{' (TF32 matmuls)' if cfg['precision'] == 'fp32' else ' autocast'}; "
          f"time cap {header['max_seconds']} s per job, deadline {header['deadline']} s", "",
          markdown_table(*model_rows(records)), "", markdown_table(*seed_rows(records)), ""]
    if errors:
        md += ["Failed jobs:", *errors, ""]
    md += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in made]
    with open(paths[1], "w", encoding="utf-8") as fh:
        fh.write("\n".join(md) + "\n")
    return paths + made
