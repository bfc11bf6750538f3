"""benchmarks.layers.lm_graphed's three steps on a CPU (both graphed modes are then their eager
fallbacks): each trains its own copy, with slow levels stepped by PeriodicGradients / periods."""

import torch

import nl_layers
from benchmarks.layers import lm_graphed


def test_each_mode_steps_its_own_model_on_cpu():
    build = lambda: nl_layers.HopeLM(16, 16, 1, heads=2, cms_periods=(1, 2))  # noqa: E731
    modes = lm_graphed.steps(build, 16, 2, 8, device="cpu")
    assert list(modes) == list(lm_graphed.MODES)
    models = [modes[m].model for m in lm_graphed.MODES]
    assert len({id(m) for m in models}) == 3
    start = [p.detach().clone() for p in models[0].parameters()]
    for m in models[1:]:  # the same initial weights
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), start))
    for m in lm_graphed.MODES:
        for _ in range(2):
            modes[m]()
    for m in models:
        assert all(torch.isfinite(p).all() for p in m.parameters())
        assert any(not torch.equal(p, q) for p, q in zip(m.parameters(), start))
