"""Properties every layer shares: bfloat16 runs close to float32; a state from another batch is rejected."""

import copy

import pytest
import torch

import nl_layers

LAYERS = {
    "linear": lambda: nl_layers.LinearMemory(32, heads=4, chunk_size=16),
    "neural": lambda: nl_layers.NeuralMemory(32, heads=4, chunk_size=16),
    "attention": lambda: nl_layers.AttentionMemory(32, heads=4),
    "self_modifying": lambda: nl_layers.SelfModifyingTitans(32, heads=4, chunk_size=16),
    "hope": lambda: nl_layers.HopeBlock(32, heads=4, cms_periods=(1, 4)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_bfloat16_close_to_float32(name):
    layer = LAYERS[name]()
    x = torch.randn(2, 40, 32)
    ref = layer(x)[0]
    low = copy.deepcopy(layer).to(torch.bfloat16)
    xb = x.to(torch.bfloat16).requires_grad_()
    y = low(xb)[0]
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert xb.grad is not None and torch.isfinite(xb.grad.float()).all()
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.02


@pytest.mark.parametrize(
    "build",
    [
        lambda: nl_layers.LinearMemory(16, heads=2),
        lambda: nl_layers.NeuralMemory(16, heads=2),
        lambda: nl_layers.AttentionMemory(16, heads=2),
        lambda: nl_layers.SelfModifyingTitans(16, heads=2),
        lambda: nl_layers.HopeBlock(16, heads=2, cms_periods=(1,), cms_in_context=(4,)),
    ],
    ids=["linear", "neural", "attention", "self_modifying", "hope-in-context"],
)
def test_state_from_another_batch_size_is_rejected(build):
    layer = build()
    _, state = layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="batch size"):
        layer(torch.randn(3, 5, 16), state)
