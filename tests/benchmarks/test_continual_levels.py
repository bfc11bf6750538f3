"""The continual_levels suite: full matrices, the time cap, periods really applied, jobs, report."""

import json
import math

import pytest
import torch

from benchmarks.experiments import continual_levels as continual
from benchmarks.pool import run_one

from ..example_imports import run_examples


def tiny(sequence: str, method: str = "finetune", seed: int = 0, **over) -> dict:
    job = next(j for j in continual.jobs("tiny", [seed], methods=[method], sequences=[sequence]))
    return {**job.params, **over}


@pytest.mark.parametrize("sequence", continual.SEQUENCES)
def test_run_gives_full_finite_matrix(sequence):
    res = continual.run(tiny(sequence), "cpu")
    n = res["n_tasks"]
    assert n >= 3 and len(res["matrix"]) == n and all(len(row) == n for row in res["matrix"])
    assert all(math.isfinite(v) for row in res["matrix"] for v in row)
    assert not res["cut_short"] and res["steps"] == res["steps_planned"]
    for key in ("average_final", "bwt", "fwt"):
        assert math.isfinite(res[key])
    assert res["average_final"] == pytest.approx(sum(res["matrix"][-1]) / n)
    json.dumps(res)  # JSON-able


@pytest.mark.parametrize("method", ["multitimescale", "nested_cms", "ewc", "si", "lwf", "replay", "recipe"])
def test_every_method_runs(method):
    res = continual.run(tiny("permuted_digits", method, steps_per_task=3), "cpu")
    assert len(res["matrix"]) == res["n_tasks"] and math.isfinite(res["bwt"])
    assert bool(res["level_spec"]) == (method in ("multitimescale", "nested_cms"))


def test_max_seconds_cuts_the_run_short():
    res = continual.run(tiny("permuted_digits", steps_per_task=10_000, max_seconds=0.5), "cpu")
    assert res["cut_short"]
    assert 0 < res["steps"] < res["steps_planned"]
    assert len(res["matrix"]) == 1 and res["average_final"] is None and res["bwt"] is None
    assert res["seconds"] < 5.0


@pytest.mark.parametrize("method,name,period", [
    ("multitimescale", "blocks.1.mlp.0.weight", 4),
    ("multitimescale", "blocks.2.mlp.2.weight", 16),
    ("nested_cms", "blocks.0.mlp.blocks.1.fc2.weight", 4),
    ("nested_cms", "blocks.1.mlp.blocks.0.0.weight", 1),
])
def test_periods_are_applied(method, name, period):
    params = tiny("permuted_digits", method)
    seq, model, opt, periodic, spec = continual.build(params, "cpu")
    assert periodic.periods[name] == period
    param = dict(model.named_parameters())[name]
    gen = torch.Generator().manual_seed(0)
    changed = []
    for t in range(1, 17):
        before = param.detach().clone()
        continual.train_step(seq, model, opt, periodic, 0, gen, params)
        if not torch.equal(before, param.detach()):
            changed.append(t)
    assert changed == [t for t in range(1, 17) if t % period == 0]


def test_recipe_is_finetune_until_its_first_consolidation():
    """Same seed, same data: before the first end_task the recipe is its AdamW alone (no slow level
    to pull toward or distil from), so the first row of R equals finetune's exactly; after it, the
    slow level acts and the rows differ."""
    ft = continual.run(tiny("permuted_digits", "finetune", steps_per_task=6), "cpu")
    rc = continual.run(tiny("permuted_digits", "recipe", steps_per_task=6), "cpu")
    assert rc["matrix"][0] == ft["matrix"][0]
    assert rc["matrix"][1:] != ft["matrix"][1:]
    from deepopt.continual import DEFAULTS

    assert rc["recipe_knobs"] == DEFAULTS and ft["recipe_knobs"] is None
    seq, model, recipe, periodic, spec = continual.build(tiny("permuted_digits", "recipe"), "cpu")
    assert type(recipe).__name__ == "Recipe" and periodic is None and spec == {}
    assert type(recipe.optimizer) is torch.optim.AdamW and recipe.optimizer.param_groups[0]["weight_decay"] == 0.01


