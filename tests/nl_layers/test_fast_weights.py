"""nl_layers.ops.fast_weights: the chunk-parallel scan equals the token-by-token reference; the inner step is bounded."""

import pytest
import torch

import nl_layers.ops.fast_weights.cross as cross
from nl_layers.ops.fast_weights import (
    ChunkPlan,
    dense_all,
    dense_states,
    inner_step,
    inner_step_reference,
    rank1_read,
    rank1_states,
    scan_recurrent,
    step_bound,
)
from nl_layers.ops.fast_weights.scan import TokenPlan, decay_mix, rank1_ends, rank1_read_tokens

from .helpers import max_diff


def _inputs(length, momentum, n=3, out=4, inp=5):
    f64 = dict(dtype=torch.float64)
    left, right = torch.randn(n, length, out, **f64), torch.randn(n, length, inp, **f64)
    log_m = -torch.rand(n, length, **f64) if momentum else None
    log_a = -0.3 * torch.rand(n, length, **f64)
    d0, s0 = torch.randn(n, out, inp, **f64), torch.randn(n, out, inp, **f64)
    return left, right, log_m, log_a, d0, s0


def _rank1(left, right, log_m, log_a, d0, s0, x, chunk):
    plan = ChunkPlan.build(log_m, log_a, chunk)
    bl, br = plan.blocks(left), plan.blocks(right)
    starts, (d_last, s_last) = rank1_states(plan, bl, br, d0, s0)
    return plan.unblocks(rank1_read(plan, bl, br, starts, plan.blocks(x))), d_last, s_last


@pytest.mark.parametrize("group", [2, 16])  # 2: the cross-chunk scan recurses over groups of chunks
@pytest.mark.parametrize("length, chunk", [(1, 16), (17, 4), (63, 16), (63, 1), (40, 64)])
@pytest.mark.parametrize("momentum", [True, False])
def test_chunked_equals_recurrent(momentum, length, chunk, group, monkeypatch):
    monkeypatch.setattr(cross, "GROUP", group)
    left, right, log_m, log_a, d0, s0 = _inputs(length, momentum)
    u = left[..., :, None] * right[..., None, :]
    ref, d_ref, s_ref = scan_recurrent(u, log_m, log_a, d0, s0)
    plan = ChunkPlan.build(log_m, log_a, chunk)
    starts, (d_last, s_last) = dense_states(plan, plan.blocks(u), d0, s0)
    assert max_diff(dense_all(plan, plan.blocks(u), starts), ref) < 1e-11
    assert max_diff(d_last, d_ref) < 1e-11 and max_diff(s_last, s_ref) < 1e-11
    x = torch.randn(3, length, 5, dtype=torch.float64)
    y, d_last, s_last = _rank1(left, right, log_m, log_a, d0, s0, x, chunk)
    assert max_diff(y, (ref @ x[..., None])[..., 0]) < 1e-11
    assert max_diff(d_last, d_ref) < 1e-11 and max_diff(s_last, s_ref) < 1e-11


@pytest.mark.parametrize("group", [2, 16])  # 16: six chunks in closed form; 2: the grouped scan
def test_gradients_equal_the_reference(group, monkeypatch):
    monkeypatch.setattr(cross, "GROUP", group)
    inputs = [t.requires_grad_() for t in _inputs(23, True)]
    x = torch.randn(3, 23, 5, dtype=torch.float64)
    y, d_last, s_last = _rank1(*inputs, x, chunk=4)
    left, right, log_m, log_a, d0, s0 = inputs
    ref, d_ref, s_ref = scan_recurrent(left[..., :, None] * right[..., None, :], log_m, log_a, d0, s0)
    w = [torch.randn_like(t) for t in (y, d_last, s_last)]
    objective = lambda a, b, c: (a * w[0]).sum() + (b * w[1]).sum() + (c * w[2]).sum()  # noqa: E731
    got = torch.autograd.grad(objective(y, d_last, s_last), inputs)
    want = torch.autograd.grad(objective((ref @ x[..., None])[..., 0], d_ref, s_ref), inputs)
    for g, h in zip(got, want):
        assert max_diff(g, h) < 1e-10


