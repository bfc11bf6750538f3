"""graphed_loss: on the CPU the eager loss; the replayed forward and backward (CUDA graphs on a GPU,
their emulation on the CPU: each replay rewrites the same static buffers) give the eager loss and
gradients step after step with any optimizer, accumulate like eager autograd, keep returned
losses, fall back to eager in eval, under no_grad and while a replay awaits its backward, and
refuse what they cannot replay."""

import copy

import pytest
import torch

import nl_layers
from nl_layers.graphed_loss import _emulated_graphs, _replayed

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])]


def _lm(device="cpu", cls=nl_layers.TitansLM):
    torch.manual_seed(0)
    return cls(vocab_size=16, dim=16, depth=1, heads=2).to(device)


def _batches(n, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 16, (2, 9), generator=g).to(device) for _ in range(n)]


def _graphed(model, example, loss_fn=None):
    """The real capture on CUDA; on the CPU the same replay logic over emulated graphs."""
    if example.is_cuda:
        return nl_layers.graphed_loss(model, example, loss_fn)
    return _replayed(model, (example,), loss_fn or (lambda m, *b: m.loss(*b)), 3, True, _emulated_graphs)


def _train(model, opt, batches, loss_of):
    losses = []
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(b)
        loss.backward()
        opt.step()
        losses.append(loss)
    return losses


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_gives_the_eager_loss_and_its_gradients():
    model, batch = _lm(), _batches(1)[0]
    twin = copy.deepcopy(model)
    loss_of = nl_layers.graphed_loss(model, batch)
    loss = loss_of(batch)
    loss.backward()
    want = twin.loss(batch)
    want.backward()
    assert torch.equal(loss, want)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    with pytest.raises(ValueError, match="warmup"):
        nl_layers.graphed_loss(model, batch, warmup=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls, optimizer", [(nl_layers.TitansLM, "AdamW"), (nl_layers.HopeLM, "MomentumMemory")])
def test_replays_equal_the_eager_steps(device, cls, optimizer):
    import deepopt

    make = (lambda ps: torch.optim.AdamW(ps, lr=1e-2)) if optimizer == "AdamW" else \
        (lambda ps: deepopt.MomentumMemory(ps, lr=1e-2))
    model = _lm(device, cls)
    twin = copy.deepcopy(model)
    batches = _batches(5, device)
    loss_of = _graphed(model, batches[0])
    got = _train(model, make(model.parameters()), batches, loss_of)
    want = _train(twin, make(twin.parameters()), batches, twin.loss)
    for a, b in zip(got, want):  # every kept loss is its own step's (a copy, not the graph's buffer)
        _close(a, b)
    assert len({float(x.detach()) for x in got}) == len(got)
    for p, q in zip(model.parameters(), twin.parameters()):
        _close(p, q)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_accumulate_like_eager_autograd(device):
    model = _lm(device)
    twin = copy.deepcopy(model)
    a, b = _batches(2, device)
    loss_of = _graphed(model, a)
    (loss_of(a) + 0.5 * loss_of(b)).backward()  # b while a awaits its backward: b runs eagerly
    loss_of(b).backward()  # a second backward onto the same .grad (make_graphed_callables would double it)
    (twin.loss(a) + 0.5 * twin.loss(b)).backward()
    twin.loss(b).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        _close(p.grad, q.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_a_dropped_loss_frees_the_graph_and_a_stale_backward_is_refused(device):
    model = _lm(device)
    a, b = _batches(2, device)
    loss_of = _graphed(model, a)
    loss_of(a)  # dropped without backward: the next call replays again
    kept = loss_of(a)
    assert kept.grad_fn is not None and "Replay" in type(kept.grad_fn).__name__
    kept.backward(retain_graph=True)
    later = loss_of(b)  # replays over kept's activations
    with pytest.raises(RuntimeError, match="a later call replayed the forward graph"):
        kept.backward()
    later.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_eval_and_no_grad_run_eagerly_and_bad_inputs_are_refused(device):
    model = _lm(device)
    batch = _batches(1, device)[0]
    loss_of = _graphed(model, batch)
    with torch.no_grad():
        _close(loss_of(batch), model.loss(batch))
    model.eval()
    with torch.no_grad():
        want = model.loss(batch)
    got = loss_of(batch)
    assert "Replay" not in type(got.grad_fn).__name__
    _close(got.detach(), want)
    model.train()
    with pytest.raises(ValueError, match=r"graphed_loss: input 0 must match the captured example"):
        loss_of(batch[:1])
    with pytest.raises(ValueError, match="scalar tensor that requires grad"):
        _graphed(model, batch, loss_fn=lambda m, b: m(b[:, :-1]))
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        _graphed(model.requires_grad_(False), batch)
