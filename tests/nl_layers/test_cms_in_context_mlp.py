"""The in-context CMS's closed-form chunk step for MLP blocks (cms_in_context_mlp) against the
generic torch.func path it replaces and the token-by-token reference: outputs, states and every
gradient, float64, each activation, with and without biases, every variant, awkward lengths."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nl_layers import CMS, MLPBlock
from nl_layers.cms_in_context_mlp import derivative

from .helpers import assert_grads_close, max_diff

FUNCTIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}
CHUNKS = {"sequential": (5, None, 8), "independent": (3, 7, None), "nested": (None, 8, 3)}


def _pair(variant: str, activation: str, bias: bool):
    """A CMS on the closed form and its twin on the generic path (the same function, given as a
    lambda the closed form does not know), with the same weights."""
    torch.manual_seed(0)
    fn = FUNCTIONS[activation]
    closed = [MLPBlock.build(6, 10, activation, bias=bias) for _ in range(3)]
    generic = [MLPBlock.build(6, 10, lambda z, f=fn: f(z), bias=bias) for _ in range(3)]
    for a, b in zip(closed, generic):
        for p in a.parameters():
            nn.init.normal_(p, std=0.3)
        b.load_state_dict(a.state_dict())
    make = lambda blocks: CMS(6, 10, periods=(1, 2, 4), variant=variant, in_context=CHUNKS[variant],  # noqa: E731
                              in_context_lr=0.3, blocks=blocks).double()
    return make(closed), make(generic)


@pytest.mark.parametrize("variant", list(CHUNKS))
@pytest.mark.parametrize("activation", list(FUNCTIONS))
@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_equals_the_generic_path_and_the_reference(variant, activation, bias):
    cms, twin = _pair(variant, activation, bias)
    assert derivative(cms.blocks[0]) is not None and derivative(twin.blocks[0]) is None
    x = torch.randn(2, 23, 6, dtype=torch.float64, requires_grad=True)
    y, s = cms(x, return_state=True)
    y_gen, s_gen = twin(x, return_state=True)
    y_ref = cms(x, mode="recurrent")
    assert max_diff(y, y_gen) < 1e-12 and max_diff(y, y_ref) < 1e-12
    for lv, lv_gen in zip(s.levels, s_gen.levels):
        assert lv.count == lv_gen.count
        for n in lv.weights:
            assert max_diff(lv.weights[n], lv_gen.weights[n]) < 1e-12
            assert max_diff(lv.grad_sum[n], lv_gen.grad_sum[n]) < 1e-12
    assert_grads_close(cms, x, y, y_gen, module_b=twin)
    assert_grads_close(cms, x, y, y_ref)


def test_streamed_closed_form_equals_the_generic_path():
    cms, twin = _pair("sequential", "silu", True)
    x = torch.randn(3, 30, 6, dtype=torch.float64)
    state = state_gen = None
    for piece in torch.split(x, [4, 9, 1, 16], dim=1):
        out, state = cms(piece, state, return_state=True)
        out_gen, state_gen = twin(piece, state_gen, return_state=True)
        assert max_diff(out, out_gen) < 1e-12


def test_which_blocks_take_the_closed_form():
    block = MLPBlock.build(4, 8, "gelu", dropout=0.1)
    assert derivative(block) is None  # active dropout: the generic path draws it
    assert derivative(block.eval()) is not None
    assert derivative(MLPBlock.build(4, 8, "relu")) is not None
    assert derivative(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))) is None

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert derivative(MLPBlock(Scaled(4, 8), nn.Linear(8, 4))) is None


def test_the_engine_takes_the_closed_form_for_its_own_blocks_only(monkeypatch):
    from nl_layers import cms_in_context_mlp as mlp

    calls = {"chunk": 0, "directional": 0}
    chunk, directional = mlp.chunk_step, mlp.directional

    def counted_chunk(*a, **k):
        calls["chunk"] += 1
        return chunk(*a, **k)

    def counted_directional(*a, **k):
        calls["directional"] += 1
        return directional(*a, **k)

    monkeypatch.setattr(mlp, "chunk_step", counted_chunk)
    monkeypatch.setattr(mlp, "directional", counted_directional)
    cms, twin = _pair("sequential", "gelu", True)
    x = torch.randn(2, 23, 6, dtype=torch.float64)
    twin(x)
    assert calls == {"chunk": 0, "directional": 0}
    cms(x)
    assert calls["chunk"] > 0 and calls["directional"] > 0
