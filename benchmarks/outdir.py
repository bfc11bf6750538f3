"""Where a run writes: a fresh run folder outside the package, or the committed reference results.

Suites whose committed results are references (``layers``, ``lm_defaults``) write to
``./runs/<name>-<UTC time>/`` by default, so that a trial run never overwrites them; ``--reference``
writes to ``benchmarks/results/<name>/`` instead, and ``--out DIR`` anywhere.

Example:
    >>> import datetime
    >>> now = datetime.datetime(2026, 12, 1, 9, 30, 5)
    >>> run_dir("layers", now=now)
    'runs/layers-20261201-093005'
    >>> run_dir("layers", out="/tmp/x", now=now)
    '/tmp/x'
    >>> run_dir("layers", reference=True).endswith(os.path.join("benchmarks", "results", "layers"))
    True
"""

from __future__ import annotations

import datetime
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def reference_dir(name: str) -> str:
    """The committed results folder of ``name``: ``benchmarks/results/<name>``."""
    return os.path.join(RESULTS, name)


def run_dir(name: str, out: str | None = None, reference: bool = False, now: datetime.datetime | None = None) -> str:
    """``out`` when given; the reference folder with ``reference``; else ``runs/<name>-<time>``."""
    if out and reference:
        raise SystemExit("pass either --out DIR or --reference (the committed results folder), not both")
    if out:
        return out
    if reference:
        return reference_dir(name)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return os.path.join("runs", f"{name}-{now.strftime('%Y%m%d-%H%M%S')}")
