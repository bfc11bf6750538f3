"""PNG plots of suite results (matplotlib, Agg backend; no display needed).

- ``loss_curves``: one panel per task, eval loss vs step at each optimizer's best rate; the line
  is the median over seeds and the band spans the min and max seed. Baselines are dashed.
- ``steps_bars``: per task, steps to target relative to AdamW (log scale, bars grow from 1: down =
  faster than AdamW); an ``x`` at the top means the target was not reached.
- ``performance_profile``: rho(tau), the fraction of tasks an optimizer solves within tau times the
  fastest optimizer's steps; higher and further left is better.
- ``accuracy_matrices``: for a continual sequence, one heatmap per method of R[i][j], the metric
  on task j (column) after training task i (row); the diagonal is learning, what lies below it is
  remembering.

Example:
    >>> import tempfile, os
    >>> res = {"tasks": {"t": {"results": {"AdamW": {"seeds": [{"steps": [0, 1], "losses": [2.0, 1.0]}]}}}}}
    >>> path = os.path.join(tempfile.mkdtemp(), "curves.png")
    >>> loss_curves(res, path) == path and os.path.getsize(path) > 0
    True
"""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASELINES = ("AdamW", "SGD", "Muon")


def _style(names: list[str]) -> dict[str, dict]:
    cmap = plt.get_cmap("tab10")
    styles, k = {}, 0
    greys = {"AdamW": "black", "SGD": "tab:gray", "Muon": "saddlebrown"}
    for name in names:
        if name in greys:
            styles[name] = {"color": greys[name], "linestyle": "--"}
        else:
            styles[name] = {"color": cmap(k % 10), "linestyle": "-"}
            k += 1
    return styles


def _grid(n: int) -> tuple[plt.Figure, list]:
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _save(fig: plt.Figure, path: str, tight: bool = True) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def loss_curves(result: dict, path: str) -> str:
    """Median eval-loss curve with a min-max seed band per optimizer, one panel per task."""
    tasks = list(result["tasks"])
    names = sorted({n for t in tasks for n in result["tasks"][t]["results"]}, key=lambda n: (n not in BASELINES, n))
    styles = _style(names)
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        summary = result["tasks"][task]
        positive = True
        for name, res in summary["results"].items():
            curves = [s for s in res["seeds"] if s["losses"] and all(_finite(v) for v in s["losses"])]
            if not curves:
                continue
            length = min(len(s["losses"]) for s in curves)
            steps = curves[0]["steps"][:length]
            cols = list(zip(*[s["losses"][:length] for s in curves]))
            med = [sorted(c)[len(c) // 2] for c in cols]
            positive &= min(min(c) for c in cols) > 0
            ax.plot(steps, med, label=name, linewidth=1.4, **styles[name])
            if len(curves) > 1:
                ax.fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], color=styles[name]["color"],
                                alpha=0.15, linewidth=0)
        if _finite(summary.get("target")):
            ax.axhline(summary["target"], color="red", linewidth=0.8, linestyle=":", label="target")
        if positive:
            ax.set_yscale("log")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=min(7, len(labels)), loc="lower center")
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) > 7), 1, 1))
    return _save(fig, path, tight=False)


def steps_bars(result: dict, path: str) -> str:
    """Grouped bars of steps-to-target relative to AdamW, per task (log scale, bars grow from 1)."""
    tasks = list(result["tasks"])
    names = list(result["optimizers"])
    styles = _style(names)
    width = 0.8 / max(1, len(names))
    ratios = {(n, t): result["tasks"][t]["results"].get(n, {}).get("ratio_adamw") for n in names for t in tasks}
    finite = [r for r in ratios.values() if _finite(r) and r > 0]
    low, high = min(finite + [0.3]) / 1.2, max(finite + [3.0]) * 1.2
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(tasks) + 2), 4.6))
    for k, name in enumerate(names):
        for i, task in enumerate(tasks):
            ratio, x = ratios[(name, task)], i - 0.4 + (k + 0.5) * width
            label = name if i == 0 else None
            if _finite(ratio) and ratio > 0:  # down from 1 = faster than AdamW, up = slower
                ax.bar(x, ratio - 1.0, width, bottom=1.0, color=styles[name]["color"], label=label)
                ax.plot(x, ratio, marker="_", markersize=6, color=styles[name]["color"])
            else:
                ax.plot(x, high / 1.15, marker="x", color=styles[name]["color"], label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("steps to target / AdamW's")
    ax.set_title("steps to AdamW's target / AdamW's steps (below 1 = faster; x = never reached)")
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return _save(fig, path)


def performance_profile(result: dict, path: str) -> str:
    """rho(tau) step curves per optimizer."""
    taus, rho = result["profile"]["taus"], result["profile"]["rho"]
    styles = _style(list(rho))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, values in rho.items():
        ax.step(taus, values, where="post", label=name, **styles[name])
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("tau (steps / fastest optimizer's steps)")
    ax.set_ylabel("fraction of tasks solved within tau")
    ax.set_title(f"performance profile over {len(result['tasks'])} tasks")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def accuracy_matrices(sequence: str, methods: dict, metric: str, path: str) -> str:
    """One heatmap per method of the mean (over seeds) matrix R[i][j]."""
    names = list(methods)
    fig, axes = _grid(len(names))
    higher = metric != "bpc"
    values = [v for m in methods.values() if m["matrix_mean"] for row in m["matrix_mean"] for v in row]
    limits = (0.0, 1.0) if metric == "accuracy" else (min(values, default=0.0), max(values, default=1.0))
    for ax, name in zip(axes, names):
        matrix = methods[name]["matrix_mean"]
        if matrix is None:
            ax.set_title(f"{name}: failed", fontsize=9)
            ax.axis("off")
            continue
        n = len(matrix)
        ax.imshow(matrix, cmap="viridis" if higher else "viridis_r", vmin=limits[0], vmax=limits[1])
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(n)), ax.set_yticks(range(n))
        ax.set_xlabel(f"{metric} on task")
        ax.set_ylabel("after training task")
        bwt = methods[name]["bwt"]["mean"]
        ax.set_title(f"{name}  BWT " + ("-" if bwt is None else f"{bwt:+.3f}"), fontsize=9)
    fig.suptitle(f"{sequence}: {metric} matrix R[i][j] (mean over seeds)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, path, tight=False)
