"""graphed_step: the eager fallback equals a hand-written loop; on CUDA the replayed graph equals
the eager step, follows the learning-rate tensor (schedulers) and refuses what it cannot replay."""

import copy

import pytest
import torch

import nl_layers
from nl_layers.graphed import _check_batch, _check_optimizer

CUDA = torch.cuda.is_available()


def _lm(device="cpu"):
    torch.manual_seed(0)
    return nl_layers.TitansLM(vocab_size=16, dim=16, depth=1, heads=2).to(device)


def _batches(n, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 16, (2, 9), generator=g).to(device) for _ in range(n)]


def _manual(model, opt, batches, max_norm=None, levels=None, reduce="mean"):
    """The eager loop; with ``levels``, deepopt's PeriodicGradients before each step (the
    reference of graphed_step's periods)."""
    from deepopt.lightning import PeriodicGradients

    periodic = PeriodicGradients(model.named_parameters(), levels, reduce) if levels else None
    losses = []
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss = model.loss(b)
        loss.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
        if periodic is not None:
            periodic.before_step()
        opt.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_cpu_step_is_the_eager_loop(max_norm):
    a, b = _lm(), _lm()
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    batches = _batches(3)
    step = nl_layers.graphed_step(a, opt_a, batches[0], max_norm=max_norm)
    got = [step(x) for x in batches]
    want = _manual(b, opt_b, batches, max_norm)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def _hope(device="cpu"):
    torch.manual_seed(0)
    return nl_layers.HopeLM(vocab_size=16, dim=16, depth=1, heads=2, cms_periods=(1, 2, 4)).to(device)


@pytest.mark.parametrize("reduce, max_norm", [("mean", None), ("sum", 0.05)])
def test_cpu_step_with_slow_levels_is_the_periodic_loop(reduce, max_norm):
    """periods (HOPE's CMS levels of periods 1, 2, 4): the step equals the eager loop with
    PeriodicGradients, bit for bit, across several boundaries."""
    a, b = _hope(), _hope()
    levels = a.level_spec()
    assert sorted(set(levels.values())) == [1, 2, 4]
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    batches = _batches(9)
    step = nl_layers.graphed_step(a, opt_a, batches[0], periods=levels, reduce=reduce, max_norm=max_norm)
    got = [step(x) for x in batches]
    want = _manual(b, opt_b, batches, max_norm, levels, reduce)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    slow = [n for n, c in levels.items() if c == 4]
    assert all(len(opt_a.state[dict(a.named_parameters())[n]]) for n in slow)  # stepped at 4 and 8


def test_bad_periods_name_the_fix():
    model = _hope()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="named_parameters"):
        nl_layers.graphed_step(model, opt, _batches(1)[0], periods={"no.such.weight": 2})
    with pytest.raises(ValueError, match="periods"):
        nl_layers.graphed_step(model, opt, _batches(1)[0], periods={next(iter(model.level_spec())): 0})
    with pytest.raises(ValueError, match="reduce"):
        nl_layers.graphed_step(model, opt, _batches(1)[0], reduce="max")


def test_loss_fn_and_tuple_batches():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    ref = copy.deepcopy(model)
    opt, opt_ref = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    mse = lambda m, x, y: torch.nn.functional.mse_loss(m(x), y)  # noqa: E731
    step = nl_layers.graphed_step(model, opt, (x, y), mse)
    loss = step(x, y)
    loss2 = step((x, y))
    opt_ref.zero_grad()
    want = mse(ref, x, y)
    want.backward()
    opt_ref.step()
    torch.testing.assert_close(loss, want.detach())
    assert loss2 < loss


def test_bad_arguments_name_the_fix():
    model = _lm()
    with pytest.raises(ValueError, match="warmup"):
        nl_layers.graphed_step(model, torch.optim.AdamW(model.parameters()), _batches(1)[0], warmup=0)
    with pytest.raises(ValueError, match=r"float lr .*lr=torch.tensor"):
        _check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="capturable=True"):
        _check_optimizer(torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.1)))
    _check_optimizer(torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.1), capturable=True))
    import deepopt
    with pytest.raises(ValueError, match="graphed_loss"):
        _check_optimizer(deepopt.AdamMemory(model.parameters(), lr=torch.tensor(0.1)))
    static = (torch.zeros(2, 9, dtype=torch.long),)
    with pytest.raises(ValueError, match=r"shape \(2, 9\).*capture once per batch shape"):
        _check_batch((torch.zeros(2, 5, dtype=torch.long),), static)
    with pytest.raises(ValueError, match="1 input tensor"):
        _check_batch((static[0], static[0]), static)


def _cuda_pair():
    a, b = _lm("cuda"), _lm("cuda")
    lr = lambda: torch.tensor(1e-2, device="cuda")  # noqa: E731
    opt_a = torch.optim.AdamW(a.parameters(), lr=lr(), capturable=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=lr(), capturable=True)
    return a, b, opt_a, opt_b


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_cuda_graph_equals_eager(max_norm):
    a, b, opt_a, opt_b = _cuda_pair()
    batches = _batches(4, "cuda")
    step = nl_layers.graphed_step(a, opt_a, batches[0], max_norm=max_norm, warmup=3)
    got = [step(x) for x in batches]
    want = _manual(b, opt_b, [batches[0]] * 3 + batches, max_norm)[3:]  # the warm-up trains on the example
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_follows_the_lr_tensor_and_checks_batches():
    a, b, opt_a, opt_b = _cuda_pair()
    batches = _batches(2, "cuda")
    step = nl_layers.graphed_step(a, opt_a, batches[0])
    _manual(b, opt_b, [batches[0]] * 3)  # the warm-up's steps
    for opt in (opt_a, opt_b):  # a scheduler halves both rates in place; a baked-in rate would not follow
        torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5)
    assert float(opt_a.param_groups[0]["lr"]) == pytest.approx(5e-3)
    step(batches[1])
    _manual(b, opt_b, [batches[1]])
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        step(batches[0][:, :5])
    with pytest.raises(ValueError, match="tokens must lie"):
        step(torch.full_like(batches[0], 16))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("warmup", [1, 3])
def test_cuda_graphs_with_slow_levels_equal_the_periodic_loop(warmup):
    """One graph per set of stepping levels (periods 1, 2, 4: three), each set's first occurrence
    eager: the replayed steps equal the eager loop with PeriodicGradients."""
    a, b = _hope("cuda"), _hope("cuda")
    levels = a.level_spec()
    lr = lambda: torch.tensor(1e-2, device="cuda")  # noqa: E731
    opt_a = torch.optim.AdamW(a.parameters(), lr=lr(), capturable=True, fused=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=lr(), capturable=True, fused=True)
    batches = _batches(12, "cuda")
    step = nl_layers.graphed_step(a, opt_a, batches[0], periods=levels, warmup=warmup)
    got = [step(x) for x in batches]
    want = _manual(b, opt_b, [batches[0]] * warmup + batches, levels=levels)  # the warm-up trains on the example
    torch.testing.assert_close(torch.stack(step.warmup_losses), torch.stack(want[:warmup]), rtol=1e-5, atol=1e-6)
    want = want[warmup:]
    assert len(step.graphs) == 3
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
