"""The lm suite's gpu10x preset (issue 16): sizes, compile option, timing split, sweep extension."""

import json
import math

import pytest
import torch

import nl_layers
from benchmarks.experiments import lm, lm_training
from benchmarks.experiments.lm_training import MODELS, SIZES, build_model


def _record(model, lr, loss, seed=0, diverged=False, size=None, name=None):
    res = {"model": model, "lr": lr, "seed": seed, "final_val_loss": loss, "final_bpc": loss / math.log(2),
           "diverged": diverged, "size": size}
    return {"job": {"experiment": "lm", "name": name or f"lm/{lm.label(model, size)}/lr{lr:.3g}/s{seed}"}, "result": res}


def test_gpu10x_preset_is_ten_times_the_tokens_at_layer_defaults():
    cfg = lm.config("gpu10x")
    old = lm.config("gpu")
    assert cfg["steps"] == 10 * old["steps"] == 2000 and cfg["seeds"] == 3
    assert (cfg["dim"], cfg["depth"], cfg["batch"], cfg["seq_len"]) == (384, 6, 32, 256)
    assert cfg["chunk_size"] is None and cfg["max_lr"] is None and cfg["compile"] == "graphed"
    assert old.get("compile", "none") == "none" and old["chunk_size"] == 16  # the committed preset is unchanged
    # every model over all three rates in gpu10x; the old preset keeps its two-rate Titans/HOPE sweep
    names = [j.name for j in lm.jobs("gpu10x", None)]
    assert len(names) == 4 * 3 and "lm/hope/lr0.009/s0" in names
    assert "lm/hope/lr0.009/s0" not in [j.name for j in lm.jobs("gpu", None)]
    # the slowest model's jobs go first
    jobs = lm.jobs("gpu10x", None)
    assert max(jobs, key=lambda j: j.cost).params["model"] == "hope"


def test_fast_weight_models_get_their_layer_defaults(monkeypatch):
    seen = {}
    for cls in ("TitansLM", "HopeLM"):
        monkeypatch.setattr(nl_layers, cls, lambda *a, _c=cls, **kw: seen.setdefault(_c, kw))
    build_model(dict(SIZES["small"], model="titans"), 84)
    build_model(dict(SIZES["small"], model="hope"), 84)
    assert "chunk_size" not in seen["TitansLM"] and "max_lr" not in seen["TitansLM"]
    assert "chunk_size" not in seen["HopeLM"] and "max_lr" not in seen["HopeLM"]
    seen.clear()
    build_model(dict(SIZES["gpu"], model="titans"), 84)
    assert seen["TitansLM"]["chunk_size"] == 16 and seen["TitansLM"]["max_lr"] == 1e-3


@pytest.mark.parametrize("size, low, high", [("small", 9e6, 11e6), ("large", 40e6, 60e6)])
def test_size_parameter_counts(size, low, high):
    for model in MODELS:
        n = sum(p.numel() for p in build_model(dict(SIZES[size], model=model), 84).parameters())
        assert low <= n <= high, (size, model, n)


def test_size_large_override_names_and_sizes_the_jobs():
    jobs = lm.jobs("gpu10x", None, size="large", models=["transformer", "hope"])
    assert [j.name for j in jobs][:1] == ["lm/transformer@large/lr0.001/s0"]
    assert all(j.params["dim"] == 768 and j.params["depth"] == 8 and j.params["size"] == "large" for j in jobs)
    assert jobs[0].params["steps"] == 2000 and jobs[0].params["compile"] == "graphed"
    with pytest.raises(ValueError, match="size must be"):
        lm.config("gpu10x", size="huge")


def test_edge_rates_on_synthetic_records():
    recs = [_record("interior", lr, loss) for lr, loss in ((1e-3, 2.0), (3e-3, 1.5), (9e-3, 1.8))]
    recs += [_record("high", lr, loss) for lr, loss in ((1e-3, 2.0), (3e-3, 1.9), (9e-3, 1.7))]
    recs += [_record("low", lr, loss) for lr, loss in ((1e-3, 1.6), (3e-3, 1.9))]
    recs += [_record("low", 9e-3, math.inf, diverged=True)]
    recs += [_record("alldiv", lr, math.nan, diverged=True) for lr in (1e-3, 3e-3)]
    recs += [_record("single", 3e-3, 1.5)]
    recs += [_record("high", 1e-3, 0.1, seed=1)]  # other seeds do not count
    recs += [_record("hope", 3e-3, 1.0, size="large"), _record("hope", 9e-3, 1.2, size="large")]
    edges = lm.edge_rates(recs)
    assert "interior" not in edges
    assert edges["high"] == [pytest.approx(2.7e-2)]
    assert edges["low"] == [pytest.approx(1e-3 / 3)]
    assert edges["alldiv"] == [pytest.approx(1e-3 / 3)]  # every rate diverged: go lower only
    assert edges["single"] == [pytest.approx(1e-3), pytest.approx(9e-3)]
    assert edges["hope@large"] == [pytest.approx(1e-3)]
    # once the proposed rate has run and is worse, the best rate is interior
    recs.append(_record("high", 2.7e-2, 1.9))
    assert "high" not in lm.edge_rates(recs)


