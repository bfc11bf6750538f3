"""The level: one associative memory of an optimizer.

A level is a memory ``M`` with a *write* (one step of its inner optimizer on its inner
objective, i.e. the state update) and a *read* (the memory's output for the current input).
Levels are chained: the read of one level is the input of the next, and the read of the last
level is the update direction ``d`` that the optimizer applies as ``W <- W - lr * d``.

Every level has two forms that must agree (tests check it in float64):

* the **reference**: pure functions over one tensor, ``write(state, x, ...) -> new_state`` and
  ``read(state, x, ...) -> Direction``. They never mutate their inputs, so they work under
  ``torch.func.grad`` and ``torch.func.vmap``: hyperparameters may be tensors (to differentiate
  with respect to them; see :func:`axpy`), and no branch depends on a tensor's value.
* the **fast path**: ``write_(states, xs, ...)`` over a list of tensors that updates state in
  place (``torch._foreach_*`` where it pays), and ``read_`` over a list.

A level may have an update ``period`` C (the slow levels of Nested Learning, Eq. 71): its input is accumulated
over C steps and it is written only at the boundary ``t % C == 0`` with the mean of the chunk;
between boundaries its state is held and reads use the held state.

Hyperparameters live in the optimizer's param group (so LR schedulers, ``OneCycleLR``'s momentum
cycling and checkpointing all work): a level declares its group keys and their defaults in
``defaults``, validates them in ``validate`` and reads them from ``group`` at every step.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Any, Mapping, NamedTuple

import torch
from torch import Tensor

State = dict[str, Tensor]
_PLAIN = (Tensor, torch.nn.Parameter)


class Direction(NamedTuple):
    """An update direction ``d = (mul / div) * num / den`` (``den`` optional).

    Keeping the ratio and the scalars apart lets the shell apply the step with exactly the
    floating-point operations torch's optimizers use (``addcdiv_`` for Adam, ``add_`` with
    ``alpha`` for SGD and Muon), which is what makes the equality tests bit-exact.
    """

    num: Tensor
    den: Tensor | None = None
    mul: float = 1.0
    div: float = 1.0

    def materialize(self) -> Tensor:
        """The direction as one tensor (used when a later level consumes it)."""
        out = self.num if self.den is None else self.num / self.den
        if not (is_one(self.mul) and is_one(self.div)):
            out = out * (self.mul / self.div)
        return out


class Level:
    """Base class of a level. Subclasses set ``name`` and implement ``init``/``write``/``read``.

    Args:
        period: update period C of the memory (1 = every step).
        keys: renames of hyperparameter keys in the param group (so two levels of one optimizer
            can both have, say, an ``eps``), e.g. ``{"eps": "fallback_eps"}``.
        **defaults: hyperparameter defaults, stored under these keys in each param group.
    """

    name: str = "level"
    #: write also at step 1 (a memory that is undefined before its first write, such as a
    #: preconditioner, is then written at t = 1, C + 1, 2C + 1, ...).
    write_first: bool = False
    #: the level acts on each entry independently (no reduction, no matrix product): it may run on
    #: the local shard of a DTensor parameter; otherwise deepopt.distributed gathers the full tensor.
    elementwise: bool = False

    def __init__(self, period: int = 1, keys: Mapping[str, str] | None = None, **defaults: Any) -> None:
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise ValueError(f"{type(self).__name__}: period must be an int >= 1, got {period!r}")
        self.period = period
        self.keys = dict(keys or {})
        self.defaults = {self.key(k): v for k, v in defaults.items()}

    def key(self, name: str) -> str:
        """The param-group key under which this level keeps hyperparameter ``name``."""
        return self.keys.get(name, name)

    def hp(self, group: Mapping[str, Any], name: str) -> Any:
        """This level's hyperparameter ``name`` as set in ``group``."""
        return group[self.key(name)]

    # ----------------------------------------------------------------- hyperparameters
    def validate(self, group: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the hyperparameter if the group's value is invalid."""

    def applies_to(self, p: Tensor, group: Mapping[str, Any]) -> bool:
        """Whether this level acts on ``p`` (matrix levels skip vectors). Default: always."""
        return True

    # ----------------------------------------------------------------- reference (pure)
    def write_input(self, x: Tensor) -> Tensor:
        """What a slow level accumulates between writes (``x``; ``x * x`` for second moments)."""
        return x

    def init(self, p: Tensor, group: Mapping[str, Any]) -> State:
        """Fresh state for parameter ``p`` (keys without the level prefix)."""
        return {}

    def write(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> State:
        """One inner step of the memory on input ``x``; ``t`` is the level's own 1-based step."""
        return state

    def read(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> Direction:
        """The memory's output for input ``x`` (``t`` = number of writes so far)."""
        return Direction(x)

    # ----------------------------------------------------------------- fast path (in place)
    def write_(self, states: list[State], xs: list[Tensor], ps: list[Tensor],
               group: Mapping[str, Any], ts: list[int]) -> None:
        """In-place write over a list. Default: the reference, copied back into the state."""
        for state, x, p, t in zip(states, xs, ps, ts):
            new = self.write(state, x, p, group, t)
            for k, v in new.items():
                if state[k] is not v:
                    state[k].copy_(v)

    def read_(self, states: list[State], xs: list[Tensor], ps: list[Tensor],
              group: Mapping[str, Any], ts: list[int]) -> list[Direction]:
        """Read over a list. Default: the reference, tensor by tensor."""
        return [self.read(s, x, p, group, t) for s, x, p, t in zip(states, xs, ps, ts)]

    # ----------------------------------------------------------------- statistics
    def stats(self, state: State) -> dict[str, float]:
        """Scalar statistics of the memory for logging (norms of its buffers)."""
        return {k: float(v.detach().float().norm()) for k, v in state.items() if v.numel() > 1}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        per = f", period={self.period}" if self.period != 1 else ""
        return f"{type(self).__name__}({args}{per})"


def is_one(x: Any) -> bool:
    """Whether ``x`` is the Python number 1 (a tensor, possibly traced by torch.func, never is)."""
    return not isinstance(x, Tensor) and x == 1.0


def sqrt_moment(v: Tensor) -> Tensor:
    """``sqrt(v)`` of a second moment, with the same values, but differentiable at ``v = 0``: there
    (an entry whose gradients were all zero so far) its derivative is 0 rather than ``inf``, whose
    product with the zero derivative of ``v`` would be NaN in a meta-gradient (:mod:`deepopt.meta`
    differentiates through the optimizer's steps). NaN stays NaN.

    Example:
        >>> v = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> sqrt_moment(v).detach(), torch.autograd.grad(sqrt_moment(v).sum(), v)[0]
        (tensor([0., 2.]), tensor([0.0000, 0.2500]))
    """
    zero = v == 0
    return torch.where(zero, torch.ones_like(v), v).sqrt().masked_fill(zero, 0.0)


def axpy(x: Tensor, y: Tensor, alpha: Any) -> Tensor:
    """``x + alpha * y``: ``torch.add(x, y, alpha=alpha)`` for a number (bit-exact with torch's
    optimizers), plain arithmetic for a tensor ``alpha`` (a hyperparameter being differentiated)."""
    if isinstance(alpha, Tensor):
        return x + alpha * y
    return torch.add(x, y, alpha=alpha)


def addcmul(x: Tensor, y: Tensor, z: Tensor, value: Any) -> Tensor:
    """``x + value * y * z``, as :func:`axpy` for a tensor ``value``."""
    if isinstance(value, Tensor):
        return x + value * (y * z)
    return torch.addcmul(x, y, z, value=value)


def _ints(counters: list[Tensor]) -> list[int]:
    return [int(c) for c in counters]


def _float(x: Tensor) -> float:
    return float(x)


#: step counters banked by :func:`advance_steps`: ids of the counters -> (the counters, their base)
_BANKS: "OrderedDict[tuple[int, ...], tuple[list[Tensor], Tensor]]" = OrderedDict()
_BANKS_SIZE = 256  # lists of counters: one per (param group, chain) of every live optimizer


def _banked(steps: list[Tensor]) -> Tensor | None:
    """The 1-D float32 CPU tensor whose entries the counters ``steps`` are, in order, or None."""
    base = steps[0]._base
    if (base is None or base.ndim != 1 or base.numel() != len(steps) or not base.is_contiguous()
            or base.dtype != torch.float32 or base.device.type != "cpu"):
        return None
    for i, t in enumerate(steps):
        if t._base is not base or t.ndim != 0 or t.storage_offset() != base.storage_offset() + i:
            return None
    return base


def _advance(states: list[State]) -> list[int]:
    steps = [s["step"] for s in states]
    key = tuple(map(id, steps))
    hit = _BANKS.get(key)
    if hit is not None:
        _BANKS.move_to_end(key)
        base = hit[1]
    else:
        plain = all(type(t) in _PLAIN and t.dtype == torch.float32 and t.ndim == 0 and t.device.type == "cpu"
                    and not t.requires_grad for t in steps)
        if not plain:  # e.g. counters on another device: one by one
            torch._foreach_add_(steps, 1.0)
            return _ints(steps)
        base = _banked(steps)
        if base is None:  # one base for the list: the counters become its entries (same values)
            base = torch.stack(steps)
            steps = list(base.unbind(0))
            for s, t in zip(states, steps):
                s["step"] = t
            key = tuple(map(id, steps))
        _BANKS[key] = (steps, base)
        if len(_BANKS) > _BANKS_SIZE:
            _BANKS.popitem(last=False)
    base.add_(1.0)
    return list(map(int, base.tolist()))


def advance_steps(states: list[State]) -> list[int]:
    """Add one to every ``state["step"]`` and return the new counts as Python ints.

    The per-parameter counters stay float32 0-d tensors (torch's convention: each parameter's
    ``state["step"]``, saved and loaded with the state), but the first call makes them entries
    (views) of one 1-D tensor per list, so every later step advances and reads them with one
    operation each instead of one per parameter. A list whose counters were replaced (a loaded
    checkpoint, another subset of parameters with gradients) is banked again, values kept.
    Counters that are not plain float32 CPU scalars are advanced one by one. Outside compiled
    graphs (see :func:`outside_graphs`).

    Example:
        >>> import torch
        >>> states = [{"step": torch.tensor(0.0)}, {"step": torch.tensor(4.0)}]
        >>> advance_steps(states), advance_steps(states)
        ([1, 5], [2, 6])
        >>> states[1]["step"]
        tensor(6.)
    """
    if not torch.compiler.is_compiling():  # (the wrapper's own cost, ~10 us, only where it is needed)
        return _advance(states)
    return _HOST.get("advance", _advance)(states)


#: the host reads, wrapped by ``torch.compiler.disable`` once :func:`outside_graphs` ran
_HOST: dict[str, Any] = {}


def outside_graphs(**fns: Any) -> None:
    """Keep host reads out of ``torch.compile`` graphs: ``torch.compiler.disable`` wrappers (a quiet
    graph break instead of dynamo's ``Tensor.item()`` warning). Called by the optimizer shell's
    constructor (which imports ``torch._dynamo`` anyway), so ``import deepopt`` stays light."""
    if not _HOST:
        _HOST.update(ints=torch.compiler.disable(_ints), float=torch.compiler.disable(_float),
                     advance=torch.compiler.disable(_advance))
    for name, fn in fns.items():
        if name not in _HOST:
            _HOST[name] = torch.compiler.disable(fn)


def host_ints(counters: list[Tensor]) -> list[int]:
    """Step counters as Python ints (one host read; outside compiled graphs, see :func:`outside_graphs`)."""
    return _HOST.get("ints", _ints)(counters)


def host_float(x: Tensor) -> float:
    """A one-element tensor as a Python float (outside compiled graphs, see :func:`outside_graphs`)."""
    return _HOST.get("float", _float)(x)


def static_step(step: Tensor) -> int:
    """The value of a step counter as a Python int, also under ``torch.func.vmap`` and ``grad``.

    A step count is structural (it picks bias corrections and period boundaries), and every
    member of a vmapped batch is at the same step, so the batched counter is unwrapped and its
    first entry read (all entries are checked equal).
    """
    from torch._C import _functorch

    while _functorch.is_functorch_wrapped_tensor(step):
        level_batched = _functorch.is_batchedtensor(step)
        step = _functorch.get_unwrapped(step)
        if level_batched:
            flat = step.reshape(-1)
            if flat.numel() and not bool((flat == flat[0]).all()):
                raise ValueError("vmap over optimizer states at different steps; vmapped runs must advance together")
            step = flat[0] if flat.numel() else step
    return int(step)


def is_boundary(t: int, period: int, write_first: bool = False) -> bool:
    """Whether global step ``t`` (1-based) is a write step of a level of this period."""
    if period == 1:
        return True
    return (t - 1) % period == 0 if write_first else t % period == 0


def level_step(t: int, period: int, write_first: bool = False) -> int:
    """Number of writes a level of this period has made after global step ``t``."""
    if period == 1:
        return t
    return (t - 1) // period + 1 if write_first else t // period


def _real(key: str, v: Any) -> Any:
    """``v`` as a number (a tensor's value); ``TypeError`` naming ``key`` for a non-number, as torch."""
    if isinstance(v, Tensor):
        return float(v.detach())
    if not isinstance(v, numbers.Real):
        raise TypeError(f"invalid {key}: {v!r} ({type(v).__name__}); it must be a real number")
    return v


def check_unit_interval(group: Mapping[str, Any], key: str, *, closed_right: bool = False,
                        value: Any = None) -> None:
    """Raise a ValueError naming ``key`` unless ``0 <= group[key] < 1`` (``<= 1`` if closed)."""
    v = _real(key, group[key] if value is None else value)
    ok = 0.0 <= v <= 1.0 if closed_right else 0.0 <= v < 1.0
    if not ok:
        bound = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"invalid {key}: {v!r}; it must lie in {bound}")


def check_nonnegative(group: Mapping[str, Any], key: str) -> None:
    """Raise a ValueError naming ``key`` unless ``group[key] >= 0``."""
    v = _real(key, group[key])
    if not v >= 0.0:
        raise ValueError(f"invalid {key}: {v!r}; it must be >= 0")


def zeros_like(p: Tensor) -> Tensor:
    """A state buffer shaped like ``p`` (dense, same dtype and device)."""
    return torch.zeros_like(p, memory_format=torch.preserve_format)
