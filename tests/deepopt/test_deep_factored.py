"""DeepMomentum(precondition="factored", normalize=False): the memory reads the gradient divided by
Adafactor's factored second moment, as it comes. The level against Adafactor's formulas, the
reduction to momentum over factored-preconditioned gradients, the foreach path against the
reference, the fused step's references against the foreach path, a bit-exact resume, and the memory
file. (The Triton kernels against these references: tests/kernels/test_fused_steps.py.)"""

import io

import pytest
import torch

import deepopt
from deepopt import pretrained as P
from deepopt.levels import DiagonalPreconditioner, FactoredPreconditioner, fused_step_class
from deepopt.levels.adaptive import FACTORED_EPS
from deepopt.levels.deep import DeepStep

from .test_fast_paths import run

VARIANTS = [dict(precondition="factored", normalize=False), dict(precondition="factored"), dict(normalize=False),
            dict(precondition=True, normalize=False)]


def _grads(shape, steps, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(steps)]


def _factored_steps(gs, b2, eps):
    """Adafactor's statistics written out: row and column means of g^2 + eps1, v_hat = r c^T / mean(r)."""
    r = torch.zeros(gs[0].shape[0], dtype=gs[0].dtype)
    c = torch.zeros(gs[0].shape[1], dtype=gs[0].dtype)
    out = []
    for t, g in enumerate(gs, 1):
        sq = g * g + FACTORED_EPS
        r = b2 * r + (1 - b2) * sq.mean(1)
        c = b2 * c + (1 - b2) * sq.mean(0)
        v = r[:, None] * c[None, :] / r.mean() / (1 - b2**t)
        out.append(g / (v.sqrt() + eps))
    return out


def _level_steps(lvl, p, gs):
    group = dict(lvl.defaults)
    state, out = lvl.init(p, group), []
    for t, g in enumerate(gs, 1):
        state = lvl.write(state, lvl.write_input(g), p, group, t)
        out.append(lvl.read(state, g, p, group, t).materialize())
    return out


def test_factored_preconditioner_is_adafactors_second_moment():
    gs = _grads((5, 7), 4)
    got = _level_steps(FactoredPreconditioner(beta2=0.9, eps=1e-6), torch.zeros(5, 7, dtype=torch.float64), gs)
    for a, b in zip(got, _factored_steps(gs, 0.9, 1e-6)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_on_a_vector_or_rank_one_gradients_it_is_adams_diagonal_second_moment():
    """Exact where v is rank one: a vector (one row), or gradients s_t u w^T of one direction."""
    vec = _grads((9,), 3)
    u, w = _grads((4,), 1, seed=1)[0], _grads((6,), 1, seed=2)[0]
    rank_one = [s * torch.outer(u, w) for s in (1.0, -0.3, 2.5)]
    for gs in (vec, rank_one):
        p = torch.zeros(gs[0].shape, dtype=torch.float64)
        fact = _level_steps(FactoredPreconditioner(), p, gs)
        diag = _level_steps(DiagonalPreconditioner(), p, gs)
        for a, b in zip(fact, diag):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=0)


def test_silent_memory_is_momentum_over_factored_gradients():
    """inner_lr=0 and the silent MLP: m = a m + P(g), W -= lr m, with P the factored preconditioner."""
    gs = _grads((5, 7), 5)
    w = torch.zeros(5, 7, dtype=torch.float64, requires_grad=True)
    opt = deepopt.DeepMomentum([w], lr=0.1, momentum=0.8, inner_lr=0.0, precondition="factored", beta2=0.9,
                               eps=1e-6, normalize=False)
    for g in gs:
        w.grad = g
        opt.step()
    m, ref = torch.zeros(5, 7, dtype=torch.float64), torch.zeros(5, 7, dtype=torch.float64)
    for u in _factored_steps(gs, 0.9, 1e-6):
        m = 0.8 * m + u
        ref = ref - 0.1 * m
    torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_foreach_equals_reference_float64(kw):
    fast, opt_fast = run("DeepMomentum", "foreach", **kw)
    ref, opt_ref = run("DeepMomentum", "reference", **kw)
    for (n, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=n)


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_fused_step_references_equal_the_foreach_path(kw, monkeypatch):
    """The fused step covers these chains; its kernels' references (float32 math, what the kernel
    tests compare the Triton kernels with) equal the chain's foreach path."""
    import deepopt.levels.fused as K

    assert fused_step_class(deepopt.DeepMomentum([torch.nn.Parameter(torch.ones(3, 2))], **kw).chains[0]) is DeepStep
    real = K.fused_step_for
    g = torch.Generator().manual_seed(0)
    shapes = ((6, 5), (7,), (), (3, 2, 4))
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    out = []
    for impl in ("reference", "foreach"):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        monkeypatch.setattr(K, "fused_step_for", lambda chain, group: real(chain, group, impl=impl))
        opt = deepopt.DeepMomentum(ps, lr=0.01, inner_lr=0.5, weight_decay=0.01, **kw)
        for gs in grads:
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()
        out.append((ps, opt))
    (pa, oa), (pb, ob) = out
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        for k in oa.state[x]:
            torch.testing.assert_close(oa.state[x][k], ob.state[y][k], rtol=1e-5, atol=1e-5, msg=k)


