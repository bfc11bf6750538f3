"""deepopt.meta: meta-gradients (finite differences), flat memory, clipping, reloadable result."""

import gc
import math

import pytest
import torch
from torch.func import functional_call

import deepopt
from deepopt import functional as F
from deepopt.meta import MetaLearner, MetaTrainer, _detach, unroll


class Quadratic:
    """An ill-conditioned quadratic 1/2 sum_i s_i (w_i - c_i)^2 over a matrix and a vector."""

    def __init__(self, g: torch.Generator, dtype=torch.float32):
        self.s = {"w": torch.logspace(-1, 1, 12, dtype=dtype)[torch.randperm(12, generator=g)].reshape(3, 4),
                  "b": torch.rand(4, generator=g, dtype=dtype) + 0.5}
        self.c = {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in self.s.items()}
        self.params = {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in self.s.items()}

    def loss(self, params, step):
        return sum(0.5 * (self.s[k] * (params[k] - self.c[k]) ** 2).sum() for k in params)


def _meta_loss_fn(learner, task, steps):
    names = list(dict(learner.named_parameters()))

    def f(*raw):
        hp = functional_call(learner, dict(zip(names, raw)), ())
        return unroll(F.make(learner.cls, **hp), task, steps)[0]
    return f, tuple(p.detach().clone().requires_grad_() for p in learner.parameters())


@pytest.mark.parametrize("optimizer,kw", [
    ("DeepMomentum", dict(lr=0.05, momentum=0.8, inner_lr=0.2, hidden=4)),
    ("MomentumMemory", dict(lr=0.05, momentum=0.8)),
    ("DeltaMomentum", dict(lr=0.05, momentum=0.8, delta=0.5)),
    ("M3", dict(lr=0.02, frequency=2, ns_dtype=None, alpha=0.5)),
])
def test_meta_gradient_matches_finite_differences_float64(optimizer, kw):
    learner = MetaLearner(optimizer, **kw).double()
    task = Quadratic(torch.Generator().manual_seed(0), torch.float64)
    f, raw = _meta_loss_fn(learner, task, steps=5)
    fast = optimizer == "DeepMomentum"  # a random projection of the Jacobian: 2 unrolls instead of 2 per input
    assert torch.autograd.gradcheck(f, raw, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast)


def test_learnable_lr_gradient_matches_finite_differences():
    learner = MetaLearner("DeepMomentum", learn=("lr", "momentum"), lr=0.05, hidden=4).double()
    f, raw = _meta_loss_fn(learner, Quadratic(torch.Generator().manual_seed(1), torch.float64), steps=4)
    assert torch.autograd.gradcheck(f, raw, eps=1e-6, atol=1e-5, rtol=1e-4)


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_memory_stays_flat_across_outer_steps():
    torch._dynamo.reset()  # compiled steps of earlier tests release their fake tensors late: not ours to count
    gc.collect()
    learner = MetaLearner("DeepMomentum", lr=0.05, hidden=4)
    trainer = MetaTrainer(learner, Quadratic, unroll=6, truncation=3, meta_lr=1e-2)
    trainer.step()
    counts, nodes = [], []
    for _ in range(3):
        nodes.append(trainer.step()["graph_nodes"])
        counts.append(_live_tensors())
    assert len(set(nodes)) == 1 and nodes[0] > 0  # one segment's graph, whatever the outer step
    assert max(counts) == min(counts)             # nothing accumulates across outer steps


def test_truncation_bounds_the_graph():
    def nodes(truncation):
        learner = MetaLearner("MomentumMemory", lr=0.05)
        return MetaTrainer(learner, Quadratic, unroll=12, truncation=truncation).step()["graph_nodes"]
    assert nodes(3) < nodes(6) < nodes(12)


def test_meta_gradient_is_clipped():
    learner = MetaLearner("MomentumMemory", lr=0.05, momentum=0.5)
    trainer = MetaTrainer(learner, Quadratic, unroll=6, truncation=3, meta_lr=1.0, clip=1e-3)
    before = learner.raw["momentum"].detach().clone()
    stats = trainer.step()
    assert stats["grad_norm"] > 1e-3
    total = torch.cat([p.grad.reshape(-1) for p in learner.parameters()]).norm()
    assert total <= 1e-3 * (1 + 1e-5)
    assert not torch.equal(before, learner.raw["momentum"].detach())


