"""results.json and results.md of the learning-rate sweep.

Example:
    >>> fmt_rule(3.0), fmt_rule(0.1), fmt_rule(0.3), fmt_rule(1.0), fmt_rule(None)
    ('x3', 'x1/10', 'x1/3', 'x1 (same)', '-')
"""

from __future__ import annotations

import math
import os

from ..report import fmt_loss, header_lines, markdown_table, write_json
from .sweep import snap


def fmt_rule(ratio: float | None) -> str:
    """A ratio to AdamW's rate as ``x3``, ``x1/10`` or ``x1 (same)``."""
    if not ratio:
        return "-"
    if math.isclose(ratio, 1.0):
        return "x1 (same)"
    return f"x{ratio:g}" if ratio > 1 else f"x1/{snap(1 / ratio):g}"


def fmt_ratio(ratio: float | None, edge: bool = False) -> str:
    return "-" if not ratio else f"{ratio:.3g}x" + ("*" if edge else "")


def rule_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Optimizer x task ratios and the rule of thumb."""
    tasks = list(result["tasks"])
    rows = []
    for name, rule in result["rules"].items():
        cells = [fmt_ratio(rule["ratios"].get(t), result["tasks"][t]["optimizers"].get(name, {}).get("edge", False))
                 for t in tasks]
        rows.append([name] + cells + [fmt_rule(rule["rule"])])
    return ["optimizer"] + [f"best lr / AdamW's, {t}" for t in tasks] + ["rule of thumb"], rows


def task_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Per optimizer on one task: best rate, ratio, loss there and at AdamW's best rate."""
    ref = summary["reference_lr"]
    rows = [[name, f"{r['best_lr']:g}" if r["best_lr"] else "all diverged", fmt_ratio(r["ratio"], r["edge"]),
             fmt_loss(r["loss_at_best"]), fmt_loss(r["loss_at_adamw_lr"])]
            for name, r in summary["optimizers"].items()]
    return ["optimizer", "best lr", "x AdamW's", "loss at best lr", f"loss at AdamW's best lr ({ref:g})" if ref
            else "loss at AdamW's best lr"], rows


def grid_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Every score: optimizers x rates."""
    rates = sorted(next(iter(summary["optimizers"].values()))["scores"])
    rows = [[name] + [fmt_loss(r["scores"][lr]) for lr in rates] for name, r in summary["optimizers"].items()]
    return ["optimizer"] + [f"{lr:g}" for lr in rates], rows


def markdown(result: dict) -> str:
    parts = ["# Learning rate relative to AdamW's", ""] + header_lines(result) + [""]
    parts += ["Every optimizer at every rate of the grid, no weight decay, "
              f"{len(result['seeds'])} seed(s); a rate's score is the mean final held-out loss over the seeds "
              "(diverged if any seed diverged). Ratio: the optimizer's best rate over AdamW's best rate on "
              "the same task (`*`: best rate at an end of the grid). Rule of thumb: the geometric mean of the "
              "ratios, rounded to 1, 3, 10, ... or 1/3, 1/10, ... Muon and MuonMemory run their element-wise "
              "part (vectors, the head) at AdamW's best rate.", ""]
    parts += [markdown_table(*rule_rows(result)), ""]
    for name, summary in result["tasks"].items():
        parts += [f"## {name}: {summary['description']}, {summary['steps']} steps", ""]
        parts += [markdown_table(*task_rows(summary)), "", "Final held-out loss at every rate:", ""]
        parts += [markdown_table(*grid_rows(summary)), ""]
    errors = [(t, n, e) for t, s in result["tasks"].items() for n, r in s["optimizers"].items() for e in r["errors"]]
    if errors:
        parts += ["## Errors", ""] + [f"- `{n}` on `{t}`, {e}" for t, n, e in errors] + [""]
    return "\n".join(parts)


def write(result: dict, out_dir: str) -> list[str]:
    """results.json and results.md in ``out_dir``; returns the paths."""
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
    write_json(result, paths[0])
    with open(paths[1], "w", encoding="utf-8") as fh:
        fh.write(markdown(result))
    return paths