def test_resume_through_weights_only_load_is_bit_exact():
    kw = dict(lr=0.01, inner_lr=0.3, weight_decay=0.01, precondition="factored", normalize=False, beta2=0.99)

    def params():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(s, generator=g).requires_grad_() for s in ((5, 3), (7,), (), (2, 3, 4))]

    def steps(ps, opt, seeds):
        for s in seeds:
            gen = torch.Generator().manual_seed(s)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()

    ps = params()
    opt = deepopt.DeepMomentum(ps, **kw)
    steps(ps, opt, range(6))
    straight = [p.detach().clone() for p in ps]
    ps = params()
    opt = deepopt.DeepMomentum(ps, **kw)
    steps(ps, opt, range(3))
    buf = io.BytesIO()
    torch.save(([p.detach() for p in ps], opt.state_dict()), buf)
    pstate, ostate = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    ps = params()
    with torch.no_grad():
        for p, v in zip(ps, pstate):
            p.copy_(v)
    opt = deepopt.DeepMomentum(ps, **kw)
    opt.load_state_dict(ostate)
    steps(ps, opt, range(3, 6))
    for a, b in zip(straight, ps):
        assert torch.equal(a, b.detach())
    state = opt.state[ps[0]]  # two vectors of second-moment statistics, none per entry
    assert (state["factored.exp_avg_sq_row"].shape, state["factored.exp_avg_sq_col"].shape) == ((5,), (3,))
    assert not any(k.endswith("exp_avg_sq") for k in state)


def test_memory_file_round_trip(tmp_path):
    """precondition "factored" and normalize false are written, read back, and build the same chain;
    a plain file still has neither key."""
    card = dict.fromkeys(P.CARD_KEYS, "a test")
    init = {"w1": torch.linspace(0.5, 2, 4), "b1": torch.zeros(4), "w2": torch.full((4,), 0.01)}
    plain = P.save(tmp_path / "plain.json", {"lr": 0.01, "memory_init": init}, name="plain", card=card)
    hp = P.load(plain).hyperparameters
    assert (hp["precondition"], hp["normalize"]) == (False, True)
    assert '"normalize"' not in plain.read_text() and '"precondition"' not in plain.read_text()
    path = P.save(tmp_path / "fact.json", {"lr": 0.01, "memory_init": init, "precondition": "factored",
                                            "normalize": False}, name="fact", card=card)
    mem = P.load(path)
    assert (mem.hyperparameters["precondition"], mem.hyperparameters["normalize"]) == ("factored", False)
    assert "precondition='factored'" in repr(mem) and "normalize=False" in repr(mem)
    opt = deepopt.DeepMomentum.pretrained([torch.nn.Parameter(torch.ones(3, 2))], name=path)
    assert [type(lv).__name__ for lv in opt.chains[0].levels] == ["FactoredPreconditioner", "DeepMemory"]
    assert opt.chains[0].levels[-1].normalize is False
    text = path.read_text().replace('"normalize": false', '"normalize": "no"')
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError, match="hyperparameters.normalize must be true or false"):
        P.load(tmp_path / "bad.json")
