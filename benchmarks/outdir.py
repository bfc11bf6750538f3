"""Where a run writes: a fresh run folder outside the package, or (only when asked) the committed results.

Every benchmark entry point writes to ``./runs/<name>-<UTC time>/`` by default, so that a trial run
never overwrites the committed reference results; ``--update-results`` writes to
``benchmarks/results/<name>/`` instead, and ``--out DIR`` anywhere else. An ``--out`` inside
``benchmarks/results/`` is refused without ``--update-results``. Each entry point ends by printing
``results written to <folder>``.

Example:
    >>> import datetime
    >>> now = datetime.datetime(2026, 12, 1, 9, 30, 5)
    >>> run_dir("layers", now=now)
    'runs/layers-20261201-093005'
    >>> run_dir("layers", out="/tmp/x", now=now)
    '/tmp/x'
    >>> run_dir("layers", update=True).endswith(os.path.join("benchmarks", "results", "layers"))
    True
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def reference_dir(name: str) -> str:
    """The committed results folder of ``name``: ``benchmarks/results/<name>``."""
    return os.path.join(RESULTS, name)


def is_committed(path: str) -> bool:
    """Whether ``path`` lies inside the committed ``benchmarks/results/``."""
    full = os.path.realpath(path)
    return full == os.path.realpath(RESULTS) or full.startswith(os.path.realpath(RESULTS) + os.sep)


def check_out(out: str | None, update: bool) -> None:
    """Refuse ``--out`` inside ``benchmarks/results/`` unless ``--update-results`` was given."""
    if out and not update and is_committed(out):
        raise SystemExit(f"--out {out} is inside the committed benchmarks/results/; "
                         "pass --update-results to rewrite the reference results")


def run_dir(name: str, out: str | None = None, update: bool = False, now: datetime.datetime | None = None,
            reference: bool = False) -> str:
    """``out`` when given; ``benchmarks/results/<name>`` with ``update``; else ``runs/<name>-<time>``.

    ``reference`` is the old name of ``update``."""
    update = update or reference
    if out:
        check_out(out, update)
        return out
    if update:
        return reference_dir(name)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return os.path.join("runs", f"{name}-{now.strftime('%Y%m%d-%H%M%S')}")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out DIR`` and ``--update-results`` (alias ``--reference``) on ``parser``."""
    parser.add_argument("--out", help=f"output folder (default: a fresh ./runs/{name}-<time>/)")
    parser.add_argument("--update-results", "--reference", dest="update_results", action="store_true",
                        help=f"rewrite the committed results in benchmarks/results/{name}/")


def announce(path: str) -> None:
    """Print where the results went (the last line of every entry point)."""
    rel = os.path.relpath(path)
    print(f"results written to {path if rel.startswith('..') else rel}", flush=True)


def save(out_dir: str, stem: str, record: dict, markdown: str) -> None:
    """Write ``<stem>.json`` (the record) and ``<stem>.md`` into ``out_dir`` (created), then announce it."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as fh:
        json.dump(record, fh, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as fh:
        fh.write(markdown)
    announce(out_dir)