@pytest.mark.parametrize("error_clip", [1.0, 0.1, None])
def test_inner_step_is_bounded_for_adversarial_sizes(error_clip):
    """||c g|| <= sqrt(theta) min(||r||, tau) / 2 and c kappa < 1, from tiny to huge gradients and residuals."""
    mags = torch.logspace(-12, 12, 49, dtype=torch.float64)
    theta = torch.tensor([1e-3, 0.1, 1.0, 10.0, 1e3], dtype=torch.float64)[:, None, None]
    g_sq, r_sq = mags[None, :, None], mags[None, None, :]
    c = inner_step(theta, g_sq, r_sq, error_clip)
    tau = float("inf") if error_clip is None else error_clip
    assert (c * g_sq.sqrt() <= theta.sqrt() * r_sq.sqrt().clamp(max=tau) / 2 * (1 + 1e-12)).all()
    assert (c * g_sq / r_sq < 1 + 1e-12).all()  # < 1 up to rounding (theta kappa reaches 1e27 here)
    assert step_bound(4.0, 0.5) == 0.5 and step_bound(4.0, None) == float("inf")


def test_inner_step_at_a_zero_residual_has_finite_gradients():
    theta = torch.tensor([0.5, 0.5], requires_grad=True)
    g_sq = torch.tensor([0.0, 2.0], requires_grad=True)
    r_sq = torch.tensor([0.0, 1.0], requires_grad=True)
    c = inner_step(theta, g_sq, r_sq, error_clip=1.0)
    assert c[0] == 0 and c[1] == 0.5 / (1 + 0.5 * 2.0)  # zero residual: zero step (its gradient is zero anyway)
    grads = torch.autograd.grad(c.sum(), [theta, g_sq, r_sq])
    assert all(torch.isfinite(g).all() for g in grads)


def _step_inputs(n=64, zero=True):
    """theta, g^2, r^2 (float64, n tokens): residuals on both sides of the clips used below, and
    (with ``zero``) tokens with a zero residual and gradient, a zero gradient only, and r^2 = tau^2 = 1."""
    torch.manual_seed(0)
    theta = torch.rand(n, dtype=torch.float64) * 2 + 1e-3
    g_sq = torch.rand(n, dtype=torch.float64) * 10 ** torch.empty(n, dtype=torch.float64).uniform_(-3, 3)
    r_sq = torch.rand(n, dtype=torch.float64) * 10 ** torch.empty(n, dtype=torch.float64).uniform_(-3, 3)
    if zero:
        g_sq[:3], r_sq[:2] = 0.0, 0.0
        r_sq[5] = 1.0
    return [t.requires_grad_() for t in (theta, g_sq, r_sq)]


@pytest.mark.parametrize("error_clip", [1.0, 0.05, 1e6, None])
def test_inner_step_matches_its_reference_values_and_gradients(error_clip):
    """The fused step (hand-written backward) equals autograd through the reference: values and the
    gradients of theta, g^2 and r^2, with the clip active on some tokens, none or all, and at zero residuals."""
    inputs = _step_inputs()
    c, ref = inner_step(*inputs, error_clip), inner_step_reference(*inputs, error_clip)
    assert max_diff(c, ref) < 1e-15 * ref.abs().max()
    w = torch.randn_like(c)
    grads = torch.autograd.grad((c * w).sum(), inputs)
    grads_ref = torch.autograd.grad((ref * w).sum(), inputs)
    for g, gr in zip(grads, grads_ref):
        assert torch.isfinite(g).all()
        assert max_diff(g, gr) <= 1e-12 * (1 + gr.abs().max())
    if error_clip is not None:  # zero residual: zero step, dc/dr^2 = theta (clip inactive), no NaN
        assert (c[:2] == 0).all() and torch.equal(grads[2][:2], (w * inputs[0])[:2].detach())
    neg = inner_step(*inputs, error_clip, negate=True)  # -c, and the same gradients through it
    assert torch.equal(neg, -c)
    for g, gn in zip(grads, torch.autograd.grad((-neg * w).sum(), inputs)):
        assert torch.equal(g, gn)