def test_phase_extend_makes_the_edge_jobs_then_none(tmp_path):
    path = tmp_path / "records.jsonl"
    recs = [_record("transformer", lr, loss) for lr, loss in ((1e-3, 2.0), (3e-3, 1.5), (9e-3, 1.8))]
    recs += [_record("titans", lr, loss) for lr, loss in ((1e-3, 2.0), (3e-3, 1.9), (9e-3, 1.7))]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    jobs = lm.jobs("gpu10x", None, phase="extend", sweep_records=str(path), models=["transformer", "titans"])
    assert [j.name for j in jobs] == ["lm/titans/lr0.027/s0"] and jobs[0].params["phase"] == "extend"
    with path.open("a") as fh:
        fh.write(json.dumps(_record("titans", 2.7e-2, 1.8)) + "\n")
    assert lm.jobs("gpu10x", None, phase="extend", sweep_records=str(path), models=["transformer", "titans"]) == []
    seeds = lm.jobs("gpu10x", None, phase="seeds", sweep_records=str(path), models=["titans"])
    assert [j.name for j in seeds] == [f"lm/titans/lr0.009/s{s}" for s in range(3)]
    with pytest.raises(ValueError, match="no finished run"):
        lm.jobs("gpu10x", None, phase="seeds", sweep_records=str(path), models=["titans"], size="large")


@pytest.mark.parametrize("mode", ["none", "blocks", "full"])
def test_train_compiles_and_times_after_two_steps(mode):
    cfg = dict(SIZES["tiny"], model="titans", steps=5, eval_every=2, val_windows=2, compile=mode,
               compile_backend="eager")
    torch._dynamo.reset()
    out = lm_training.train(cfg, "AdamW", 3e-3, 0, "cpu")
    assert out["compile"] == mode and out["steps_done"] == 5 and math.isfinite(out["final_bpc"])
    assert out["compile_seconds"] > 0 and out["ms_per_step"] > 0
    assert out["tokens_per_second"] == pytest.approx(out["tokens_per_step"] / out["ms_per_step"] * 1000)
    assert out["eval_steps"] == [0, 2, 4, 5]


def test_compile_mode_per_model_and_errors():
    assert lm_training.compile_mode({"model": "hope", "compile": {"hope": "full"}}) == "full"
    assert lm_training.compile_mode({"model": "transformer", "compile": {"hope": "full"}}) == "none"
    assert lm_training.compile_mode({"model": "hope"}) == "none"
    with pytest.raises(ValueError, match="compile must be"):
        lm_training.compile_mode({"model": "hope", "compile": "max"})


def test_step_time_table_and_job_seconds():
    cfg = lm.config("gpu10x")
    # compile choice documented in lm.py: for 2,000 steps "blocks" beats "full" and eager for both slow models
    for model in ("titans", "hope"):
        blocks = lm.job_seconds(model, dict(cfg, compile="blocks"))
        assert blocks < lm.job_seconds(model, dict(cfg, compile="full"))
        assert blocks < lm.job_seconds(model, dict(cfg, compile="none"))
        assert lm.job_seconds(model, dict(cfg, compile="graphed")) < blocks  # the preset's choice
    assert lm.job_seconds("titans", dict(cfg, compile="full")) == pytest.approx(43 + 2000 * 0.0215)
    assert lm.step_seconds("hope", dict(cfg, size="large")) == pytest.approx(3 * 0.0258)  # graphed
    assert lm.step_seconds("hope", dict(cfg, size="large", compile="blocks")) == pytest.approx(3 * 0.0407)


def test_full_compile_traces_the_training_step_once_and_evaluates_eager():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    cfg = dict(SIZES["tiny"], model="transformer", steps=4, eval_every=1, val_windows=3, compile="full",
               compile_backend=counter)
    torch._dynamo.reset()
    out = lm_training.train(cfg, "AdamW", 3e-3, 0, "cpu")
    assert out["steps_done"] == 4 and math.isfinite(out["final_bpc"])
    assert counter.frame_count == 1  # the training forward only: evaluation (another grad mode, shapes) stays eager


def test_lm_optimizers_gpu10x_graphs_the_loss_since_graphed_steps_replay_adamw_only():
    from benchmarks.experiments import lm_optimizers

    assert lm.config("gpu10x")["compile"] == "graphed"
    assert lm_optimizers.PRESETS["gpu10x"]["compile"] == "graphed_loss"  # graphed refuses others: test_lm_graphed_mode.py


def test_hope_ablations_have_the_same_weights_and_no_slow_levels():
    from benchmarks.experiments.lm_training import ABLATIONS

    for model in ABLATIONS:
        base = build_model(dict(SIZES["tiny"], model=model.removesuffix("_p1")), 84)
        flat = build_model(dict(SIZES["tiny"], model=model), 84)
        assert sum(p.numel() for p in flat.parameters()) == sum(p.numel() for p in base.parameters())
        assert set(flat.level_spec().values()) == {1} and set(base.level_spec().values()) == {1, 4, 16}
    assert [j.name for j in lm.jobs("gpu10x", None, models=["hope_p1"])][0] == "lm/hope_p1/lr0.001/s0"
