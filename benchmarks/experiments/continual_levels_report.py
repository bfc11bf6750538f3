"""The ``continual_levels`` suite's report: spreads over seeds, the verdict per method, plots.

``report(records, out_dir, header)`` writes ``results.json``, ``results.md`` and one
``<sequence>_task0.png`` per sequence; ``summarize(records)`` is the table behind them.

Example:
    >>> summarize([])
    {}
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from ..metrics import spread
from ..report import markdown_table, to_jsonable

METHODS = ("finetune", "multitimescale", "nested_cms", "ewc", "si", "lwf", "replay", "recipe")


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
        for method in METHODS[1:]:
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
        if "recipe" in ms and "ewc" in ms:
            r, e = ms["recipe"], ms["ewc"]
            sign = 1 if seq["higher_is_better"] else -1
            d_avg = sign * (r["average_final"]["mean"] - e["average_final"]["mean"])
            noise = math.hypot(r["average_final"]["std"], e["average_final"]["std"])
            lines.append(f"- {seq_name} / recipe vs ewc: final average {'better' if d_avg > 0 else 'worse'} by "
                         f"{abs(d_avg):.3f} {seq['metric']} (spread {noise:.3f}); BWT {r['bwt']['mean']:+.3f} vs "
                         f"{e['bwt']['mean']:+.3f}.")
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
    has_recipe = any("recipe" in seq["methods"] for seq in summary.values())
    lines = ["# Continual learning: fine-tuning vs multi-timescale levels vs nested CMS vs EWC"
             + (" vs the recipe" if has_recipe else ""), "",
             f"- command: `{header.get('command', '?')}`", f"- record files: {header.get('record_files', [])}",
             f"- device(s): {', '.join(gpus)}", f"- run date(s): {', '.join(sorted(set(dates))) or '?'}",
             f"- report written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "Average final = mean metric over all tasks after the last task; BWT/FWT as in GEM "
             "(benchmarks/metrics.py); for bits per character both are negated, so **negative BWT = "
             "forgetting** everywhere. Mean +- std over seeds. `replay` stores data: a reference, not a "
             "competitor. `nested_cms` has more parameters (column params)."
             + (" `recipe` is `deepopt.continual.Recipe` with `deepopt.continual.DEFAULTS` of the run's "
                "commit, or the job's `recipe_setting` over them (each section names the knobs; not tuned "
                "here)." if has_recipe else ""), ""]
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
        knobs = {json.dumps(r["result"]["recipe_knobs"], sort_keys=True) for r in records if "result" in r
                 and r["result"]["sequence"] == seq_name and r["result"]["method"] == "recipe"
                 and r["result"].get("recipe_knobs")}
        lines += [f"`recipe` knobs: `{k}`" for k in sorted(knobs)] + ([""] if knobs else [])
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