@pytest.mark.parametrize("error_clip", [1.0, None])
def test_inner_step_gradcheck(error_clip):
    theta, g_sq, r_sq = (t.detach()[6:18].requires_grad_() for t in _step_inputs())  # away from the clip's kink
    assert torch.autograd.gradcheck(lambda *x: inner_step(*x, error_clip), (theta, g_sq, r_sq))


def test_inner_step_broadcasts_like_its_reference():
    theta = torch.rand(3, 1, 1, dtype=torch.float64, requires_grad=True)
    g_sq = torch.rand(1, 4, 1, dtype=torch.float64, requires_grad=True)
    r_sq = (torch.rand(1, 1, 5, dtype=torch.float64) * 3).requires_grad_()
    c, ref = inner_step(theta, g_sq, r_sq, 1.0), inner_step_reference(theta, g_sq, r_sq, 1.0)
    assert c.shape == ref.shape == (3, 4, 5) and max_diff(c, ref) < 1e-15
    for g, gr in zip(torch.autograd.grad(c.sum(), (theta, g_sq, r_sq)), torch.autograd.grad(ref.sum(), (theta, g_sq, r_sq))):
        assert g.shape == gr.shape and max_diff(g, gr) < 1e-12


@pytest.mark.parametrize("group", [2, 16])
@pytest.mark.parametrize("momentum", [True, False])
def test_none_initial_state_is_a_zero_state(momentum, group, monkeypatch):
    monkeypatch.setattr(cross, "GROUP", group)
    left, right, log_m, log_a, d0, s0 = _inputs(37, momentum)
    x = torch.randn(3, 37, 5, dtype=torch.float64)
    zero = torch.zeros_like(d0)
    y, d_last, s_last = _rank1(left, right, log_m, log_a, zero, zero, x, chunk=4)
    y_n, d_n, s_n = _rank1(left, right, log_m, log_a, None, None, x, chunk=4)
    assert max_diff(y_n, y) < 1e-12 and max_diff(d_n, d_last) < 1e-12 and max_diff(s_n, s_last) < 1e-12
    for given_d, given_s in ((d0, None), (None, s0)):  # one of the two given, the other zero
        want = _rank1(left, right, log_m, log_a, zero if given_d is None else d0, zero if given_s is None else s0, x, 4)
        got = _rank1(left, right, log_m, log_a, given_d, given_s, x, chunk=4)
        assert all(max_diff(a, b) < 1e-12 for a, b in zip(got, want))


def _rank1_tokens(left, right, log_m, log_a, d0, s0, x, scale):
    """The token form (TokenPlan, rank1_read_tokens, rank1_ends) of a scan of u_r = scale_r left_r right_r^T."""
    plan = TokenPlan.build(log_m, log_a, initial=True)
    mixing = plan.mix * scale[:, None, :]
    out = 0 * x[..., :1] * left[:, :1]  # (N, L, o) zeros, or the initial state's part
    if d0 is not None:
        out = out + plan.pa[..., None] * (x @ d0.transpose(-1, -2))
    if s0 is not None and log_m is not None:
        out = out + plan.fs[..., None] * (x @ s0.transpose(-1, -2))
    y = rank1_read_tokens(mixing, left, right, x, out)
    if log_m is None:
        ends = rank1_ends(left, right, mixing[:, -1, :, None])
        d_last, s_last = ends[:, 0], scale[:, -1, None, None] * left[:, -1, :, None] * right[:, -1, None, :]
    else:
        ends = rank1_ends(left, right, torch.stack([mixing[:, -1], plan.dm_last * scale], -1))
        d_last, s_last = ends[:, 0], ends[:, 1]
        if s0 is not None:
            d_last, s_last = d_last + plan.fs[:, -1, None, None] * s0, s_last + plan.pm[:, -1, None, None] * s0
    if d0 is not None:
        d_last = d_last + plan.pa[:, -1, None, None] * d0
    return y, d_last, s_last


