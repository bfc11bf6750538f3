"""CMS: variants, initialisation from an FFN, level specification, in-context mode (chunked == token reference)."""

import pytest
import torch
from torch import nn

import deepopt
import nl_layers
from nl_layers import CMS, MLPBlock

from .helpers import assert_grads_close, max_diff

VARIANTS = ("sequential", "independent", "nested")


def _ffn(dim=8, hidden=16):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)).double()


def test_static_variants_compute_their_formulas():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    seq = CMS(8, 16, periods=(1, 2, 4)).double()
    f = list(seq.blocks)
    assert max_diff(seq(x), (lambda h: h + f[2](h))((lambda h: h + f[1](h))(f[0](x)))) < 1e-12
    ind = CMS(8, 16, periods=(1, 2), variant="independent").double()
    with torch.no_grad():
        ind.mix.copy_(torch.tensor([0.3, 2.0], dtype=torch.float64))
    assert max_diff(ind(x), 0.3 * ind.blocks[0](x) + 2.0 * ind.blocks[1](x)) < 1e-12
    nested = CMS(8, 16, periods=(4, 1), variant="nested").double()
    nn.init.normal_(nested.blocks[1].fc1.weight)
    summed = MLPBlock.build(8, 16).double()
    with torch.no_grad():
        for (n, p), p0, p1 in zip(summed.named_parameters(), nested.blocks[0].parameters(), nested.blocks[1].parameters()):
            p.copy_(p0 + p1)
    assert max_diff(nested(x), summed(x)) < 1e-12


def test_single_level_is_the_plain_ffn():
    cms = CMS(8, 16, periods=(1,)).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    assert torch.equal(cms(x), cms.blocks[0](x))


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_ffn_preserves_outputs_and_trains(variant):
    ffn = _ffn()
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    before = ffn(x)
    cms = CMS.from_ffn(ffn, periods=(16, 4, 1), variant=variant)
    assert max_diff(cms(x), before) < 1e-12
    loss = cms(x).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in cms.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("blocks.1."))


def test_level_spec_names_every_block_parameter_and_feeds_deepopt():
    cms = CMS(8, 16, periods=(1, 4, 16))
    spec = cms.level_spec(prefix="ffn.")
    names = {f"ffn.{n}" for n, _ in cms.named_parameters()}
    assert set(spec) == names
    assert spec["ffn.blocks.2.fc2.bias"] == 16 and spec["ffn.blocks.0.fc1.weight"] == 1
    model = nn.Sequential()
    model.add_module("ffn", cms)
    groups = deepopt.group_by_period(model, spec)
    assert sorted(g["period"] for g in groups) == [1, 4, 16]
    opt = deepopt.OPTIMIZERS["AdamMemory"](groups, lr=1e-2)
    slow_before = cms.blocks[2].fc1.weight.detach().clone()
    fast_before = cms.blocks[0].fc1.weight.detach().clone()
    x = torch.randn(4, 8)
    opt.zero_grad()
    cms(x).square().sum().backward()
    opt.step()  # step 1: period-16 level holds, period-1 level moves
    assert torch.equal(cms.blocks[2].fc1.weight, slow_before)
    assert not torch.equal(cms.blocks[0].fc1.weight, fast_before)


def _in_context(variant):
    chunks = (None, 8, 3) if variant == "nested" else (5, None, 8)
    cms = CMS(6, 10, periods=(1, 2, 4), variant=variant, in_context=chunks, in_context_lr=0.3).double()
    if variant == "nested":  # nonzero deltas so every level matters
        for blk in cms.blocks[1:]:
            for p in blk.parameters():
                nn.init.normal_(p, std=0.1)
    return cms


