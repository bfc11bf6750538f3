"""The lm suite's compile="graphed" (each training step replayed as a CUDA graph by
nl_layers.graphed_step) and "graphed_loss" (forward and backward replayed by nl_layers.graphed_loss,
any optimizer): on a CPU both are the eager step, so the runs equal compile="none" bit for bit,
the CMS periods included (HOPE's 1/4/16 levels across step 16); "graphed" refuses other optimizers."""

import pytest

from benchmarks.experiments.lm_training import SIZES, train


@pytest.mark.parametrize("model, mode, optimizer", [("hope", "graphed", "AdamW"), ("transformer", "graphed", "AdamW"),
                                                     ("hope", "graphed_loss", "M3")])
def test_graphed_run_equals_the_eager_run(model, mode, optimizer):
    cfg = dict(SIZES["tiny"], model=model, steps=17, eval_every=4, val_windows=2)
    eager = train(dict(cfg, compile="none"), optimizer, 3e-3, 0, "cpu")
    graphed = train(dict(cfg, compile=mode), optimizer, 3e-3, 0, "cpu")
    assert graphed["compile"] == mode and graphed["steps_done"] == 17
    assert graphed["val_loss"] == eager["val_loss"] and graphed["train_loss"] == eager["train_loss"]


def test_graphed_refuses_other_optimizers():
    cfg = dict(SIZES["tiny"], model="transformer", steps=2, eval_every=2, val_windows=2, compile="graphed")
    with pytest.raises(ValueError, match="AdamW only"):
        train(cfg, "SGD", 0.1, 0, "cpu")


@pytest.mark.gpu
def test_graphed_run_follows_the_eager_run_on_cuda():
    """On CUDA the replayed runs track the eager ones step for step (the same losses up to float32
    rounding): the graphed step (AdamW capturable, a tensor rate) against fused AdamW with a float
    rate, and graphed forward and backward with M3 against the eager M3 loop."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cfg = dict(SIZES["tiny"], model="hope", steps=17, eval_every=4, val_windows=2)
    for mode, optimizer in (("graphed", "AdamW"), ("graphed_loss", "M3")):
        eager = train(dict(cfg, compile="none"), optimizer, 3e-3, 0, "cuda")
        graphed = train(dict(cfg, compile=mode), optimizer, 3e-3, 0, "cuda")
        assert graphed["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4), mode
        assert graphed["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4), mode