@pytest.mark.parametrize("initial", ["both", "none", "d0", "s0"])
@pytest.mark.parametrize("length", [1, 2, 17, 63])
@pytest.mark.parametrize("momentum", [True, False])
def test_token_form_equals_recurrent_values_and_gradients(momentum, length, initial):
    """Reads and end states through the L x L token matrix equal the token-by-token scan (float64),
    as do the gradients w.r.t. every input (factors, scales, decays, initial state, queries)."""
    left, right, log_m, log_a, d0, s0 = _inputs(length, momentum)
    d0 = d0 if initial in ("both", "d0") else None
    s0 = s0 if initial in ("both", "s0") else None
    scale = torch.rand(3, length, dtype=torch.float64) - 0.5
    x = torch.randn(3, length, 5, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (left, right, log_m, log_a, d0, s0, x, scale) if t is not None]
    got = _rank1_tokens(left, right, log_m, log_a, d0, s0, x, scale)
    zero = torch.zeros(3, 4, 5, dtype=torch.float64)
    u = scale[..., None, None] * left[..., :, None] * right[..., None, :]
    ref, d_ref, s_ref = scan_recurrent(u, log_m, log_a, zero if d0 is None else d0, zero if s0 is None else s0)
    want = ((ref @ x[..., None])[..., 0], d_ref, s_ref)
    for a, b in zip(got, want):
        assert max_diff(a, b) < 1e-11
    w = [torch.randn_like(t) for t in want]
    objective = lambda outs: sum((o * v).sum() for o, v in zip(outs, w))  # noqa: E731
    grads = [torch.autograd.grad(objective(outs), inputs, allow_unused=True) for outs in (got, want)]
    for g, h in zip(*grads):  # None for s0 without momentum (it does not enter), in both
        assert (g is None and h is None) or max_diff(g, h) < 1e-10


@pytest.mark.parametrize("momentum", [True, False])
def test_token_plan_is_the_scan_in_closed_form(momentum):
    """u_r = e_r (unit updates): D_t's entries are row t of mix, S_L's are dm_last; pa, fs, pm from unit initial states."""
    n, length = 2, 29
    log_m = -torch.rand(n, length, dtype=torch.float64) if momentum else None
    log_a = -torch.rand(n, length, dtype=torch.float64)
    plan = TokenPlan.build(log_m, log_a, initial=True)
    eye, zero = torch.eye(length, dtype=torch.float64).expand(n, length, length), torch.zeros(n, length, dtype=torch.float64)
    ref, _, s_last = scan_recurrent(eye, log_m, log_a, zero, zero)
    assert max_diff(plan.mix, ref) < 1e-12 and (plan.mix.triu(1) == 0).all()
    ones = torch.ones(n, 1, dtype=torch.float64)
    d_from_d0, _, _ = scan_recurrent(torch.zeros(n, length, 1, dtype=torch.float64), log_m, log_a, ones, 0 * ones)
    assert max_diff(plan.pa, d_from_d0[..., 0]) < 1e-12
    if momentum:
        assert max_diff(plan.dm_last, s_last) < 1e-12
        d_from_s0, _, _ = scan_recurrent(torch.zeros(n, length, 1, dtype=torch.float64), log_m, log_a, 0 * ones, ones)
        assert max_diff(plan.fs, d_from_s0[..., 0]) < 1e-12
        assert max_diff(plan.pm, log_m.cumsum(-1).exp()) < 1e-12
    else:
        assert plan.fs is None and plan.pm is None and plan.dm_last is None


