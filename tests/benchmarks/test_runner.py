"""The runner end to end on a tiny config, and the properties that make its comparisons fair."""

import json
import math
import os

import pytest
import torch

from benchmarks.cli import main
from benchmarks.optimizers import OptimizerSpec, select_optimizers
from benchmarks.runner import run_trial, sweep_and_seeds
from benchmarks.tasks import TASKS, get_task

TINY = get_task("quadratic_illcond").with_steps(12, 4)


def test_cli_tiny_run_writes_well_formed_results(tmp_path):
    out = tmp_path / "quick"
    main(["run", "--suite", "quick", "--tasks", "quadratic_illcond", "digits_mlp", "--optimizers", "AdamW", "SGD",
          "--steps", "6", "--seeds", "2", "--factors", "0.5", "1", "--out", str(out)])
    result = json.loads((out / "results.json").read_text())
    for key in ("machine", "versions", "seeds", "command", "date", "tasks", "profile", "optimizers"):
        assert key in result
    assert result["seeds"] == [0, 1] and result["machine"]["cpu"] and result["versions"]["torch"] == torch.__version__
    assert "--suite quick" in result["command"]
    for task in ("quadratic_illcond", "digits_mlp"):
        summary = result["tasks"][task]
        assert summary["target"] is not None
        adamw = summary["results"]["AdamW"]
        assert adamw["ratio_adamw"] == 1.0 and len(adamw["sweep"]) == 2 and len(adamw["seeds"]) == 2
        for seed in adamw["seeds"]:
            assert seed["steps"] == [0, 1, 2, 3, 4, 5, 6][: len(seed["steps"])] or seed["steps"][0] == 0
            assert seed["steps_to_target"] is not None  # every AdamW seed reaches the target by construction
        assert set(summary["results"]) == {"AdamW", "SGD"}
    assert set(result["profile"]["rho"]) == {"AdamW", "SGD"}
    md = (out / "results.md").read_text()
    assert "| AdamW |" in md and "1.00x" in md
    for png in ("loss_curves.png", "steps_to_target.png"):
        assert (out / png).stat().st_size > 1000
    (out / "results.md").unlink()
    main(["report", str(out)])  # the Markdown and plots can be redone from results.json alone
    assert (out / "results.md").read_text() == md


def test_same_seed_same_start_and_data_across_runs():
    spec = select_optimizers(["AdamW"])["AdamW"]
    task = get_task("digits_mlp").with_steps(6, 3)
    a, b, c = (run_trial(task, spec, 1.0, seed) for seed in (0, 0, 1))
    assert a.losses == b.losses
    assert a.losses[0] != c.losses[0]


def test_divergence_and_errors_are_recorded_not_raised():
    sgd = select_optimizers(["SGD"])["SGD"]
    diverged = run_trial(get_task("rosenbrock_2d").with_steps(30, 1), sgd, 1e4, seed=0)
    assert diverged.diverged and diverged.final == math.inf

    def broken(model, params, lrs, exclude):
        raise RuntimeError("boom")

    failed = run_trial(TINY, OptimizerSpec("Broken", "adam", "test", broken), 1.0, seed=0)
    assert failed.error.startswith("RuntimeError: boom") and failed.final == math.inf


def test_sweep_picks_the_lowest_final_loss_and_flags_the_edge():
    sgd = select_optimizers(["SGD"])["SGD"]
    res = sweep_and_seeds(TINY, sgd, seeds=[0, 1], factors=(0.01, 1.0))
    finals = {t.factor: t.final for t in res.sweep}
    assert res.best_factor == min(finals, key=finals.get)
    assert res.edge and len(res.seeds) == 2 and res.seeds[1].factor == res.best_factor


def test_muon_baseline_splits_matrices_from_the_rest():
    from benchmarks.optimizers import build_optimizer, muon_split

    problem = get_task("char_transformer").build(0, "cpu")
    named = list(problem.model.named_parameters())
    matrices, rest = muon_split(named, ("embed", "head"))
    assert matrices and all(p.ndim == 2 and "embed" not in n and "head" not in n for n, p in matrices)
    assert {n for n, _ in rest} >= {"embed.weight", "head.weight", "norm.weight"}
    opt = build_optimizer(select_optimizers(["Muon"])["Muon"], problem.model, get_task("char_transformer").lr_centres)
    assert isinstance(opt.parts[0], torch.optim.Muon) and isinstance(opt.parts[1], torch.optim.AdamW)


def test_every_available_task_builds_and_evaluates():
    for name, task in TASKS.items():
        if task.availability() is not None:
            continue
        problem = task.build(0, "cpu")
        loss = problem.train_loss(1)
        loss.backward()
        assert math.isfinite(problem.eval_loss()), name


def test_unavailable_task_reports_why():
    from benchmarks.tasks.base import Task

    task = Task("x", "needs a missing class", lambda s, d: None, 1, 1, {"sgd": 1, "adam": 1, "muon": 1},
                requires="benchmarks.tasks:NoSuchClass")
    assert "has no NoSuchClass" in task.availability()
    with pytest.raises(RuntimeError, match="not available"):
        task.build(0)


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="unknown optimizers"):
        select_optimizers(["NotAnOptimizer"])
    with pytest.raises(ValueError, match="python -m benchmarks list"):
        get_task("nope")
    with pytest.raises(SystemExit, match="seeds"):
        main(["run", "--suite", "quick", "--seeds", "0"])


def test_parallel_tasks_give_the_same_numbers_as_serial():
    from benchmarks.quality import run_suite

    tasks = [get_task("saddle").with_steps(5, 5), get_task("quadratic_noisy").with_steps(5, 5)]
    specs = select_optimizers(["AdamW", "SGD"])
    serial = run_suite(tasks, specs, seeds=[0, 1], factors=(1.0,))
    parallel = run_suite(tasks, specs, seeds=[0, 1], factors=(1.0,), jobs=2)
    for task in ("saddle", "quadratic_noisy"):
        for opt in ("AdamW", "SGD"):
            a = [s["losses"] for s in serial["tasks"][task]["results"][opt]["seeds"]]
            b = [s["losses"] for s in parallel["tasks"][task]["results"][opt]["seeds"]]
            assert a == b
    assert list(parallel["tasks"]) == ["saddle", "quadratic_noisy"]


def test_schedule_free_style_optimizers_are_evaluated_in_eval_mode():
    from benchmarks.runner import evaluate

    calls = []

    class Modal:
        def eval(self):
            calls.append("eval")

        def train(self):
            calls.append("train")

    class Problem:
        def eval_loss(self):
            calls.append("loss")
            return 1.0

    assert evaluate(Problem(), Modal()) == 1.0 and calls == ["eval", "loss", "train"]
    assert evaluate(Problem(), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)) == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cpu_suites_refuse_cuda_without_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["run", "--suite", "quick", "--device", "cuda", "--out", str(tmp_path)])
