"""A whole training step replayed as one CUDA graph: the fast way to train a memory LM on a GPU.

An eager training step of a memory language model issues well over a thousand small kernels, and
the host's time to launch them, not the GPU's work, sets its length (on an H200 at dim 384, depth 6,
32 x 256 tokens: TitansLM ~45-60 ms eager against ~20 ms of GPU work). Captured once as a CUDA graph
and replayed, the step costs the GPU's time only. :func:`graphed_step` does the capture the way
torch's CUDA-graph notes describe for a whole network: ``warmup`` ordinary steps on a side stream
(real training steps on the example batch: pass the first batch), then one step
(``zero_grad(set_to_none=True)``, loss, ``backward``, optional gradient clipping, ``optimizer.step``)
captured, its inputs in static buffers. Each call copies the batch in and replays the graph.

What the graph fixes, and the checks that follow from it:

- shapes, dtypes and the device of the batch: a batch that differs raises a ValueError (build one
  step per shape, e.g. one for a shorter last batch, or drop it);
- every Python-side decision of the step, so a float learning rate would be baked in and a
  scheduler's later changes ignored: each param group's ``lr`` must be a tensor
  (``torch.optim.AdamW(params, lr=torch.tensor(1e-3, device="cuda"), capturable=True, fused=True)``;
  fused: one kernel group for the optimizer step, where the foreach one replays many small
  kernels), which torch's schedulers update in place; torch optimizers that have a ``capturable``
  flag must be built with it on;
- mixed precision goes inside ``loss_fn`` as ``torch.autocast(..., cache_enabled=False)`` (torch's
  rule for autocast under graph capture);
- host synchronisation is not allowed inside a capture, so the layers' value checks are off while
  capturing; the token range of an nl_layers language model is checked on each call instead (one
  synchronisation, as in eager mode; ``check_inputs=False`` skips it).

Slow levels (``periods``: parameter name -> update period C, e.g. ``model.level_spec()``): a
parameter of period C accumulates its gradient and is stepped only at steps t with t % C == 0,
with the chunk's mean (``reduce="sum"``: its sum), as ``deepopt.lightning.PeriodicGradients`` does in an
eager loop (on held steps its ``.grad`` is None, so the optimizer leaves it and its state alone).
Which levels step is a Python decision, so there is one graph per distinct set of stepping levels
(periods 1, 4, 16: three), each in its own memory pool; a set's first occurrence runs eagerly (it
creates the optimizer state of the levels it steps), its second is captured, later ones replay.
Every slow parameter must get a gradient at every step.

On the CPU (a batch not on CUDA) the same function returns the eager step, so one training loop
runs on both. Optimizers: torch's (AdamW, Adam, SGD, ... with tensor learning rates). deepopt's
optimizers read their learning rate and their skipped-step flag on the host at each step, which a
replayed graph would freeze: they are refused here (:func:`~nl_layers.graphed_loss` graphs only the
forward and backward and leaves the step to them).

Example (the CPU gives the eager step; on a GPU the same lines capture and replay):
    >>> import torch, nl_layers
    >>> lm = nl_layers.TitansLM(vocab_size=16, dim=16, depth=1, heads=2)
    >>> opt = torch.optim.AdamW(lm.parameters(), lr=torch.tensor(1e-3))
    >>> batch = torch.randint(0, 16, (2, 9))
    >>> step = nl_layers.graphed_step(lm, opt, batch)
    >>> loss = step(batch)       # the step's loss (a new tensor each call)
    >>> loss.shape
    torch.Size([])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ._checks import check_positive_int, check_tokens, value_checks


def _as_tuple(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise unless the optimizer's step can be captured and still follows a scheduler."""
    if type(optimizer).__module__.split(".")[0] == "deepopt":
        raise ValueError(
            f"graphed_step: {type(optimizer).__name__} reads its learning rate and skipped-step flag on the host at "
            "each step, which a CUDA graph would freeze; graph only the model's forward and backward with "
            "nl_layers.graphed_loss(model, example) and step it eagerly, or use a torch optimizer here"
        )
    for i, group in enumerate(optimizer.param_groups):
        if "capturable" in optimizer.defaults and not group.get("capturable", False):
            raise ValueError(
                f"graphed_step: param group {i} of {type(optimizer).__name__} has capturable=False; build the "
                f"optimizer with capturable=True (e.g. torch.optim.AdamW(params, lr=torch.tensor(1e-3, device='cuda'), "
                "capturable=True)) so that its step can be captured in a CUDA graph"
            )
        if not isinstance(group.get("lr"), torch.Tensor):
            raise ValueError(
                f"graphed_step: param group {i} has a float lr ({group.get('lr')!r}), which the CUDA graph would bake "
                "in (a scheduler's later changes would be ignored); pass the learning rate as a tensor, "
                "e.g. lr=torch.tensor(1e-3, device='cuda'), which schedulers update in place"
            )


def _check_batch(batch: tuple, static: tuple, who: str = "graphed_step") -> None:
    if len(batch) != len(static):
        raise ValueError(f"{who}: captured for {len(static)} input tensor(s), got {len(batch)}")
    for i, (x, s) in enumerate(zip(batch, static)):
        if not isinstance(x, torch.Tensor) or x.shape != s.shape or x.dtype != s.dtype:
            got = (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{who}: input {i} must match the captured example, shape {tuple(s.shape)} and dtype {s.dtype}; "
                f"got {got}. A CUDA graph replays fixed shapes: capture once per batch shape (or drop a short "
                "last batch)"
            )