def test_decay_mix_equals_the_autograd_product_values_and_gradients():
    c = torch.stack([-torch.rand(3, 11, dtype=torch.float64), -2 * torch.rand(3, 11, dtype=torch.float64)])
    c = c.cumsum(-1).requires_grad_()
    mix = decay_mix(c)
    lower = torch.ones(11, 11, dtype=torch.bool).tril()
    d = torch.where(lower, c[..., :, None] - c[..., None, :], -torch.inf).exp()
    ref = d[0] @ d[1]
    assert max_diff(mix, ref) < 1e-14
    w = torch.randn_like(mix)
    got, want = (torch.autograd.grad((m * w).sum(), c)[0] for m in (mix, ref))
    assert max_diff(got, want) < 1e-12
    assert torch.autograd.gradcheck(decay_mix, (c.detach()[..., :5].requires_grad_(),))


def test_token_plan_without_initial_state_equals_the_plan_with_it():
    """The hand-written decay mix (a fresh sequence) against the autograd decay products."""
    log_m = (-torch.rand(2, 19, dtype=torch.float64)).requires_grad_()
    log_a = (-torch.rand(2, 19, dtype=torch.float64)).requires_grad_()
    fresh, full = TokenPlan.build(log_m, log_a), TokenPlan.build(log_m, log_a, initial=True)
    assert fresh.fs is None and fresh.pm is None
    w = [torch.randn_like(t) for t in (full.mix, full.pa, full.dm_last)]
    objective = lambda p: sum((t * v).sum() for t, v in zip((p.mix, p.pa, p.dm_last), w))  # noqa: E731
    assert max(max_diff(a, b) for a, b in zip((fresh.mix, fresh.pa, fresh.dm_last), (full.mix, full.pa, full.dm_last))) < 1e-14
    got, want = (torch.autograd.grad(objective(p), [log_m, log_a]) for p in (fresh, full))
    assert all(max_diff(g, h) < 1e-12 for g, h in zip(got, want))


@pytest.mark.parametrize("momentum", [True, False])
def test_token_plan_without_ends_skips_dm_last_and_pa_with_the_same_mix(momentum):
    """ends=False (no end states wanted) and d0=False (no D_0): no dm_last nor pa; mix and its
    gradients as in the full plan; with d0 pa is kept."""
    log_m = (-torch.rand(2, 13, dtype=torch.float64)).requires_grad_() if momentum else None
    log_a = (-torch.rand(2, 13, dtype=torch.float64)).requires_grad_()
    full, lean = TokenPlan.build(log_m, log_a), TokenPlan.build(log_m, log_a, ends=False, d0=False)
    assert lean.dm_last is None and lean.pa is None and (full.dm_last is not None) == momentum
    assert max_diff(lean.mix, full.mix) == 0
    with_d0 = TokenPlan.build(log_m, log_a, ends=False, d0=True)
    assert with_d0.dm_last is None and max_diff(with_d0.pa, full.pa) == 0
    leaves = [t for t in (log_m, log_a) if t is not None]
    w = torch.randn_like(full.mix)
    got, want = (torch.autograd.grad((p.mix * w).sum(), leaves) for p in (lean, full))
    assert all(max_diff(g, h) < 1e-14 for g, h in zip(got, want))


@pytest.mark.parametrize("name", ["scan", "cross", "engines", "step", "grouped_linear", "decay_kernels", "read_kernels",
                                  "factor_kernels", "shared_read_kernels"])
def test_docstring_examples_of_the_ops_run(name):
    import doctest
    import importlib

    from ..example_imports import run_examples

    module = importlib.import_module(f"nl_layers.ops.fast_weights.{name}")
    result = run_examples(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
