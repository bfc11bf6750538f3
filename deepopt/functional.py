"""Pure functional forms of every deepopt optimizer and level (optax / torchopt convention).

A :class:`Transformation` is a pair of pure functions over dicts of tensors (any mapping, or a
list/tuple, which is treated as ``{"0": ..., "1": ...}``):

    state = tx.init(params)
    updates, state = tx.update(grads, state, params)     # updates = the delta to add
    params = apply_updates(params, updates)              # p + u

It runs the *same code* as the ``torch.optim`` classes: :meth:`LevelOptimizer.rule` builds the
chains and group defaults from hyperparameters, :meth:`Chain.update` (the pure reference of every
level) gives the direction and :func:`~deepopt.optim.base.apply_direction` the step
``W (1 - lr wd) - (lr mul/div) num/den`` that the class applies with ``impl="reference"``. The
update returned is that new value minus ``W``. Nothing mutates its inputs, so it composes with
``torch.func.vmap`` (many seeds or models at once), ``torch.func.grad`` and plain autograd
(differentiate a loss after K steps with respect to the initial parameters, the memory's initial
parameters, or hyperparameters, which may be passed as tensors).

Shell features are not here: slow *parameter groups* (use a level's ``period`` instead, e.g.
``from_levels(Momentum(period=4))``) and the non-finite-gradient policy.

Example:
    >>> import torch
    >>> from deepopt import functional as F
    >>> tx = F.make("AdamMemory", lr=1e-2)
    >>> params = {"w": torch.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": torch.tensor([1.0, -1.0, 0.0])}, state, params)
    >>> F.apply_updates(params, updates)["w"]
    tensor([0.9899, 1.0099, 0.9999])
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor
from torch._C import _functorch

from .chain import Chain
from .levels.base import Level
from .levels.delta_rule import DeltaRule
from .optim.base import LevelOptimizer, Rule, apply_direction, chain_for, coupled_decay, group_defaults
from .optim.conventions import check_conventions
from .optim.nested import NestedOptimizer
from .optim.registry import OPTIMIZERS
from .pretrained import load as _load_memory

__all__ = [
    "Transformation",
    "adam_memory",
    "apply_updates",
    "as_torchopt",
    "deep_momentum",
    "deep_momentum_pretrained",
    "delta_momentum",
    "dgd",
    "from_levels",
    "from_rule",
    "m3",
    "make",
    "momentum_memory",
    "muon_memory",
    "preconditioned_momentum",
]

Params = Mapping[str, Tensor]


class Transformation(NamedTuple):
    """A pure ``init(params) -> state`` / ``update(grads, state, params) -> (updates, state)`` pair.

    ``state`` is ``{name: {"step": tensor, "<level>.<buffer>": tensor, ...}}``, the class's
    per-parameter state, so ``opt.state[p]`` and ``state[name]`` hold the same keys.
    ``rule`` and ``group`` are the chains and hyperparameters it runs (read-only).
    """

    init: Callable[[Any], dict[str, dict[str, Tensor]]]
    update: Callable[..., tuple[Any, dict[str, dict[str, Tensor]]]]
    rule: Rule
    group: Mapping[str, Any]


# ---------------------------------------------------------------------------- containers
def _as_dict(tree: Any) -> tuple[dict[str, Tensor], Callable[[dict[str, Any]], Any]]:
    """A mapping as a dict; a list/tuple as ``{"0": ...}`` with the function that rebuilds it."""
    if isinstance(tree, Mapping):
        return dict(tree), lambda d: type(tree)(d) if type(tree) is not dict else d
    if isinstance(tree, (list, tuple)):
        kind = type(tree)
        return {str(i): t for i, t in enumerate(tree)}, lambda d: kind(d[str(i)] for i in range(len(d)))
    raise TypeError(f"params must be a dict of tensors (or a list/tuple of tensors), got {type(tree).__name__}")


def apply_updates(params: Any, updates: Any) -> Any:
    """``p + u`` for every entry (``None`` updates leave ``p``); same container type as ``params``."""
    p, rebuild = _as_dict(params)
    u, _ = _as_dict(updates)
    return rebuild({k: v if u.get(k) is None else v + u[k] for k, v in p.items()})


# ---------------------------------------------------------------------------- the core
def _batched(v: Any) -> bool:
    if isinstance(v, Tensor):
        return _functorch.is_batchedtensor(v) or (_functorch.is_functorch_wrapped_tensor(v) and
                                                  _batched(_functorch.get_unwrapped(v)))
    if isinstance(v, (tuple, list)):
        return any(_batched(x) for x in v)
    if isinstance(v, Mapping):
        return any(_batched(x) for x in v.values())
    return False


def from_rule(rule: Rule, **group: Any) -> Transformation:
    """The transformation of an update rule; ``group`` overrides its hyperparameters.

    Hyperparameters may be tensors (to differentiate through them); values that are
    vmapped over are not validated (validation needs one value).
    """
    defaults = group_defaults(rule.chains, rule.defaults)
    unknown = sorted(set(group) - set(defaults))
    if unknown:
        raise TypeError(f"unknown hyperparameters {unknown}; this rule has {sorted(defaults)}")
    hp = {**defaults, **group}
    if not _batched(hp):
        check_conventions(hp)
        for chain in rule.chains:
            chain.validate(hp)
    decoupled = rule.weight_decay_mode == "decoupled"

    def pick(p: Tensor) -> Chain:
        chain = chain_for(rule.chains, p, hp)
        if chain is None:
            raise ValueError(f"no level of this rule applies to a parameter of shape {tuple(p.shape)}")
        return chain

    def init(params: Any) -> dict[str, dict[str, Tensor]]:
        ps, _ = _as_dict(params)
        return {k: pick(p).init(p, hp) for k, p in ps.items()}

    def update(grads: Any, state: Mapping[str, Mapping[str, Tensor]], params: Any,
               ) -> tuple[Any, dict[str, dict[str, Tensor]]]:
        if params is None:
            raise ValueError("deepopt transformations need the parameters: call update(grads, state, params)")
        gs, rebuild = _as_dict(grads)
        ps, _ = _as_dict(params)
        if set(gs) != set(ps) or set(ps) != set(state):
            raise ValueError(f"grads, state and params must have the same keys; got {sorted(gs)}, "
                             f"{sorted(state)} and {sorted(ps)}")
        lr, wd = hp["lr"], hp["weight_decay"]
        updates, new_state = {}, {}
        for k, g in gs.items():
            p = ps[k]
            if g is None:
                updates[k], new_state[k] = None, dict(state[k])
                continue
            if hp.get("maximize", False):
                g = -g
            if not decoupled:
                g = coupled_decay(g, p, wd)
            d, new_state[k] = pick(p).update(dict(state[k]), g, p, hp)
            updates[k] = apply_direction(p, d, lr, wd if decoupled else 0.0) - p
        return rebuild(updates), new_state

    return Transformation(init, update, rule, hp)


def make(optimizer: str | type[LevelOptimizer], **hyperparameters: Any) -> Transformation:
    """The functional form of a named optimizer, with the class's defaults.

    Args:
        optimizer: a name of ``deepopt.OPTIMIZERS`` (not ``"DGD"``: use :func:`dgd`) or a
            :class:`~deepopt.optim.base.LevelOptimizer` subclass.
        **hyperparameters: the constructor's keyword arguments (``lr=...``); tensors allowed.
    """
    if isinstance(optimizer, str):
        if optimizer == "DGD":
            raise ValueError("DGD needs the layer inputs: use deepopt.functional.dgd(lr=...) and pass inputs=")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; use one of {sorted(OPTIMIZERS)}")
        optimizer = OPTIMIZERS[optimizer]
    if not (isinstance(optimizer, type) and issubclass(optimizer, LevelOptimizer)):
        raise TypeError(f"optimizer must be a name or a LevelOptimizer subclass, got {optimizer!r}")
    rule = optimizer.rule(**hyperparameters)
    # the rule copies some values (e.g. DeepMemory detaches memory_init); keep the caller's tensors
    keys = group_defaults(rule.chains, rule.defaults)
    overrides = {k: v for k, v in hyperparameters.items() if k in keys and isinstance(v, (Tensor, Mapping))}
    return from_rule(rule, **overrides)


def momentum_memory(**hyperparameters: Any) -> Transformation:
    """Functional :class:`deepopt.MomentumMemory` (torch's SGD)."""
    return make("MomentumMemory", **hyperparameters)


def adam_memory(**hyperparameters: Any) -> Transformation:
    """Functional :class:`deepopt.AdamMemory` (torch's AdamW, or the paper's accumulators)."""
    return make("AdamMemory", **hyperparameters)


def muon_memory(**hyperparameters: Any) -> Transformation:
    """Functional :class:`deepopt.MuonMemory` (Muon on matrices, AdamW on the rest)."""
    return make("MuonMemory", **hyperparameters)


def preconditioned_momentum(**hyperparameters: Any) -> Transformation:
    """Functional :class:`deepopt.PreconditionedMomentum`."""
    return make("PreconditionedMomentum", **hyperparameters)


def delta_momentum(**hyperparameters: Any) -> Transformation:
    """Functional :class:`deepopt.DeltaMomentum`."""
    return make("DeltaMomentum", **hyperparameters)


def deep_momentum(**hyperparameters: Any) -> Transformation:
    """Functional :class:`deepopt.DeepMomentum`; ``memory_init``, ``momentum`` and ``inner_lr`` may
    be tensors that require grad (meta-learning, :mod:`deepopt.meta`)."""
    return make("DeepMomentum", **hyperparameters)


def deep_momentum_pretrained(name: str | os.PathLike = "default", **overrides: Any) -> Transformation:
    """Functional :meth:`deepopt.DeepMomentum.pretrained`: the shipped memory ``name`` (or a ``.json``
    path; :mod:`deepopt.pretrained`) with its recommended ``lr``; ``overrides`` win."""
    return make("DeepMomentum", **_load_memory(name).kwargs(**overrides))


def m3(**hyperparameters: Any) -> Transformation:
    """Functional :class:`deepopt.M3` (``alpha``, the slow level's mixing weight, may be a tensor)."""
    return make("M3", **hyperparameters)


def from_levels(*levels: Level, lr: Any = 1.0, weight_decay: Any = 0.0, weight_decay_mode: str = "decoupled",
                fallback: Sequence[Level] | None = None, **hyperparameters: Any) -> Transformation:
    """Any stack of levels as a transformation (functional :class:`deepopt.NestedOptimizer`).

    With ``lr=1`` the update is minus the chain's direction, so one level alone is its own pure
    function: ``from_levels(Momentum(0.9))`` is ``-m`` with ``m <- 0.9 m + g``.

    Example:
        >>> import torch
        >>> from deepopt import functional as F
        >>> from deepopt.levels import Momentum
        >>> tx = F.from_levels(Momentum(0.9, period=2), lr=0.1)
        >>> p = {"w": torch.zeros(2)}; s = tx.init(p)
        >>> u, s = tx.update({"w": torch.ones(2)}, s, p)   # a slow level holds its output until step 2
        >>> u["w"]
        tensor([0., 0.])
    """
    rule = NestedOptimizer.rule(levels=levels, lr=lr, weight_decay=weight_decay,
                                weight_decay_mode=weight_decay_mode, fallback=fallback)
    return from_rule(rule, **hyperparameters)


def dgd(lr: Any = 1e-3, weight_decay: Any = 0.0) -> Transformation:
    """Functional :class:`deepopt.DGD`: ``update(grads, state, params, inputs={name: X})``.

    Every parameter named in ``inputs`` (a linear layer's weight, with its input ``X`` of shape
    ``(N, in_features)``) takes the delta-rule step of :class:`~deepopt.levels.delta_rule.DeltaRule`;
    the others take plain gradient descent.
    """
    from .optim.dgd import _Plain

    plain = from_rule(Rule([Chain(_Plain())], dict(lr=lr, weight_decay=weight_decay), "decoupled"))

    def update(grads: Any, state: Mapping[str, Any], params: Any, inputs: Mapping[str, Tensor] | None = None):
        gs, rebuild = _as_dict(grads)
        ps, _ = _as_dict(params)
        inputs = dict(inputs or {})
        unknown = sorted(set(inputs) - set(ps))
        if unknown:
            raise ValueError(f"inputs names {unknown} are not parameters; they look like {sorted(ps)[:4]}")
        updates, new_state = plain.update({k: v for k, v in gs.items() if k not in inputs},
                                          {k: v for k, v in state.items() if k not in inputs},
                                          {k: v for k, v in ps.items() if k not in inputs})
        for k, x in inputs.items():
            level = DeltaRule({ps[k]: x}, {ps[k]})
            tx = from_rule(Rule([Chain(level)], dict(lr=lr, weight_decay=weight_decay), "decoupled"))
            u, s = tx.update({k: gs[k]}, {k: state[k]}, {k: ps[k]})
            updates[k], new_state[k] = u[k], s[k]
        return rebuild({k: updates[k] for k in gs}), new_state

    return Transformation(plain.init, update, plain.rule, plain.group)


# ---------------------------------------------------------------------------- torchopt
def as_torchopt(optimizer: Transformation | str | type[LevelOptimizer], **hyperparameters: Any):
    """A ``torchopt.base.GradientTransformation`` of a deepopt optimizer (needs the ``meta`` extra).

    Usable with ``torchopt.MetaOptimizer(module, impl)`` and torchopt's functional loop
    (``updates, state = tx.update(grads, state, params=params, inplace=False)``;
    ``params = torchopt.apply_updates(params, updates, inplace=False)``). ``params=`` is required.

    Example:
        >>> import torch, torchopt
        >>> from deepopt import functional as F
        >>> net = torch.nn.Linear(3, 1)
        >>> meta_opt = torchopt.MetaOptimizer(net, F.as_torchopt("DeepMomentum", lr=0.1))
        >>> meta_opt.step(net(torch.randn(4, 3)).square().mean())
    """
    try:
        from torchopt.base import GradientTransformation
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("as_torchopt needs torchopt: pip install 'deepopt-nl[meta]' (or pip install torchopt)") from err
    tx = optimizer if isinstance(optimizer, Transformation) else make(optimizer, **hyperparameters)
    if isinstance(optimizer, Transformation) and hyperparameters:
        raise TypeError("hyperparameters go to make(...); an existing Transformation has its own")

    def init_fn(params: Any) -> dict[str, dict[str, Tensor]]:
        return tx.init(params)

    def update_fn(updates: Any, state: Any, *, params: Any = None, inplace: bool = True):
        del inplace  # always out of place: the result may be differentiated (MetaOptimizer)
        return tx.update(updates, state, params)

    return GradientTransformation(init_fn, update_fn)