@pytest.mark.parametrize("variant", VARIANTS)
def test_in_context_chunked_equals_token_reference(variant):
    cms = _in_context(variant)
    x = torch.randn(2, 23, 6, dtype=torch.float64, requires_grad=True)
    y, s = cms(x, return_state=True)
    y_ref, s_ref = cms(x, return_state=True, mode="recurrent")
    assert max_diff(y, y_ref) < 1e-12
    for lv, lv_ref in zip(s.levels, s_ref.levels):
        assert lv.count == lv_ref.count
        for n in lv.weights:
            assert max_diff(lv.weights[n], lv_ref.weights[n]) < 1e-12
            assert max_diff(lv.grad_sum[n], lv_ref.grad_sum[n]) < 1e-12
    assert_grads_close(cms, x, y, y_ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_in_context_streamed_equals_whole(variant):
    cms = _in_context(variant)
    x = torch.randn(2, 23, 6, dtype=torch.float64)
    y = cms(x)
    parts, state = [], None
    for piece in torch.split(x, [1, 6, 9, 7], dim=1):
        out, state = cms(piece, state, return_state=True)
        parts.append(out)
    assert max_diff(torch.cat(parts, 1), y) < 1e-12
    assert state.position == 23


def test_in_context_steps_change_outputs_only_after_a_boundary():
    cms = CMS(6, 10, periods=(1,), in_context=(4,), in_context_lr=0.5).double()
    static = CMS(6, 10, periods=(1,)).double()
    static.load_state_dict(cms.state_dict())
    x = torch.randn(2, 12, 6, dtype=torch.float64)
    y, y0 = cms(x), static(x)
    assert max_diff(y[:, :4], y0[:, :4]) < 1e-14  # first chunk: the initial weights
    assert max_diff(y[:, 4:], y0[:, 4:]) > 1e-3  # afterwards: the weights learned in context


def test_in_context_step_reduces_the_next_input_prediction_loss():
    """One in-context step is a gradient step on the level's objective: its loss goes down."""
    cms = CMS(6, 10, periods=(1,), in_context=(8,), in_context_lr=0.1).double()
    x = torch.randn(1, 8, 6, dtype=torch.float64)
    _, s = cms(x, return_state=True)
    blk = cms.blocks[0]

    def loss(params):
        pred = x[0, :-1] + torch.func.functional_call(blk, params, (x[0, :-1],))
        return 0.5 * (pred - x[0, 1:]).pow(2).sum(-1).mean()

    before = loss(dict(blk.named_parameters()))
    after = loss({n: w[0] for n, w in s.levels[0].weights.items()})
    assert after < before


def test_nested_fast_level_restarts_at_slow_boundaries():
    cms = CMS(6, 10, periods=(1, 1), variant="nested", in_context=(4, 2), in_context_lr=0.2).double()
    x = torch.randn(1, 8, 6, dtype=torch.float64)
    _, s = cms(x, return_state=True)
    init = dict(cms.blocks[1].named_parameters())
    for n, w in s.levels[1].weights.items():  # token 8 is a boundary of the slow level
        assert torch.equal(w[0], init[n])
    assert any(not torch.equal(w[0], p) for (n, w), p in zip(s.levels[0].weights.items(), cms.blocks[0].parameters()))


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        CMS(8, variant="parallel")
    with pytest.raises(ValueError, match="periods"):
        CMS(8, periods=())
    with pytest.raises(ValueError, match="periods"):
        CMS(8, periods=(1, 0))
    with pytest.raises(ValueError, match="in_context"):
        CMS(8, periods=(1, 2), in_context=(4,))
    with pytest.raises(ValueError, match="in_context"):
        CMS(8, periods=(1,), in_context=(0,))
    with pytest.raises(ValueError, match="increase"):
        CMS(8, periods=(1, 1), variant="nested", in_context=(2, 8))
    with pytest.raises(ValueError, match="in-context"):
        CMS(8)(torch.randn(2, 8), return_state=True)
    with pytest.raises(ValueError, match="last dimension"):
        CMS(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="batch, time, dim"):
        CMS(8, in_context=(4,))(torch.randn(3, 8))
    x = torch.randn(1, 5, 8)
    x[0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        CMS(8, in_context=(4,))(x)
    with pytest.raises(ValueError, match="dim"):
        CMS.from_ffn(nn.Sequential(nn.GELU()), periods=(1, 2))
    with pytest.raises(ValueError, match="activation"):
        MLPBlock.build(8, 16, activation="swish")


def test_static_cms_keeps_nan_at_its_position():
    """Documented: the position-wise (training-mode) CMS does not scan for NaN; it stays where it is."""
    cms = CMS(8, 16, periods=(1, 4))
    x = torch.randn(2, 5, 8)
    x[1, 2, 0] = float("nan")
    y = cms(x)
    assert torch.isnan(y[1, 2]).all()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.isfinite(y[mask]).all()


@pytest.mark.parametrize("lr", [1e-4, 1e3])
def test_in_context_step_is_the_plain_step_capped_at_the_gauss_newton_minimum(lr):
    """theta <- theta - min(lr / n, ||g||^2 / ||J g||^2) g, with g and J g from plain autograd."""
    cms = CMS(6, 10, periods=(1,), in_context=(8,), in_context_lr=lr).double()
    x = torch.randn(1, 8, 6, dtype=torch.float64)
    _, s = cms(x, return_state=True)
    blk = cms.blocks[0]
    names = [n for n, _ in blk.named_parameters()]
    theta = [p.detach() for _, p in blk.named_parameters()]

    def residuals(*params):
        out = torch.func.functional_call(blk, dict(zip(names, params)), (x[0, :-1],))
        return x[0, :-1] + out - x[0, 1:]

    g = torch.autograd.grad(0.5 * residuals(*[t.requires_grad_() for t in theta]).pow(2).sum(), theta)
    _, jg = torch.autograd.functional.jvp(residuals, tuple(t.detach() for t in theta), g)
    step = min(lr / 7, float(sum(t.pow(2).sum() for t in g) / jg.pow(2).sum()))
    assert (step == lr / 7) == (lr < 1)  # the plain step when it is small, the cap when it is not
    for n, t, gt in zip(names, theta, g):
        assert max_diff(s.levels[0].weights[n][0], t - step * gt) < 1e-12


@pytest.mark.parametrize("lr", [1.0, 100.0])
def test_in_context_steps_stay_bounded_at_large_step_sizes(lr):
    """Plain steps at these sizes overshoot and give NaN within a few chunks; capped ones converge."""
    cms = CMS(32, periods=(1,), in_context=(4,), in_context_lr=lr)
    x = torch.nn.functional.rms_norm(torch.randn(10, 32)[torch.randint(0, 10, (2, 64))], (32,))
    y = cms(x)
    assert torch.isfinite(y).all() and y.norm(dim=-1).max() < 4 * 32**0.5