def test_meta_training_lowers_the_meta_loss_on_held_out_tasks():
    torch.manual_seed(0)
    learner = MetaLearner("DeepMomentum", lr=0.02, momentum=0.5, inner_lr=0.05, hidden=4)
    held_out = [Quadratic(torch.Generator().manual_seed(1000 + i)) for i in range(4)]

    def evaluate():
        with torch.no_grad():
            tx = learner.transformation()
            return sum(float(unroll(tx, t, 10)[0]) for t in held_out) / len(held_out)

    before = evaluate()
    trainer = MetaTrainer(learner, Quadratic, unroll=10, truncation=5, meta_lr=0.1)
    for _ in range(8):
        trainer.step()
    assert evaluate() < 0.9 * before


def test_learned_optimizer_state_dict_reloads_into_the_torch_class(tmp_path):
    learner = MetaLearner("DeepMomentum", lr=0.05, hidden=4)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model = torch.nn.Linear(3, 2)
    params0 = [p.detach().clone() for p in model.parameters()]
    learned = learner.optimizer(model.parameters())
    torch.save(learned.state_dict(), tmp_path / "opt.pt")
    torch.save(learner.state_dict(), tmp_path / "learner.pt")

    twin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p, q in zip(twin.parameters(), params0):
            p.copy_(q)
    fresh = deepopt.DeepMomentum(twin.parameters(), hidden=4)
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt"))
    assert fresh.param_groups[0]["inner_lr"] == pytest.approx(learner.learned()["inner_lr"])
    for _ in range(3):
        x = torch.randn(5, 3)
        for m, o in ((model, learned), (twin, fresh)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))

    again = MetaLearner("DeepMomentum", lr=0.05, hidden=4)
    again.load_state_dict(torch.load(tmp_path / "learner.pt"))
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), learner.parameters()))
    with pytest.raises(ValueError, match="learns"):
        MetaLearner("DeepMomentum", learn=("momentum",), hidden=4).load_state_dict(
            torch.load(tmp_path / "learner.pt"), strict=False)


def test_m3_learns_its_mixing_weight():
    learner = MetaLearner("M3", lr=0.02, frequency=2, alpha=0.5)
    assert set(dict(learner.named_parameters())) == {"raw.alpha", "raw.beta1", "raw.beta3"}
    trainer = MetaTrainer(learner, Quadratic, unroll=4, truncation=4)
    before = float(learner()["alpha"])
    trainer.step()
    assert float(learner()["alpha"]) != before
    opt = learner.optimizer([torch.nn.Parameter(torch.randn(3, 3))])
    assert opt.param_groups[0]["momenta"][1][2] == pytest.approx(float(learner()["alpha"]))


def test_bad_input():
    with pytest.raises(ValueError, match="unknown optimizer"):
        MetaLearner("AdamMemory")
    with pytest.raises(ValueError, match="can learn"):
        MetaLearner("MomentumMemory", learn=("inner_lr",))
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        MetaLearner("MomentumMemory", momentum=0.0)
    learner = MetaLearner("MomentumMemory")
    with pytest.raises(ValueError, match="divide"):
        MetaTrainer(learner, Quadratic, unroll=10, truncation=3)
    with pytest.raises(ValueError, match="clip"):
        MetaTrainer(learner, Quadratic, clip=0.0)
    with pytest.raises(ValueError, match="unknown objective 'median'"):
        MetaTrainer(learner, Quadratic, objective="median")


def test_non_finite_meta_gradient_skips_the_outer_step():
    class Diverging(Quadratic):
        def loss(self, params, step):
            return super().loss(params, step) * (float("nan") if step == 2 else 1.0)

    learner = MetaLearner("MomentumMemory", lr=0.05)
    trainer = MetaTrainer(learner, Diverging, unroll=4, truncation=4)
    before = [p.detach().clone() for p in learner.parameters()]
    assert trainer.step()["skipped"] == 1.0 and trainer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, learner.parameters()))
    assert trainer.step()["skipped"] == 1.0 and trainer.skipped_steps == 2


def test_sync_sees_every_meta_gradient_before_the_step():
    """``sync`` gets the learner's gradients (in its parameter order) and its changes are what the step
    uses: the mean of two processes' gradients, here two trainers on different task seeds."""
    def trainer(seed, sync=None):
        return MetaTrainer(MetaLearner("DeepMomentum", lr=0.05, hidden=4), Quadratic, unroll=4, truncation=2,
                           meta_lr=0.1, seed=seed, sync=sync, clip=1e9)  # no clipping: grads compare as is

    other = trainer(1)
    other.meta_opt.step = lambda: None  # only its meta-gradients are wanted
    other.step()
    theirs = [p.grad.clone() for p in other.learner.parameters()]
    seen = []

    def mean_with_other(grads):
        seen.append([g.clone() for g in grads])
        for g, h in zip(grads, theirs):
            g.add_(h).mul_(0.5)

    synced = trainer(0, mean_with_other)
    synced.step()
    mine = seen[0]
    assert [g.shape for g in mine] == [p.shape for p in synced.learner.parameters()]
    # the same step, taken by a trainer that is handed the mean directly
    direct = trainer(0)
    direct.meta_opt.step = lambda: None
    direct.step()
    for g, h in zip(direct.learner.parameters(), theirs):
        g.grad.add_(h).mul_(0.5)
    torch.optim.Adam.step(direct.meta_opt)
    for a, b in zip(synced.learner.parameters(), direct.learner.parameters()):
        assert torch.equal(a, b)


