"""``python -m benchmarks report DIR``: redo a results folder's Markdown and plots from its records.

What DIR holds decides what is rebuilt: ``results.json`` of quick / quality / continual (tables
and plots), of ``layers`` or ``lr_transfer``, or of ``lm_defaults`` (its header and records); one
pool experiment's report beside its ``records.jsonl`` (rebuilt in place, e.g. the committed
``benchmarks/results/lm10x/``); or a pool suites' ``records.jsonl`` alone (each experiment's
``DIR/<experiment>/`` report, e.g. the committed ``benchmarks/results/evidence/``). ``--out`` writes elsewhere; a committed folder under
``benchmarks/results/`` is rewritten only with ``--update-results``.

Example:
    >>> kind_of({"suite": "quality"}), kind_of({"rules": {}}), kind_of({"header": {}, "records": []})
    ('quality', 'lr_transfer', 'lm_defaults')
    >>> kind_of({"header": {"record_files": []}, "records": []})
    'experiment'
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .outdir import announce, check_out


def kind_of(result: dict) -> str:
    """Which suite wrote a ``results.json``."""
    if result.get("suite") in ("quick", "quality"):
        return "quality"
    if result.get("suite") in ("continual", "layers", "speed"):
        return result["suite"]
    if "rules" in result:
        return "lr_transfer"
    if "header" in result and "records" in result:
        return "experiment" if "record_files" in result["header"] else "lm_defaults"
    return "unknown"


def rewrite_report(folder: str, update: bool = False, out: str | None = None, command: str = "") -> str:
    """Rebuild the reports of ``folder`` into ``out`` (default: ``folder``); returns the output folder."""
    out = out or folder
    check_out(out, update)
    records = Path(folder) / "records.jsonl"
    path = os.path.join(folder, "results.json")
    result = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            result = json.load(fh)
    kind = kind_of(result) if result is not None else "pool" if records.exists() else None
    if kind is None:
        raise SystemExit(f"no results.json or records.jsonl in {folder}: pass a folder written by "
                         "`python -m benchmarks run`")
    os.makedirs(out, exist_ok=True)
    if kind == "quality":
        from .suite_runs import write_quality_outputs

        write_quality_outputs(result, out)
    elif kind == "continual":
        from .suite_runs import write_continual_outputs

        write_continual_outputs(result, out)
    elif kind == "layers":
        from .layers.suite import write_outputs

        write_outputs(result, out)
    elif kind == "lr_transfer":
        from .lr_transfer.report import write

        write(result, out)
    elif kind == "lm_defaults":
        from .lm_defaults.report import write_report

        write_report(result["records"], out, result["header"])
    elif kind in ("pool", "experiment"):
        from .experiments.run import write_reports

        if kind == "experiment" and not records.exists():
            raise SystemExit(f"{path} is one experiment's report: its records.jsonl must lie beside it")
        write_reports(Path(out), [records], command, flat=kind == "experiment")
    else:
        raise SystemExit(f"`report` cannot rebuild {path} (suite {result.get('suite')!r}: its tables are "
                         "written only by the run)")
    announce(out)
    return out
