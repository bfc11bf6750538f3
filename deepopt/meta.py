"""Learnable memories: meta-learn an optimizer's levels by truncated unrolled differentiation.

The optimizer's own memory is a learner: DeepMomentum's memory network learns from the gradient
stream within one run; one level up, the *initial* memory, the inner step size, the momentum decays
and M3's level mixing weight can be learned across many runs. :class:`MetaLearner` holds those
learnable parts as unconstrained ``nn.Parameter`` s (decays through a sigmoid, step sizes through
an exponential) and builds the functional optimizer (:mod:`deepopt.functional`) from them, so a
loss after K inner steps is differentiable with respect to them. :class:`MetaTrainer` runs

    for each outer step:  sample a task; run ``unroll`` inner steps in segments of ``truncation``;
        after each segment: meta-loss = mean inner loss of the segment (``objective="log"``: mean
        log inner loss), backward, then detach the
        inner parameters and optimizer state (truncation: memory does not grow with ``unroll``
        and is the same at every outer step); optionally ``sync`` the meta-gradient (e.g. its mean
        over processes, each with its own tasks); clip its norm; one Adam step (skipped, and
        counted, if the meta-gradient is not finite: an inner run that diverged).

A task is any object with ``params`` (the initial ``{name: tensor}``) and
``loss(params, step) -> scalar`` (pure; the mini-batch may depend on ``step``).

The result is an ordinary optimizer: ``learner.optimizer(model.parameters())`` is the
``torch.optim`` class with the learned values, and its ``state_dict()`` (the memory
initialization is a param-group key) loads into a fresh instance of that class.

Example:
    >>> import torch
    >>> from deepopt.meta import MetaLearner, MetaTrainer
    >>> class Quadratic:
    ...     def __init__(self, g):
    ...         self.scale = torch.rand(4, generator=g) * 3 + 0.1
    ...         self.params = {"w": torch.randn(4, generator=g)}
    ...     def loss(self, params, step):
    ...         return (self.scale * params["w"] ** 2).sum()
    >>> learner = MetaLearner("DeepMomentum", lr=0.05, momentum=0.9, inner_lr=0.1)
    >>> trainer = MetaTrainer(learner, Quadratic, unroll=8, truncation=4, meta_lr=1e-2)
    >>> stats = trainer.step()
    >>> sorted(stats)
    ['grad_norm', 'graph_nodes', 'meta_loss', 'skipped']
    >>> opt = learner.optimizer([torch.nn.Parameter(torch.zeros(3))])
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
from torch import Tensor, nn
from torch.func import grad_and_value

from . import functional as F
from .levels.deep import default_memory_init
from .optim.base import LevelOptimizer
from .optim.registry import OPTIMIZERS

__all__ = ["LEARNABLE", "OBJECTIVES", "MetaLearner", "MetaTrainer", "Task", "unroll"]

#: What can be learned per optimizer, and how each value is parametrized:
#: "unit" in (0, 1) by a sigmoid, "positive" by an exponential, "free" as is.
LEARNABLE: dict[str, dict[str, str]] = {
    "DeepMomentum": {"memory_init": "free", "inner_lr": "positive", "momentum": "unit", "lr": "positive"},
    "MomentumMemory": {"momentum": "unit", "lr": "positive"},
    "DeltaMomentum": {"momentum": "unit", "delta": "unit", "lr": "positive"},
    "M3": {"alpha": "free", "beta1": "unit", "beta3": "unit", "lr": "positive"},
}
_DEFAULT_LEARN = {"DeepMomentum": ("memory_init", "inner_lr", "momentum"), "MomentumMemory": ("momentum",),
                  "DeltaMomentum": ("momentum", "delta"), "M3": ("alpha", "beta1", "beta3")}


class Task(Protocol):
    """One training run to differentiate through: initial ``params`` and a pure ``loss``."""

    params: Mapping[str, Tensor]

    def loss(self, params: Mapping[str, Tensor], step: int) -> Tensor: ...


def _to_raw(value: float, kind: str) -> float:
    if kind == "unit":
        if not 0.0 < value < 1.0:
            raise ValueError(f"a learnable decay must start in (0, 1), got {value!r}")
        return math.log(value / (1.0 - value))
    if kind == "positive":
        if not value > 0.0:
            raise ValueError(f"a learnable step size must start > 0, got {value!r}")
        return math.log(value)
    return value


def _from_raw(raw: Tensor, kind: str) -> Tensor:
    return torch.sigmoid(raw) if kind == "unit" else raw.exp() if kind == "positive" else raw


class MetaLearner(nn.Module):
    """The learnable parts of one optimizer's levels, as unconstrained parameters.

    Args:
        optimizer: ``"DeepMomentum"`` (default), ``"MomentumMemory"``, ``"DeltaMomentum"`` or ``"M3"``.
        learn: which values to learn (see :data:`LEARNABLE`); default: DeepMomentum's
            ``memory_init``, ``inner_lr`` and ``momentum``; M3's ``alpha`` (slow-level mixing
            weight) and decays ``beta1``, ``beta3``; the momentum decays of the others.
        **hyperparameters: the optimizer's hyperparameters (starting values of the learned ones).

    ``forward()`` returns the hyperparameters (learned ones as differentiable tensors), the
    keyword arguments of both :func:`deepopt.functional.make` and the ``torch.optim`` class.
    """

    def __init__(self, optimizer: str = "DeepMomentum", learn: Iterable[str] | None = None,
                 **hyperparameters: Any) -> None:
        super().__init__()
        if optimizer not in LEARNABLE:
            raise ValueError(f"unknown optimizer {optimizer!r} for meta-learning; use one of {sorted(LEARNABLE)}")
        learn = tuple(_DEFAULT_LEARN[optimizer] if learn is None else learn)
        bad = sorted(set(learn) - set(LEARNABLE[optimizer]))
        if bad or not learn:
            raise ValueError(f"invalid learn={learn!r}: {optimizer} can learn {sorted(LEARNABLE[optimizer])}")
        self.optimizer_name = optimizer
        self.cls: type[LevelOptimizer] = OPTIMIZERS[optimizer]
        self.cls.rule(**hyperparameters)  # validates the names and values
        self.fixed = dict(hyperparameters)
        self.learn = learn
        self.raw = nn.ParameterDict()
        start = self._start_values()
        for name in learn:
            kind = LEARNABLE[optimizer][name]
            if name == "memory_init":
                for k, v in start[name].items():
                    self.raw[f"memory_init_{k}"] = nn.Parameter(v.detach().clone().float())
            else:
                self.raw[name] = nn.Parameter(torch.tensor(_to_raw(float(start[name]), kind)))

    def _start_values(self) -> dict[str, Any]:
        rule = self.cls.rule(**self.fixed)
        out = dict(rule.defaults)
        if self.optimizer_name == "M3":
            betas = self.fixed.get("betas", (0.9, 0.999, 0.99))
            out.update(beta1=betas[0], beta3=betas[2], alpha=self.fixed.get("alpha", 0.5))
        if "memory_init" in self.learn and out.get("memory_init") is None:
            out["memory_init"] = default_memory_init(self.fixed.get("hidden", 8))
        return out

    def forward(self) -> dict[str, Any]:
        """The hyperparameters, learned ones as tensors that carry the meta-gradient."""
        hp = dict(self.fixed)
        kinds = LEARNABLE[self.optimizer_name]
        for name in self.learn:
            if name == "memory_init":
                hp[name] = {k: self.raw[f"memory_init_{k}"] for k in ("w1", "b1", "w2")}
            elif name in ("beta1", "beta3"):
                continue
            else:
                hp[name] = _from_raw(self.raw[name], kinds[name])
        if self.optimizer_name == "M3" and ({"beta1", "beta3"} & set(self.learn)):
            b1, b2, b3 = self.fixed.get("betas", (0.9, 0.999, 0.99))
            b1 = _from_raw(self.raw["beta1"], "unit") if "beta1" in self.learn else b1
            b3 = _from_raw(self.raw["beta3"], "unit") if "beta3" in self.learn else b3
            hp["betas"] = (b1, b2, b3)
        return hp

    def transformation(self) -> F.Transformation:
        """The functional optimizer with the current (differentiable) values."""
        return F.make(self.cls, **self())

    def learned(self) -> dict[str, Any]:
        """The hyperparameters as plain values: floats, and detached tensors for ``memory_init``."""
        def plain(v: Any) -> Any:
            if isinstance(v, Tensor):
                return float(v) if v.ndim == 0 else v.detach().clone()
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, tuple):
                return tuple(plain(x) for x in v)
            return v
        with torch.no_grad():
            return {k: plain(v) for k, v in self().items()}

    def optimizer(self, params: Iterable[Any], **kwargs: Any) -> LevelOptimizer:
        """The ``torch.optim`` class with the learned values (``kwargs`` override, e.g. ``impl``)."""
        return self.cls(params, **{**self.learned(), **kwargs})

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer_name, "learn": list(self.learn)}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        if state.get("optimizer") != self.optimizer_name or tuple(state.get("learn", ())) != self.learn:
            raise ValueError(f"this checkpoint learns {state.get('learn')} of {state.get('optimizer')}, but this "
                             f"MetaLearner learns {list(self.learn)} of {self.optimizer_name}; build a matching one")


def _identity(loss: Tensor) -> Tensor:
    return loss


#: How the inner losses along a run enter the meta-loss (their mean is taken after this):
#: ``"mean"`` the loss itself; ``"log"`` its logarithm (for positive losses: every task then weighs by
#: its relative progress, so halving a small loss counts as much as halving a large one).
OBJECTIVES: dict[str, Callable[[Tensor], Tensor]] = {"mean": _identity, "log": torch.log}


def _objective(name: str) -> Callable[[Tensor], Tensor]:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; use one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def _detach(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, Mapping):
        return {k: _detach(v) for k, v in tree.items()}
    return tree


def unroll(tx: F.Transformation, task: Task, steps: int, params: Mapping[str, Tensor] | None = None,
           state: Any = None, start: int = 0, objective: str = "mean") -> tuple[Tensor, dict[str, Tensor], Any]:
    """Run ``steps`` inner steps; return the mean inner loss (differentiable), params and state.

    Pure: the loss is a function of the task's initial parameters and of every tensor in ``tx``
    (hyperparameters, the memory's initial parameters), through all ``steps`` updates. With
    ``objective="log"`` the mean is of the losses' logarithms (:data:`OBJECTIVES`); the inner steps
    use the loss's own gradient either way.
    """
    transform = _objective(objective)
    params = dict(task.params if params is None else params)
    state = tx.init(params) if state is None else state
    total = 0.0
    for t in range(start, start + steps):
        grads, loss = grad_and_value(task.loss)(params, t)
        updates, state = tx.update(grads, state, params)
        params = F.apply_updates(params, updates)
        total = total + transform(loss)
    return total / steps, params, state


def _graph_nodes(loss: Tensor) -> int:
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return len(seen)


class MetaTrainer:
    """Truncated unrolled meta-training of a :class:`MetaLearner` over a task distribution.

    Args:
        learner: what to learn.
        sample_task: ``sample_task(generator) -> Task`` (e.g. the task class itself).
        unroll: inner steps per task; truncation: steps per backward segment (divides ``unroll``).
            The optimizer state is detached between segments, and DeepMomentum's memory lives in
            that state (``memory_init`` is only its starting value), so with ``truncation <
            unroll`` ``memory_init`` is learned from the first segment's losses alone (a greedy
            start); ``truncation = unroll`` differentiates the whole run (the graph then grows with
            ``unroll``). The decays, step sizes and ``alpha`` reach every segment either way.
        meta_lr: Adam's learning rate on the learner's parameters; clip: max meta-gradient norm.
        tasks_per_step: tasks averaged per outer step; seed: the task generator's seed.
        objective: ``"mean"`` (the inner losses' mean) or ``"log"`` (the mean of their logarithms,
            for positive losses), see :data:`OBJECTIVES`.
        sync: called with the list of meta-gradients (the learner's parameters' ``.grad``) before
            clipping, to change them in place: with several processes, each with its own ``seed``,
            an all-reduce to their mean (``benchmarks.pretrained.meta_train``) makes every
            process take the same step.
    """

    def __init__(self, learner: MetaLearner, sample_task: Callable[[torch.Generator], Task], *, unroll: int = 50,
                 truncation: int = 10, meta_lr: float = 1e-2, clip: float = 1.0, tasks_per_step: int = 1,
                 seed: int = 0, sync: Callable[[list[Tensor]], None] | None = None, objective: str = "mean") -> None:
        if not (isinstance(unroll, int) and isinstance(truncation, int) and 1 <= truncation <= unroll):
            raise ValueError(f"invalid unroll/truncation: {unroll!r}/{truncation!r}; use ints with "
                             "1 <= truncation <= unroll")
        if unroll % truncation:
            raise ValueError(f"truncation ({truncation}) must divide unroll ({unroll})")
        if not clip > 0:
            raise ValueError(f"invalid clip: {clip!r}; the meta-gradient's max norm must be > 0")
        if not (isinstance(tasks_per_step, int) and tasks_per_step >= 1):
            raise ValueError(f"invalid tasks_per_step: {tasks_per_step!r}; use an int >= 1")
        _objective(objective)
        self.objective = objective
        self.learner, self.sample_task, self.sync = learner, sample_task, sync
        self.unroll, self.truncation, self.clip, self.tasks_per_step = unroll, truncation, clip, tasks_per_step
        self.meta_opt = torch.optim.Adam(learner.parameters(), lr=meta_lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.skipped_steps = 0

    def step(self) -> dict[str, float]:
        """One outer step; returns the mean meta-loss, the meta-gradient norm before clipping and
        the size of the largest segment's autograd graph (constant across steps: memory stays flat)
        and ``skipped`` (1.0 when a non-finite meta-gradient left the learner unchanged)."""
        self.meta_opt.zero_grad()
        segments = self.unroll // self.truncation
        scale = 1.0 / (segments * self.tasks_per_step)
        total, nodes = 0.0, 0
        for _ in range(self.tasks_per_step):
            task = self.sample_task(self.generator)
            params, state = dict(task.params), None
            for s in range(segments):
                tx = self.learner.transformation()
                loss, params, state = unroll(tx, task, self.truncation, params, state, start=s * self.truncation,
                                             objective=self.objective)
                nodes = max(nodes, _graph_nodes(loss))
                (loss * scale).backward()
                total += float(loss.detach()) * scale
                params, state = _detach(params), _detach(state)  # truncate: the graph ends here
        if self.sync is not None:
            grads = []
            for p in self.learner.parameters():
                if p.grad is None:  # a value the tasks never reached: a zero meta-gradient to share
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            self.sync(grads)
        norm = torch.nn.utils.clip_grad_norm_(self.learner.parameters(), self.clip)
        skipped = not bool(torch.isfinite(norm))
        if skipped:
            self.skipped_steps += 1
        else:
            self.meta_opt.step()
        return {"meta_loss": total, "grad_norm": float(norm), "graph_nodes": nodes, "skipped": float(skipped)}

    def state_dict(self) -> dict[str, Any]:
        return {"learner": self.learner.state_dict(), "meta_opt": self.meta_opt.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        self.meta_opt.load_state_dict(state["meta_opt"])
        self.generator.set_state(state["generator"])
