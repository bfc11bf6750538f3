"""benchmarks.continual_recipe: every method runs the protocol, the baselines do what they claim,
the target check and the table read the results they are given."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from benchmarks import continual_recipe as cr
from benchmarks.continual_sequences import SEQUENCES, class_groups


@pytest.mark.parametrize("name", ["benchmarks.continual_recipe", "benchmarks.continual_sequences"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("method", list(cr.METHODS))
def test_every_method_runs_a_short_sequence(method):
    seq = SEQUENCES["val_split_digits"](n_tasks=3, steps=4)
    out = cr.run(seq, method, cr.GRIDS[method][0], seed=0)
    assert out["error"] is None
    assert len(out["matrix"]) == 3 and all(0.0 <= v <= 1.0 for row in out["matrix"] for v in row)


def test_validation_sequences_differ_from_the_test_sequences():
    val, test = SEQUENCES["val_permuted_digits"](), SEQUENCES["permuted_digits"]()
    assert not torch.equal(val.perms[1], test.perms[1])
    assert not torch.equal(val.x_tr[1], test.x_tr[1]) and not torch.equal(val.x_te[1], test.x_te[1])
    assert torch.equal(val.x_tr[1], val.x_tr[0][:, val.perms[1]])  # the data follow the permutations
    assert [c.tolist() for c in SEQUENCES["val_split_digits"]().classes] != \
        [c.tolist() for c in SEQUENCES["split_digits"]().classes]
    assert [g.tolist() for g in class_groups(test, 1)] == [list(range(10))] and class_groups(test, 0) == []


def test_penalties_start_after_the_first_task_and_pull_back():
    seq = SEQUENCES["val_split_digits"](n_tasks=2, steps=2)
    for method, knobs in (("EWC", {"lam": 100.0}), ("SI", {"c": 1.0}), ("LwF", {"alpha": 1.0}), ("replay", {})):
        model = seq.model(0)
        learner = cr.METHODS[method](model, seq, torch.Generator().manual_seed(0), **knobs)
        x, y = seq.sample(0, learner.gen, 8)
        assert learner.extra(0, x, y) is None
        learner.train_step(0)
        learner.end_task(0)
        if method != "replay":
            assert abs(float(learner.extra(1, x, y))) < 1e-6  # at the anchor / the old model
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1)
        assert float(learner.extra(1, x, y)) > 0.0


def _summary(avg, bwt):
    s = {"mean": 0.0, "std": 0.0}
    return {"knobs": {}, "average": {**s, "mean": avg}, "bwt": {**s, "mean": bwt}, "fwt": s,
            "learning_accuracy": s, "forgetting": s}


def test_targets_and_markdown_read_the_numbers():
    test = {"seq": {"finetune": _summary(0.5, -0.4), "EWC": _summary(0.6, -0.2), "SI": _summary(0.7, -0.1),
                    "recipe": _summary(0.65, -0.2)}}
    t = cr.targets(test)["seq"]
    assert t["bwt_ratio_to_finetune"] == 0.5 and t["half_forgetting"] and t["average_at_least_finetune"]
    assert t["average_above_EWC"] and not t["average_above_SI"]
    md = cr.markdown({"test_seeds": [0, 1], "command": "cmd", "test": test, "targets": {"seq": t}})
    assert "| recipe | {} | 0.650 +- 0.000 | -0.200 +- 0.000" in md and "avg > SI: False" in md


def test_every_grid_point_runs():
    """Each knob setting of the selection grids is valid for its method (3 steps per task, one seed)."""
    for method, grid in cr.GRIDS.items():
        for knobs in grid:
            out = cr.run(SEQUENCES["val_split_digits"](n_tasks=2, steps=2), method, knobs, seed=0)
            assert out["error"] is None, (method, knobs, out["error"])


def test_the_defaults_are_the_committed_choices_and_every_grid_point_names_damping_and_share():
    """``Recipe`` without arguments is the protocol's committed choice (results.json) with the second
    validation round's winner (strength / damping / share, val17_selection.json) over it; the grid's
    points all pass ``damping`` and ``share`` (so changing a default cannot change an earlier round's
    point)."""
    import json
    from pathlib import Path

    from deepopt.continual import DEFAULTS

    results = Path(cr.__file__).parent / "results"
    chosen = json.loads((results / "continual_recipe" / "results.json").read_text())["chosen"]["recipe"]
    winner = json.loads((results / "continual_text_validation" / "val17_selection.json").read_text())["winner"]
    strength, damping, share = (float(v) for v in winner.split(" / "))
    expected = {**chosen, "strength": strength, "damping": damping, "share": share}
    assert {k: DEFAULTS[k] for k in expected} == expected
    assert cr.CHECK_SETTINGS[0] == ("recipe", {**chosen, "share": 0.0})
    assert all("damping" in knobs and "share" in knobs for knobs in cr.GRIDS["recipe"])


def test_validation_check_runs_only_validation_sequences():
    rows = cr.validation_check([0], settings=cr.CHECK_SETTINGS[:2], log=lambda s: None, sizes={"steps": 2})
    assert [r["knobs"] for r in rows] == [k for _, k in cr.CHECK_SETTINGS[:2]]
    for r in rows:
        assert set(r["per_sequence"]) == set(cr.VALIDATION_SEQUENCES)
        for name, v in r["per_sequence"].items():
            assert len(v["average_per_seed"]) == 1 and v["average"]["mean"] == v["average_per_seed"][0]
            assert v["consolidations_per_seed"] == [cr.VALIDATION_SEQUENCES[name]().n_tasks]  # told: one per task


def test_test_only_takes_the_committed_knobs_and_the_given_recipe(tmp_path):
    """--test-only: no selection; the baselines' knobs from a results.json, the recipe's as given
    (or DEFAULTS), the test sequences only, into test_only.json."""
    import json

    committed = tmp_path / "results.json"
    committed.write_text(json.dumps({"chosen": {"finetune": {}, "EWC": {"lam": 100.0}, "SI": {"c": 0.1}, "LwF": {"alpha": 1.0}}}))
    out = tmp_path / "out"
    result = cr.main(["--test-only", str(committed), "--smoke", "--methods", "finetune", "EWC", "SI", "recipe",
                      "--recipe", '{"strength": 0.1, "share": 30.0}', "--out", str(out)])
    assert result["chosen"] == {"finetune": {}, "EWC": {"lam": 100.0}, "SI": {"c": 0.1}, "recipe": {"strength": 0.1, "share": 30.0}}
    assert set(result["test"]) == set(cr.TEST_SEQUENCES) and set(result["targets"]) == set(cr.TEST_SEQUENCES)
    saved = json.loads((out / "test_only.json").read_text())
    assert saved["chosen"]["recipe"]["share"] == 30.0 and "no selection" in (out / "test_only.md").read_text()
    defaults = cr.main(["--test-only", str(committed), "--smoke", "--methods", "recipe", "--out", str(out)])
    assert defaults["chosen"]["recipe"] == dict(cr.deepopt.continual.DEFAULTS)
