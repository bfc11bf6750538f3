"""Write results: JSON (every number), Markdown tables, and the terminal table.

JSON cannot hold infinity: it is written as ``null`` and means "never reached" or "failed".
Markdown cells: ``0.62x`` is steps to target relative to AdamW (lower is better; ``-`` = the
target was not reached by the median seed), ``1.23e-02 +- 4e-03`` a median final loss and its
standard deviation over seeds, ``*`` marks a best learning rate at an end of the sweep.

Example:
    >>> to_jsonable({"a": float("inf"), "b": [1.0, float("nan")]})
    {'a': None, 'b': [1.0, None]}
    >>> fmt_ratio(0.5), fmt_ratio(float("inf"))
    ('0.50x', '-')
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Sequence


def to_jsonable(obj):
    """Replace inf/nan by None recursively (tuples become lists)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(to_jsonable(result), fh, indent=1, allow_nan=False)
        fh.write("\n")


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def fmt_loss(median: float | None, std: float | None = None) -> str:
    if median is None or not math.isfinite(median):
        return "diverged"
    return f"{median:.3g}" if not std else f"{median:.3g} +- {std:.1g}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def header_lines(result: dict) -> list[str]:
    """The provenance lines every Markdown report starts with."""
    m, v = result["machine"], result["versions"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch thread(s))"
    extra = ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("python", "torch") and val)
    return [f"- command: `{result['command']}`", f"- date: {result['date']}; machine: {where}",
            f"- python {v['python']}, torch {v['torch']}" + (f", {extra}" if extra else ""),
            f"- seeds: {result['seeds']}; wall time {result.get('wall_seconds', 0):.0f} s, CPU time "
            f"{result.get('cpu_seconds', 0):.0f} s ({m['torch_threads']} torch thread(s) per process; "
            f"{result.get('jobs', 1)} process(es)), load average "
            f"{result.get('load_average_1min', 0):.1f} at the end (the 2-core CPU is shared)"]


def ratio_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Optimizers x tasks: steps to target relative to AdamW, plus wins and rho(1)."""
    tasks = list(result["tasks"])
    names = list(result["optimizers"])
    rho = result.get("profile", {}).get("rho", {})
    header = ["optimizer"] + tasks + ["faster than AdamW", "fastest (rho(1))"]
    rows = []
    for name in names:
        cells, wins = [], 0
        for task in tasks:
            r = result["tasks"][task]["results"].get(name, {})
            ratio = r.get("ratio_adamw")
            wins += ratio is not None and math.isfinite(ratio) and ratio < 1.0
            cells.append(fmt_ratio(ratio))
        fastest = rho.get(name, [None])[0]
        rows.append([name] + cells + [f"{wins}/{len(tasks)}", "-" if fastest is None else f"{fastest:.2f}"])
    return header, rows


def loss_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Optimizers x tasks: median final loss +- std over seeds, with the best rate."""
    tasks = list(result["tasks"])
    header = ["optimizer"] + tasks
    rows = []
    for name in result["optimizers"]:
        cells = []
        for task in tasks:
            r = result["tasks"][task]["results"].get(name)
            if r is None:
                cells.append("")
                continue
            mark = "*" if r["edge"] else ""
            cells.append(f"{fmt_loss(r['final']['median'], r['final']['std'])} (lr {r['best_lr']:.2g}{mark})")
        rows.append([name] + cells)
    return header, rows


def quality_markdown(result: dict, plots: Sequence[str] = ()) -> str:
    """The Markdown report of a ``quick`` or ``quality`` run."""
    parts = [f"# `{result['suite']}` suite results", ""] + header_lines(result) + [""]
    if result.get("skipped_tasks"):
        parts += ["Skipped tasks: " + "; ".join(f"`{k}` ({v})" for k, v in result["skipped_tasks"].items()), ""]
    parts += ["## Steps to target, relative to AdamW (lower is better)", "",
              "Target per task: the loss every AdamW seed reaches at AdamW's best learning rate. "
              "`-`: the median seed never reached it.", ""]
    parts += [markdown_table(*ratio_rows(result)), ""]
    parts += ["## Final held-out loss, median +- std over seeds (best learning rate; * = edge of the sweep)", "",
              markdown_table(*loss_rows(result)), ""]
    parts += ["## Targets and time", "", markdown_table(
        ["task", "steps", "target loss", "AdamW median steps", "median seconds per run (AdamW)"],
        [[t, str(s["steps"]), f"{s['target']:.4g}" if s["target"] is not None and math.isfinite(s["target"]) else "-",
          str(s["results"].get("AdamW", {}).get("steps_to_target", {}).get("median", "-")),
          f"{s['results'].get('AdamW', {}).get('seconds', {}).get('median', float('nan')):.2f}"]
         for t, s in result["tasks"].items()]), ""]
    errors = [(t, o, e) for t, s in result["tasks"].items() for o, r in s["results"].items() for e in r["errors"]]
    if errors:
        parts += ["## Errors", ""] + [f"- `{o}` on `{t}`: {e}" for t, o, e in errors] + [""]
    parts += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(parts) + "\n"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """The final table on the terminal (rich when installed, plain text otherwise)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(markdown_table(header, rows))
        return
    table = Table(title=title)
    for col in header:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=max(120, 14 * len(header))).print(table)
