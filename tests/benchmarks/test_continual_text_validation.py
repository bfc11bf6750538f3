"""benchmarks.continual_text_validation: the smoke path runs every kind of setting, the validation
sequence is another genre order than the test's, the table reads the results it is given."""

from __future__ import annotations

import json

import pytest

from benchmarks import continual_text_validation as ctv
from benchmarks.continual_tasks import ShakespeareGenres
from deepopt.continual import DEFAULTS


def test_parse_setting():
    assert ctv.parse_setting("finetune") == ("finetune", {})
    assert ctv.parse_setting("recipe:damping=1,importance=path") == ("recipe", {"damping": 1.0, "importance": "path"})
    with pytest.raises(ValueError):
        ctv.parse_setting("ewc:lam=3")
    with pytest.raises(ValueError):
        ctv.parse_setting("adam")
    assert ctv.parse_setting("si") == ("si", {"c": 0.1}) and ctv.parse_setting("si:c=10") == ("si", {"c": 10.0})
    assert ctv.parse_setting("lwf:alpha=0.25") == ("lwf", {"alpha": 0.25})
    with pytest.raises(ValueError, match="takes only alpha"):
        ctv.parse_setting("lwf:c=1")


def test_baselines_run_on_the_text_sequence_with_their_knob():
    rows = ctv.validate(["si:c=1000", "lwf:alpha=4"], seeds=[100], sizes=ctv.SMOKE, log=None)["rows"]
    assert [r["setting"] for r in rows] == ["si:c=1000", "lwf:alpha=4"]
    assert all(len(r["runs"][0]["matrix"]) == 3 for r in rows)


def test_validation_order_differs_from_the_test_order():
    assert tuple(ctv.GENRES) != ShakespeareGenres.genres and sorted(ctv.GENRES) == sorted(ShakespeareGenres.genres)
    assert not set(ctv.VAL_SEEDS) & {0, 1, 2}  # the GPU test's seeds


def test_smoke_cli_writes_json_and_table(tmp_path):
    out = tmp_path / "ctv"
    result = ctv.main(["--smoke", "--settings", "finetune", "recipe", "recipe:damping=0,distill=0",
                       "--seeds", "100", "--size", "eval_windows=3", "--out", str(out)])
    rows = {r["setting"]: r for r in result["rows"]}
    assert rows["recipe"]["runs"][0]["recipe_knobs"]["damping"] == 3.0
    knobs = rows["recipe:damping=0,distill=0"]["runs"][0]["recipe_knobs"]
    assert knobs["damping"] == 0.0 and knobs["distill"] == 0.0 and knobs["strength"] == DEFAULTS["strength"]
    assert rows["finetune"]["runs"][0]["recipe_knobs"] is None
    for r in result["rows"]:
        assert len(r["runs"][0]["matrix"]) == 3 and r["learning_bpc"]["mean"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["genres"] == list(ctv.GENRES) and saved["sizes"]["eval_windows"] == 3
    table = (out / "results.md").read_text()
    assert "| recipe (= defaults) |" in table and "| recipe:damping=0,distill=0 |" in table


def test_genres_argument_orders_the_tasks():
    seq = ShakespeareGenres(2, context=8, batch=2, eval_windows=2, text="raw", max_chars=5_000,
                            genres=["tragedies", "comedies"])
    assert seq.genres == ("tragedies", "comedies") and seq.n_tasks == 2 and ShakespeareGenres.genres[0] == "comedies"
    with pytest.raises(ValueError):
        ShakespeareGenres(2, text="raw", max_chars=5_000, genres=["poems"])


def test_mnist1d_validation_twin_builds_differs_and_runs():
    import functools

    import torch

    from benchmarks.continual_sequences import SEQUENCES, VAL_MNIST1D_SEQUENCES, VALIDATION_SEQUENCES, mnist1d_available

    if not mnist1d_available():
        pytest.skip("mnist1d not installed")
    assert "val_permuted_mnist1d" not in VALIDATION_SEQUENCES  # the selection grids stay on the digits
    val, test = SEQUENCES["val_permuted_mnist1d"](steps=3), SEQUENCES["permuted_mnist1d"](steps=3)
    assert val.n_tasks == test.n_tasks == 4 and torch.equal(val.perms[0], torch.arange(40))
    assert all(not torch.equal(val.perms[j], test.perms[j]) for j in range(1, 4))
    assert torch.equal(val.y_te, test.y_te) and not torch.equal(val.x_te[1], test.x_te[1])
    assert torch.equal(val.x_tr[1], val.x_tr[0][:, val.perms[1]])
    seqs = {"val_permuted_mnist1d": functools.partial(VAL_MNIST1D_SEQUENCES["val_permuted_mnist1d"], steps=3)}
    rows = ctv.digits_check(["finetune", "si", "recipe:strength=0.1,damping=3,share=30"], seeds=[100], log=None,
                            sequences=seqs)
    for r in rows:
        v = r["per_sequence"]["val_permuted_mnist1d"]
        assert not v["errors"] and 0.0 <= v["average"]["mean"] <= 1.0
    assert rows[1]["method"] == "SI" and rows[2]["knobs"]["share"] == 30.0
    assert "permuted MNIST-1D" in ctv.digits_markdown(rows, "cmd", [100], "the permuted MNIST-1D validation sequence")
    with pytest.raises(ValueError):
        ctv.digits_check(["finetune"], seeds=[100], log=None, sequences={"permuted_mnist1d": SEQUENCES["permuted_mnist1d"]})
    assert rows[1]["knobs"] == {"c": 0.1}  # SI at the digits choice
