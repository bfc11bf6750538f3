"""Benchmarks write to ./runs/<name>-<time>/ and say so; the committed results change only with --update-results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.cli import main
from benchmarks.outdir import RESULTS

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--optimizers", "AdamW", "SGD", "--tasks", "quadratic_illcond", "digits_mlp", "--steps", "4",
        "--seeds", "1", "--factors", "1"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def checkout_copy(dest: Path) -> Path:
    """This working tree's files (tracked and untracked, not ignored), committed in a fresh repository."""
    names = git(ROOT, "ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "copy")
    return dest


def run_benchmarks(repo: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "quick", *TINY, *args], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_quick_suite_leaves_a_clean_checkout_clean_and_updates_only_on_request(tmp_path):
    repo = checkout_copy(tmp_path / "repo")
    printed = run_benchmarks(repo)
    assert git(repo, "status", "--porcelain") == ""
    (run,) = (repo / "runs").iterdir()
    assert run.name.startswith("quick-") and printed.rstrip().splitlines()[-1] == f"results written to runs/{run.name}"
    assert {"results.json", "results.md", "loss_curves.png"} <= {p.name for p in run.iterdir()}

    run_benchmarks(repo, "--update-results", "--no-plots")
    changed = [line[3:] for line in git(repo, "status", "--porcelain").splitlines()]
    assert changed and all(path.startswith("benchmarks/results/quick/") for path in changed)


def test_out_inside_the_committed_results_needs_update_results():
    with pytest.raises(SystemExit, match="--update-results"):
        main(["run", "--suite", "quick", *TINY, "--out", os.path.join(RESULTS, "quick")])
    with pytest.raises(SystemExit, match="--update-results"):
        main(["report", os.path.join(RESULTS, "quick")])


def test_the_thread_count_is_set_and_recorded(tmp_path):
    before = torch.get_num_threads()
    try:
        main(["run", "--suite", "quick", *TINY, "--no-plots", "--threads", "2", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(before)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["machine"]["torch_threads"] == 2
    assert "2 torch thread(s) per process" in (tmp_path / "results.md").read_text()
