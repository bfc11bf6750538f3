"""A model's loss with its forward and backward replayed as CUDA graphs, inside an ordinary loop.

:func:`~nl_layers.graphed_step` captures the whole training step, optimizer included, which needs a
capturable torch optimizer with tensor learning rates. :func:`graphed_loss` captures only the
model's part, the forward to the loss and the backward to the parameters' gradients, and leaves
everything after ``loss.backward()`` eager: any optimizer (deepopt's included), gradient clipping,
``deepopt.lightning.PeriodicGradients``, gradient accumulation, logging. A memory LM's eager step is
bound by the host's launches of its many small kernels (module doc of ``nl_layers.graphed``); with
its forward and backward replayed, the host launches two graphs and the optimizer.

    loss_of = nl_layers.graphed_loss(model, first_batch)
    loss = loss_of(batch)    # copies the batch into the captured input, replays the forward graph
    loss.backward()          # replays the backward graph; the gradients reach .grad as usual

How (torch's recipe for part of a network, as ``torch.cuda.make_graphed_callables``): ``warmup``
forward and backward passes on a side stream (``torch.autograd.grad``: nothing reaches ``.grad``),
then the forward captured into one graph and ``torch.autograd.grad(loss, parameters)`` into a
second, sharing a memory pool; an autograd Function replays them. Unlike
``make_graphed_callables`` it hands autograd *new* gradient tensors, copied out of the graph's
static buffers in one multi-tensor call: returning the static buffers themselves lets ``.grad``
alias them, and a second backward before ``zero_grad`` (gradient accumulation) then overwrites
the first one's gradient and adds the new one twice (pytorch/pytorch#181723). The returned loss is
a copy as well, so a kept loss is never overwritten by a later replay.

Falls back to the eager ``loss_fn(model, *batch)`` where a graph cannot stand in for it: on the
CPU (the returned function is the eager loss, so one loop runs on both), with gradients disabled,
when ``model.training`` differs from its value at the capture (evaluation in ``model.eval()`` runs
eagerly), and for a call made while the previous replay's backward has not run yet (the graph
holds one set of activations: ``loss_of(a) + loss_of(b)`` replays ``a`` and computes ``b``
eagerly; a loss dropped without backward frees its turn; a backward after a later replay raises).

What the graphs fix, as for :func:`graphed_step`: the batch's shapes and dtypes (a different
batch raises a ValueError), every Python-side decision in the forward, and the
parameters' storage (optimizers update them in place, as torch's and deepopt's do; ``model.to``
or reassigning a parameter afterwards needs a new capture). The layers' value checks (host
synchronisations) are off in the graphs; an nl_layers language model's token range is checked on
each call (``check_inputs=False`` skips it). Mixed precision goes inside ``loss_fn`` as
``torch.autocast(..., cache_enabled=False)``.

Example (the CPU gives the eager loss; on a GPU the same lines capture and replay):
    >>> import torch, nl_layers, deepopt
    >>> lm = nl_layers.HopeLM(vocab_size=16, dim=16, depth=1, heads=2)
    >>> opt = deepopt.MomentumMemory(lm.parameters(), lr=1e-2)
    >>> batch = torch.randint(0, 16, (2, 9))
    >>> loss_of = nl_layers.graphed_loss(lm, batch)
    >>> opt.zero_grad(); loss = loss_of(batch); loss.backward(); opt.step()
    >>> loss.shape, all(p.grad is not None for p in lm.parameters())
    (torch.Size([]), True)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from ._checks import check_positive_int, check_tokens, value_checks
from .graphed import _as_tuple, _check_batch

_WHO = "graphed_loss"


def _eager_loss(model: nn.Module, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def eager(*batch):
        return loss_fn(model, *(_as_tuple(batch[0]) if len(batch) == 1 else batch))

    return eager


def graphed_loss(
    model: nn.Module,
    example,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    *,
    warmup: int = 3,
    check_inputs: bool = True,
) -> Callable[..., torch.Tensor]:
    """``model``'s loss as replayed CUDA graphs of its forward and backward (module doc).

    Args:
        model: the model; its parameters that require grad receive the gradients.
        example: a tensor, or a tuple of tensors, shaped and typed like every later batch (for a
            language model, token ids (batch, time + 1)); ``warmup`` forward and backward passes run
            on it (no parameter changes, nothing reaches ``.grad``).
        loss_fn: ``loss_fn(model, *batch)`` -> scalar loss; default ``model.loss(*batch)``.
        warmup: forward and backward passes before the capture (torch's notes use 3).
        check_inputs: check token ids against ``model.vocab_size`` on each call (one synchronisation).

    Returns:
        ``loss_of(*batch)`` -> the scalar loss of that batch (a new tensor with a ``grad_fn``: call
        ``backward`` on it, or on anything computed from it). On CUDA its attributes ``graphs``
        hold the (forward, backward) graphs.
    """
    check_positive_int(warmup, "warmup")
    example = _as_tuple(example)
    loss_fn = loss_fn if loss_fn is not None else (lambda m, *b: m.loss(*b))
    if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in example):  # the CPU: the eager loss
        return _eager_loss(model, loss_fn)
    return _replayed(model, example, loss_fn, warmup, check_inputs, _cuda_graphs)


class _Captured(NamedTuple):
    """What a capture leaves: replays that rewrite the static loss (forward) and, from the static
    output gradient, the static parameter gradients (backward; None where a parameter is unused)."""

    forward: Callable[[], None]
    backward: Callable[[], None]
    loss: torch.Tensor
    dloss: torch.Tensor
    grads: tuple
    graphs: tuple


def _cuda_graphs(model, loss_fn, static: tuple, params: tuple, warmup: int) -> _Captured:
    """torch's recipe: warm-up passes on a side stream, then the forward and the backward captured
    into two graphs sharing one memory pool (no host synchronisation inside: value checks off)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), value_checks(False):
        for _ in range(warmup):
            loss = loss_fn(model, *static)
            _check_loss(loss)
            torch.autograd.grad(loss, params, allow_unused=True)
        del loss
    torch.cuda.current_stream().wait_stream(side)
    fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with value_checks(False):
        with torch.cuda.graph(fwd):
            static_loss = loss_fn(model, *static)
        static_dloss = torch.empty_like(static_loss)
        with torch.cuda.graph(bwd, pool=fwd.pool()):
            grads = torch.autograd.grad(static_loss, params, grad_outputs=static_dloss, allow_unused=True)
    return _Captured(fwd.replay, bwd.replay, static_loss, static_dloss, grads, (fwd, bwd))


