"""benchmarks.layers.lm_compile: the eager-vs-compiled LM step runs end to end (CPU smoke)."""

import json

from benchmarks.layers import lm_compile


def test_smoke_run_writes_every_model_with_times(tmp_path):
    lm_compile.main(["--device", "cpu", "--backend", "eager", "--dim", "16", "--depth", "1", "--batch", "2",
                     "--seq", "8", "--models", "TransformerLM", "TitansLM", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "lm_compile.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["TransformerLM", "TransformerLM [blocks]", "TitansLM", "TitansLM [blocks]"]
    for r in rows:
        assert "error" not in r, r
        assert r["eager_ms"] > 0 and r["compiled_ms"] > 0 and r["compile_s"] > 0
    assert "| TitansLM |" in (tmp_path / "lm_compile.md").read_text()


def test_value_checks_are_restored(tmp_path):
    import nl_layers

    assert nl_layers.value_checks_enabled()
    lm_compile.main(["--device", "cpu", "--backend", "eager", "--dim", "16", "--depth", "1", "--batch", "2",
                     "--seq", "8", "--models", "TransformerLM", "--modes", "full", "--out", str(tmp_path)])
    assert nl_layers.value_checks_enabled()


def test_compiled_model_runs_its_loss_through_dynamo():
    import torch
    from torch._dynamo.testing import CompileCounter

    import nl_layers

    counter = CompileCounter()
    model = lm_compile.compiled_model(nl_layers.TransformerLM(16, 8, 1, heads=2), counter)
    with nl_layers.value_checks(False):
        model.loss(torch.randint(0, 16, (2, 6)))
    assert counter.frame_count == 1


def test_blocks_mode_compiles_the_blocks_not_the_model():
    import torch
    from torch._dynamo.testing import CompileCounter

    import nl_layers

    counter = CompileCounter()
    model = lm_compile.compiled_model(nl_layers.TitansLM(16, 8, 2, heads=2, chunk_size=4), counter, mode="blocks")
    assert model._compiled_call_impl is None and all(b._compiled_call_impl is not None for b in model.blocks)
    with nl_layers.value_checks(False):
        model.loss(torch.randint(0, 16, (2, 6)))
    assert counter.frame_count == 1  # one graph for both blocks