def test_finetune_has_no_levels():
    seq, model, opt, periodic, spec = continual.build(tiny("permuted_digits"), "cpu")
    assert periodic is None and spec == {}
    assert continual.depth_periods(4, [1, 4, 16]) == {"blocks.2.mlp.*": 4, "blocks.3.mlp.*": 16}


def test_jobs_names_overrides_and_gpu_budget():
    js = continual.jobs("tiny", None)
    assert len({j.name for j in js}) == len(js) == len(continual.SEQUENCES) * len(continual.METHODS)
    assert all(j.experiment == "continual" for j in js)
    two = continual.jobs("tiny", [0, 1], methods=["ewc"], steps_per_task=5, **{"permuted_digits.n_tasks": 4})
    assert {j.params["seed"] for j in two} == {0, 1}
    assert all(j.params["steps_per_task"] == 5 for j in two)
    assert {j.params["sequence"]: j.params.get("n_tasks") for j in two}["permuted_digits"] == 4
    gpu = continual.jobs("gpu", None)
    assert len(gpu) == 48 and all(j.params["max_seconds"] <= 240 for j in gpu)
    assert 300 < sum(j.cost for j in gpu) < 1500  # about 24 GPU-minutes by est_step_s
    # the recipe's jobs are the costliest of each sequence (distillation: one more forward and backward)
    for seq in continual.SEQUENCES:
        costs = {j.params["method"]: j.cost for j in gpu if j.params["sequence"] == seq and j.params["seed"] == 0}
        assert max(costs, key=costs.get) == "recipe"
    ten = continual.jobs("gpu10x", None)  # the genres 5x longer, the digits as in gpu
    steps = {j.params["sequence"]: j.params["steps_per_task"] for j in ten}
    assert len(ten) == 48 and steps == {"shakespeare_genres": 2000, "permuted_digits": 500}
    text = lambda js: sum(j.cost for j in js if j.params["sequence"] == "shakespeare_genres")  # noqa: E731
    assert text(ten) == pytest.approx(5 * text(gpu), rel=0.05)
    with pytest.raises(ValueError, match="methods"):
        continual.jobs("tiny", None, methods=["sgd"])
    with pytest.raises(ValueError, match="preset"):
        continual.jobs("huge", None)


def test_report_writes_files(tmp_path):
    records = []
    for seed in (0, 1):
        for method in ("finetune", "multitimescale"):
            job = next(iter(continual.jobs("tiny", [seed], methods=[method], sequences=["permuted_digits"],
                                           steps_per_task=3)))
            records.append(run_one(job, "cpu"))
    bad = next(iter(continual.jobs("tiny", [0], methods=["ewc"], sequences=["permuted_digits"], lr="oops")))
    records.append(run_one(bad, "cpu"))
    assert "error" in records[-1]
    continual.report(records, tmp_path, {"command": "python -m benchmarks run --suite continual_levels ...", "record_files": []})
    md = (tmp_path / "results.md").read_text()
    assert "| finetune |" in md and "| multitimescale |" in md and "BWT" in md
    assert "## Errors" in md and "ewc/seed0" in md
    data = json.loads((tmp_path / "results.json").read_text())
    fin = data["summary"]["permuted_digits"]["methods"]["finetune"]
    assert fin["average_final"]["n"] == 2 and len(fin["matrix_mean"]) == 3
    assert (tmp_path / "permuted_digits_task0.png").stat().st_size > 1000


def test_docstring_examples():
    import doctest

    failures, attempted = run_examples(continual, optionflags=doctest.ELLIPSIS)
    assert attempted > 0 and failures == 0


def test_report_compares_the_recipe_with_ewc_and_names_it_only_when_present(tmp_path):
    records = [run_one(job, "cpu") for seed in (0, 1) for job in continual.jobs(
        "tiny", [seed], methods=["finetune", "ewc", "recipe"], sequences=["permuted_digits"], steps_per_task=3)]
    continual.report(records, tmp_path / "with", {"command": "c", "record_files": []})
    md = (tmp_path / "with" / "results.md").read_text()
    assert md.startswith("# Continual learning: fine-tuning vs multi-timescale levels vs nested CMS vs EWC vs the recipe")
    assert "| recipe |" in md and "- permuted_digits / recipe vs ewc: final average " in md
    continual.report([r for r in records if r["job"]["params"]["method"] != "recipe"], tmp_path / "without",
                     {"command": "c", "record_files": []})
    md = (tmp_path / "without" / "results.md").read_text()
    assert "recipe" not in md


