"""The learning-rate transfer sweep: its choice of the best rate, the ratios, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.lr_transfer.cli import main
from benchmarks.lr_transfer.report import fmt_rule
from benchmarks.lr_transfer.sweep import best_rate, rules, snap, with_ratios


def test_best_rate_skips_divergence_and_breaks_ties_to_the_smaller_rate():
    assert best_rate({1e-3: 0.2, 1e-2: 0.2, 1e-1: math.inf}) == 1e-3
    assert best_rate({1e-3: math.inf}) is None


def test_ratios_and_rule_of_thumb():
    summary = {"reference_lr": 1e-3, "optimizers": {
        "AdamW": {"scores": {1e-3: 0.1, 1e-2: 0.5}, "best_lr": 1e-3},
        "X": {"scores": {1e-3: 0.9, 1e-2: 0.2}, "best_lr": 1e-2}}}
    with_ratios(summary)
    x = summary["optimizers"]["X"]
    assert x["ratio"] == pytest.approx(10) and (x["loss_at_best"], x["loss_at_adamw_lr"]) == (0.2, 0.9)
    other = {"reference_lr": 1e-2, "optimizers": {"X": {"ratio": 1.0}}}
    assert rules({"a": summary, "b": other})["X"] == {"ratios": {"a": pytest.approx(10), "b": 1.0}, "rule": 3.0}
    assert (snap(1 / 3.3), fmt_rule(snap(1 / 3.3)), fmt_rule(snap(31.0))) == (0.3, "x1/3", "x30")


def test_tiny_run_writes_results_with_a_ratio_per_optimizer(tmp_path, capsys):
    assert main(["--tasks", "mlp_teacher", "--optimizers", "AdamW", "M3", "Muon", "--lrs", "1e-3", "3e-2",
                 "--seeds", "1", "--steps", "3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    task = result["tasks"]["mlp_teacher"]
    assert task["reference_lr"] in (1e-3, 3e-2) and set(task["optimizers"]) == {"AdamW", "M3", "Muon"}
    assert result["rules"]["AdamW"]["rule"] == 1.0 and result["machine"]["torch_threads"] == 1
    assert "| M3 |" in (tmp_path / "results.md").read_text()
    assert capsys.readouterr().out.rstrip().endswith(f"results written to {tmp_path}")