class WithDeadEntries(Quadratic):
    """The quadratic, plus a vector half of whose entries have gradients so small (~1e-200) that their
    squares underflow: their second moments stay exactly 0 while the gradients are not (and depend
    on the parameters, so the meta-gradient flows through them)."""

    def __init__(self, g: torch.Generator, dtype=torch.float32):
        super().__init__(g, dtype)
        self.params["e"] = torch.randn(6, generator=g, dtype=dtype)

    def loss(self, params, step):
        e = params["e"]
        rest = super().loss({k: v for k, v in params.items() if k != "e"}, step)
        return rest + (e[:3] ** 2).sum() + 1e-200 * (e[3:] ** 2).sum()


@pytest.mark.parametrize("optimizer,kw", [
    ("DeepMomentum", dict(lr=0.01, momentum=0.8, inner_lr=0.2, hidden=4, precondition=True)),
    ("DeepMomentum", dict(lr=0.01, momentum=0.8, inner_lr=0.2, hidden=4, precondition="factored", normalize=False)),
    ("M3", dict(lr=0.02, frequency=2, ns_dtype=None, alpha=0.5)),
])
def test_meta_gradient_is_finite_where_a_second_moment_stays_zero(optimizer, kw):
    """sqrt(v) at v = 0 has an infinite derivative; the preconditioners differentiate it as 0, so the
    meta-gradient is finite (it was NaN) and still matches finite differences."""
    learner = MetaLearner(optimizer, **kw).double()
    task = WithDeadEntries(torch.Generator().manual_seed(0), torch.float64)
    f, raw = _meta_loss_fn(learner, task, steps=4)
    grads = torch.autograd.grad(f(*raw), raw, allow_unused=True)
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)
    assert torch.autograd.gradcheck(f, raw, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_log_objective_is_the_mean_log_loss_and_trains():
    """``objective="log"``: the unroll's value is the mean of the inner losses' logs (the inner steps
    unchanged: the same parameters after the run), and a trainer on it lowers the held-out loss."""
    task = Quadratic(torch.Generator().manual_seed(0), torch.float64)
    tx = F.make("MomentumMemory", lr=0.05, momentum=0.8)
    losses = [float(unroll(tx, task, t)[0]) * t for t in range(1, 6)]  # running sums of the losses
    steps = [losses[0]] + [b - a for a, b in zip(losses, losses[1:])]
    value, params, _ = unroll(tx, task, 5, objective="log")
    assert value.item() == pytest.approx(sum(map(math.log, steps)) / 5, rel=1e-12)
    torch.testing.assert_close(params, unroll(tx, task, 5)[1], rtol=0, atol=0)
    learner = MetaLearner("MomentumMemory", lr=0.01, momentum=0.5)
    trainer = MetaTrainer(learner, Quadratic, unroll=10, truncation=5, meta_lr=0.1, objective="log")
    first = trainer.step()["meta_loss"]
    for _ in range(30):
        last = trainer.step()["meta_loss"]
    assert last < first - 0.5


def test_memory_init_learns_from_the_first_segment_only_when_truncated():
    """The optimizer state (DeepMomentum's memory) is detached between segments: a later segment's
    loss has no gradient for ``memory_init`` (its decay and step size still get one), while a full
    unroll of the same steps has."""
    task = Quadratic(torch.Generator().manual_seed(1))
    learner = MetaLearner("DeepMomentum", lr=0.05, momentum=0.9, inner_lr=0.1, hidden=4)
    _, params, state = unroll(learner.transformation(), task, 3)
    params, state = _detach(params), _detach(state)  # what MetaTrainer does between segments
    unroll(learner.transformation(), task, 3, params, state, start=3)[0].backward()
    assert learner.raw["memory_init_w1"].grad is None and learner.raw["inner_lr"].grad.abs() > 0
    learner.zero_grad()
    unroll(learner.transformation(), task, 6)[0].backward()
    assert learner.raw["memory_init_w1"].grad.abs().sum() > 0
