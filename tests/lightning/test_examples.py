"""Each Lightning example: ``--help`` works, and a tiny config runs end to end (in process, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lightning")  # the optional extra "lightning"; skip this module without it

from deepopt.lightning import LevelMonitor, MultiTimescale

CONFIGS = Path(__file__).resolve().parents[2] / "lightning_examples" / "configs"


@pytest.mark.parametrize("module,args,expect", [
    ("continual", ["--help"], ["--methods", "--scenarios", "--model.slow_levels", "--data.scenario"]),
    ("char_lm", ["fit", "--help"], ["--model.arch", "--model.optimizer", "--data.genre"]),
    ("nest_existing", ["--help"], ["--pretrain_steps", "--trainer.callbacks"]),
])
def test_help(module, args, expect, capsys):
    import importlib

    main = importlib.import_module(f"lightning_examples.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in expect:
        assert flag in out, f"{module} --help does not mention {flag}"


def test_continual_tiny_config(tmp_path, monkeypatch, capsys):
    from lightning_examples.continual import main

    monkeypatch.chdir(tmp_path)
    results = main(["--config", str(CONFIGS / "continual_tiny.yaml"), "--png", "acc.png"])
    assert set(results) == {(s, m) for s in ("permuted", "split")
                            for m in ("adamw", "adamw+multitimescale", "deepopt", "adamw+recipe")}
    for matrix in results.values():
        assert len(matrix) == 2 and all(len(row) == 2 and all(0 <= a <= 1 for a in row) for row in matrix)
    (run,) = (tmp_path / "runs").iterdir()  # a relative --png goes to the run folder
    assert [p.name for p in tmp_path.iterdir()] == ["runs"] and run.name.startswith("continual-")
    assert (run / "acc.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "after \\ on | task 1 | task 2" in out and "final avg acc" in out


def test_continual_recipe_method_attaches_the_callback_and_consolidates_per_task(tmp_path, monkeypatch):
    """``adamw+recipe``: AdamW with ``ContinualRecipe`` over ``net`` (the optimizer's lr, a task per
    ``epochs_per_task`` epochs); ``--model.recipe`` knobs reach the callback; unknown knobs are refused."""
    import lightning_examples.continual as ex
    from deepopt.lightning import ContinualRecipe

    seen = []
    original = ex.ContinualClassifier.configure_callbacks

    def spy(self):
        callbacks = original(self)
        seen.extend(cb for cb in callbacks if isinstance(cb, ContinualRecipe))
        return callbacks

    monkeypatch.setattr(ex.ContinualClassifier, "configure_callbacks", spy)
    monkeypatch.chdir(tmp_path)
    results = ex.main(["--config", str(CONFIGS / "continual_tiny.yaml"), "--methods", "[adamw+recipe]",
                       "--scenarios", "[split]", "--data.num_tasks", "3", "--model.recipe", "{strength: 0.5, distill: 0.2}"])
    assert list(results) == [("split", "adamw+recipe")] and len(results[("split", "adamw+recipe")]) == 3
    (cb,) = seen
    assert cb.consolidations == 3 and cb.epochs_per_task == 1 and cb.module == "net"
    assert cb.knobs["strength"] == 0.5 and cb.knobs["distill"] == 0.2
    assert cb.engine.lr == pytest.approx(1e-3)  # the optimizer's (model.lr's default)
    with pytest.raises(ValueError, match="recipe knobs"):
        ex.ContinualClassifier(method="adamw+recipe", recipe={"strenght": 1.0})


def test_char_lm_tiny_config_hope_with_deepopt_optimizer(tmp_path, monkeypatch, capsys):
    from lightning_examples.char_lm import main

    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(CONFIGS / "char_lm_tiny.yaml"), "--trainer.logger", "true"])
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]  # nothing in the current directory
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("char_lm-") and {"config.yaml", "metrics.csv", "hparams.yaml"} <= {
        p.name for p in run.iterdir()}
    assert capsys.readouterr().out.rstrip().endswith(f"results written to runs/{run.name}")
    assert cli.trainer.global_step == 4
    assert type(cli.trainer.optimizers[0]).__name__ == "M3"
    mts = next(cb for cb in cli.trainer.callbacks if isinstance(cb, MultiTimescale))
    assert mts.steps == [4] and 2 in mts.periods.values()
    monitor = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LevelMonitor))
    assert monitor.periods == mts.periods


def test_nest_existing_tiny_config_preserves_function_then_trains(tmp_path, monkeypatch, capsys):
    from lightning_examples.nest_existing import main

    monkeypatch.chdir(tmp_path)
    result = main(["--config", str(CONFIGS / "nest_existing_tiny.yaml"), "--trainer.logger", "true"])
    (run,) = (tmp_path / "runs").iterdir()
    assert [p.name for p in tmp_path.iterdir()] == ["runs"] and (run / "metrics.csv").exists()
    assert result["nested"] == pytest.approx(result["pretrained"], abs=1e-4)
    assert result["continued"] != result["nested"]
    out = capsys.readouterr().out
    assert "C = 2" in out and "C = 1" in out


def test_run_dir_docstring_examples():
    import doctest

    from lightning_examples import run_dir

    failures, attempted = doctest.testmod(run_dir)
    assert attempted > 0 and failures == 0