def _slow_levels(model: nn.Module, periods, reduce: str) -> list[tuple[str, torch.Tensor, int, torch.Tensor]]:
    """(name, parameter, period, accumulator) of every parameter with a period > 1."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"graphed_step: reduce must be 'mean' or 'sum', got {reduce!r}")
    if not periods:
        return []
    params = dict(model.named_parameters())
    unknown = [n for n in periods if n not in params]
    if unknown:
        raise ValueError(f"graphed_step: periods names parameters the model does not have: {unknown[:3]} (use the "
                         "names of model.named_parameters(), e.g. periods=model.level_spec())")
    slow = []
    for name, period in periods.items():
        check_positive_int(period, f"periods[{name!r}]")
        if period > 1:
            p = params[name]
            slow.append((name, p, period, torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))))
    return slow


def graphed_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    example,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    *,
    max_norm: float | None = None,
    warmup: int = 3,
    check_inputs: bool = True,
    periods: Mapping[str, int] | None = None,
    reduce: str = "mean",
) -> Callable[..., torch.Tensor]:
    """The training step of ``model`` with ``optimizer``, as one CUDA graph (module doc).

    Args:
        model: the model to train (its parameters are the optimizer's).
        optimizer: a torch optimizer whose groups have tensor learning rates (and ``capturable=True``
            where it has that flag).
        example: a tensor, or a tuple of tensors, shaped and typed like every later batch (for a
            language model, token ids (batch, time + 1)); ``warmup`` real steps run on it.
        loss_fn: ``loss_fn(model, *batch)`` -> scalar loss; default ``model.loss(*batch)``.
        max_norm: clip the gradients' total norm to this before the step (inside the graph).
        warmup: eager steps before the capture (torch's notes use 3; more under DDP).
        check_inputs: check token ids against ``model.vocab_size`` on each call (one synchronisation).
        periods: parameter name -> update period (slow levels, module doc); None or all 1: every
            parameter every step.
        reduce: "mean" (the CMS rule) or "sum" of a slow level's accumulated gradients.

    Returns:
        ``step(*batch)`` -> the loss of that batch (a new tensor, detached). On CUDA its attribute
        ``warmup_losses`` holds the warm-up steps' losses and ``graphs`` the captured graphs.
    """
    check_positive_int(warmup, "warmup")
    example = _as_tuple(example)
    loss_fn = loss_fn if loss_fn is not None else (lambda m, *b: m.loss(*b))
    vocab = getattr(model, "vocab_size", None) if check_inputs else None
    slow = _slow_levels(model, periods, reduce)
    level_periods = sorted({c for _, _, c, _ in slow})
    count = [0]  # optimizer steps taken through this function

    def stepping() -> frozenset:  # the slow periods that the next step updates
        count[0] += 1
        return frozenset(c for c in level_periods if count[0] % c == 0)

    def body(steps: frozenset, *batch):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, *batch)
        loss.backward()
        if max_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
        for name, p, period, acc in slow:  # held: .grad None; at the boundary: the chunk's mean (or sum)
            if p.grad is None:
                raise ValueError(f"graphed_step: the slow parameter {name!r} got no gradient; every parameter "
                                 "with a period > 1 must get one at every step")
            acc.add_(p.grad)
            if period in steps:
                p.grad = (acc / period if reduce == "mean" else acc.clone()).to(p.dtype)
                acc.zero_()
            else:
                p.grad = None
        optimizer.step()
        return loss.detach()

    if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in example):  # the CPU: the eager step

        def eager(*batch):
            return body(stepping(), *(_as_tuple(batch[0]) if len(batch) == 1 else batch))

        return eager

    _check_optimizer(optimizer)
    static = tuple(t.detach().clone() for t in example)
    if vocab is not None and static[0].dtype in (torch.int64, torch.int32):
        check_tokens(static[0], vocab, "example")
    graphs: dict[frozenset, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
    seen: set[frozenset] = set()  # step kinds run eagerly at least once (their optimizer state exists)
    side = torch.cuda.Stream()

    def run_eagerly(steps: frozenset, batch: tuple) -> torch.Tensor:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), value_checks(False):
            loss = body(steps, *batch)
        torch.cuda.current_stream().wait_stream(side)
        seen.add(steps)
        return loss

    def capture(steps: frozenset) -> None:
        graph = torch.cuda.CUDAGraph()
        with value_checks(False), torch.cuda.graph(graph):  # no host synchronisation in a capture
            graphs[steps] = (graph, body(steps, *static))

    warmup_losses = [run_eagerly(stepping(), static) for _ in range(warmup)]
    for steps in sorted(seen, key=len):
        capture(steps)

    def replay(*batch):
        batch = _as_tuple(batch[0]) if len(batch) == 1 else batch
        _check_batch(batch, static)
        if vocab is not None and batch[0].dtype in (torch.int64, torch.int32):
            check_tokens(batch[0], vocab)
        steps = stepping()
        if steps not in graphs and steps not in seen:
            return run_eagerly(steps, batch).clone()
        if steps not in graphs:
            capture(steps)
        for s, x in zip(static, batch):
            s.copy_(x, non_blocking=True)
        graph, static_loss = graphs[steps]
        graph.replay()
        return static_loss.clone()

    replay.warmup_losses = warmup_losses  # the warm-up steps' losses (real steps on the example)
    replay.graphs = graphs  # one per set of stepping levels (for users who want to inspect or reset them)
    replay.graph = graphs.get(frozenset(), (None,))[0]  # the every-step graph
    return replay


__all__: Sequence[str] = ("graphed_step",)