@pytest.mark.parametrize("sequence", continual.SEQUENCES)
@pytest.mark.parametrize("method,knob", [("si", "si_c"), ("lwf", "lwf_alpha")])
def test_penalty_learners_train_with_the_jobs_adamw_and_batch(sequence, method, knob):
    params = tiny(sequence, method, **{knob: 3.0})
    seq, model, opt, _, _ = continual.build(params, "cpu")
    learner = continual.learner(params, seq, model, opt, torch.Generator().manual_seed(0))
    assert learner.opt is opt and learner.batch == seq.batch
    assert (learner.c if method == "si" else learner.alpha) == 3.0
    assert continual.learner(tiny(sequence), seq, model, opt, torch.Generator()) is None
    learner.train_step(0)
    learner.end_task(0)
    x, y = seq.sample(1, learner.gen, 2)
    assert abs(float(learner.extra(1, x, y))) < 1e-6  # at the anchor / the frozen model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    assert float(learner.extra(1, x, y)) > 0.0  # pulled back after moving away


def test_lwf_on_text_compares_every_token_over_the_vocabulary():
    from benchmarks import continual_recipe as cr
    from benchmarks.continual_sequences import class_groups

    params = tiny("shakespeare_genres", "lwf")
    seq, model, opt, _, _ = continual.build(params, "cpu")
    assert class_groups(seq, 0) == [] and class_groups(seq, 1) == [slice(None)]
    learner = continual.learner(params, seq, model, opt, torch.Generator().manual_seed(0))
    learner.end_task(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = seq.sample(1, learner.gen, 2)
    t, s = learner.old(x) / cr.LWF_T, model(x) / cr.LWF_T  # (batch, context, vocab)
    kl = (t.log_softmax(-1).exp() * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()  # per token
    assert float(learner.extra(1, x, y)) == pytest.approx(params["lwf_alpha"] * cr.LWF_T**2 * float(kl), rel=1e-4)


@pytest.mark.parametrize("sequence", continual.SEQUENCES)
@pytest.mark.parametrize("method", ["finetune", "nested_cms", "ewc", "replay", "recipe"])
def test_graphed_loss_mode_is_the_eager_run_on_cpu(sequence, method):
    """On the CPU the graphed loss is the eager one, and its capture batch comes from a generator of
    its own: the same draws, the same run bit for bit (the mode is recorded as "none" there)."""
    eager = continual.run(tiny(sequence, method, steps_per_task=3), "cpu")
    graphed = continual.run(tiny(sequence, method, steps_per_task=3, compile="graphed_loss"), "cpu")
    assert graphed["matrix"] == eager["matrix"] and graphed["curve_task0"] == eager["curve_task0"]
    assert graphed["compile"] == eager["compile"] == "none"


def test_compile_mode_is_checked_and_gpu10x_graphs_its_losses():
    with pytest.raises(ValueError, match="compile must be one of"):
        continual.run(tiny("permuted_digits", compile="graphed"), "cpu")
    assert {j.params["compile"] for j in continual.jobs("gpu10x", None)} == {"graphed_loss"}
    assert "compile" not in continual.jobs("gpu", None)[0].params


@pytest.mark.gpu
@pytest.mark.parametrize("sequence", continual.SEQUENCES)
@pytest.mark.parametrize("method", ["ewc", "nested_cms", "replay"])
def test_graphed_loss_run_follows_the_eager_run_on_cuda(sequence, method):
    """On CUDA the replayed losses track the eager ones (float32 rounding apart) through every task:
    an EWC penalty and its consolidation, nested CMS levels with held slow gradients, a replay loss."""
    over = dict(steps_per_task=6)
    eager = continual.run(tiny(sequence, method, **over), "cuda")
    graphed = continual.run(tiny(sequence, method, compile="graphed_loss", **over), "cuda")
    assert graphed["compile"] == "graphed_loss" and eager["compile"] == "none"
    torch.testing.assert_close(torch.tensor(graphed["matrix"]), torch.tensor(eager["matrix"]), rtol=2e-3, atol=2e-3)