def _emulated_graphs(model, loss_fn, static: tuple, params: tuple, warmup: int) -> _Captured:
    """The same contract without CUDA (for tests of the replay logic on a CPU): each "replay"
    recomputes into the same static buffers, which is what a graph's replay does."""
    live = {}
    loss = loss_fn(model, *static)
    _check_loss(loss)
    static_loss, static_dloss = loss.detach().clone(), torch.empty_like(loss)
    grads = tuple(None if g is None else g.detach().clone()
                  for g in torch.autograd.grad(loss, params, allow_unused=True))

    def forward():
        with torch.enable_grad():
            live["loss"] = loss_fn(model, *static)
        static_loss.copy_(live["loss"].detach())

    def backward():
        new = torch.autograd.grad(live.pop("loss"), params, grad_outputs=static_dloss, allow_unused=True)
        for g, n in zip(grads, new):
            if g is not None:
                g.copy_(n)

    return _Captured(forward, backward, static_loss, static_dloss, grads, ())


def _replayed(model, example: tuple, loss_fn, warmup: int, check_inputs: bool, capture) -> Callable[..., torch.Tensor]:
    """graphed_loss's function around ``capture``'s replays (the module doc's rules)."""
    params = tuple(p for p in model.parameters() if p.requires_grad)
    if not params:
        raise ValueError(f"{_WHO}: the model has no parameter that requires grad; nothing to differentiate")
    vocab = getattr(model, "vocab_size", None) if check_inputs else None
    static = tuple(t.detach().clone() for t in example)
    if vocab is not None and static[0].dtype in (torch.int64, torch.int32):
        check_tokens(static[0], vocab, "example")
    cap = capture(model, loss_fn, static, params, warmup)
    used = [i for i, g in enumerate(cap.grads) if g is not None]
    used_grads = [cap.grads[i] for i in used]
    training = model.training
    latest = {"replay": 0, "token": None}  # the last replay's number and a weak reference to its token

    class _Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, token, replay, *_params):
            ctx.token, ctx.replay = token, replay
            cap.forward()
            return cap.loss.detach().clone()

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, dloss):
            if ctx.replay != latest["replay"]:
                raise RuntimeError(f"{_WHO}: a later call replayed the forward graph over this loss's activations; "
                                   "call backward on a loss before computing the next one with the same function")
            ctx.token.done = True
            cap.dloss.copy_(dloss)
            cap.backward()
            out: list[torch.Tensor | None] = [None, None] + [None] * len(params)
            for i, g in zip(used, torch._foreach_mul(used_grads, 1.0)):  # new tensors: .grad never aliases the graph
                out[2 + i] = g
            return tuple(out)

    eager = _eager_loss(model, loss_fn)

    def loss_of(*batch):
        pending = latest["token"]() if latest["token"] is not None else None
        if not torch.is_grad_enabled() or model.training != training or (pending is not None and not pending.done):
            return eager(*batch)  # (a replay still awaiting its backward keeps the graph's activations)
        batch = _as_tuple(batch[0]) if len(batch) == 1 else batch
        _check_batch(batch, static, _WHO)
        if vocab is not None and batch[0].dtype in (torch.int64, torch.int32):
            check_tokens(batch[0], vocab)
        for s, x in zip(static, batch):
            if s.data_ptr() != x.data_ptr():
                s.copy_(x, non_blocking=True)
        token = _Token()
        latest["replay"] += 1
        latest["token"] = weakref.ref(token)
        return _Replay.apply(token, latest["replay"], *params)

    loss_of.graphs = cap.graphs
    return loss_of


class _Token:
    """Lives as long as a replay's autograd node; ``done`` once its backward has run."""

    __slots__ = ("done", "__weakref__")

    def __init__(self) -> None:
        self.done = False


def _check_loss(loss) -> None:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.requires_grad:
        got = f"shape {tuple(loss.shape)}, requires_grad={loss.requires_grad}" if isinstance(loss, torch.Tensor) \
            else type(loss).__name__
        raise ValueError(f"{_WHO}: loss_fn must return a scalar tensor that requires grad, got {got}")


__all__: Sequence[str] = ("graphed_loss",)
