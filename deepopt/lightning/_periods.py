"""Multi-timescale parameter levels for any optimizer, without Lightning.

A *level specification* maps parameter names (as ``model.named_parameters()`` gives them) or
``fnmatch`` glob patterns over such names to an update period ``C >= 1`` (the slow
levels of Nested Learning: the CMS rule, paper Eq. 71). A parameter of period ``C`` accumulates its gradient over
``C`` optimizer steps and is stepped only at steps ``t`` with ``t % C == 0``, with the reduced
chunk::

    g_hat_t = (1/C) * sum_{s = t-C+1}^{t} g_s     (reduce="mean")
    g_hat_t =          sum_{s = t-C+1}^{t} g_s     (reduce="sum")

On held steps the parameter's ``.grad`` is moved into an accumulator and set to ``None``. Every
``torch.optim`` optimizer skips parameters whose gradient is ``None``, so on held steps neither the
parameter nor its optimizer state (momentum, Adam moments, step counters, decoupled weight decay)
changes: there are no phantom momentum updates. At the boundary ``.grad`` is set to ``g_hat``
and the optimizer takes one ordinary step.

Example (a plain loop; the Lightning callback ``MultiTimescale`` is a thin adapter over this)::

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    >>> periodic = PeriodicGradients(model.named_parameters(), {"0.*": 4})
    >>> for _ in range(8):
    ...     model(torch.randn(16, 4)).pow(2).mean().backward()
    ...     stepped = periodic.before_step()   # ["0.weight", "0.bias"] at steps 4 and 8, else []
    ...     opt.step()
    ...     opt.zero_grad()
    >>> periodic.step
    8
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..periods import match_periods

REDUCTIONS = ("mean", "sum")


def validate_levels(levels: Mapping[str, int], *, name: str = "levels") -> dict[str, int]:
    """Check a level specification and return it as a plain ``dict[str, int]``.

    Raises:
        TypeError: if ``levels`` is not a mapping of strings to ints.
        ValueError: if a period is < 1.
    """
    if not isinstance(levels, Mapping):
        raise TypeError(
            f"{name} must be a dict {{parameter name or glob pattern: period}}, e.g. "
            f"{{'encoder.*': 4}}, or the spec returned by nl_layers.nest; got {type(levels).__name__}"
        )
    out: dict[str, int] = {}
    for pattern, period in levels.items():
        if not isinstance(pattern, str):
            raise TypeError(f"{name}: keys must be parameter names or glob patterns (str), got {pattern!r}")
        if isinstance(period, bool) or not isinstance(period, int):
            raise TypeError(f"{name}[{pattern!r}] must be an int period >= 1, got {period!r}")
        if period < 1:
            raise ValueError(f"{name}[{pattern!r}] = {period}: a period must be >= 1 (1 = every step)")
        out[pattern] = period
    return out


def resolve_levels(names: Iterable[str], levels: Mapping[str, int], *, strict: bool = True) -> dict[str, int]:
    """Period of every parameter name (1 where nothing matches); ``deepopt.match_periods`` rules.

    A key matches a name exactly or as an ``fnmatch`` pattern; a name matched by keys of different
    periods is an error (make the patterns disjoint), so the order of the keys never matters.

    Args:
        names: parameter names, e.g. ``[n for n, _ in model.named_parameters()]``.
        levels: the level specification (names or ``fnmatch`` patterns -> period).
        strict: raise if a key matches no name (catches typos); ``False`` ignores such keys
            (used for one optimizer's share of a model's parameters).

    Example:
        >>> resolve_levels(["a.0.weight", "a.0.bias", "b.weight"], {"a.*": 4})
        {'a.0.weight': 4, 'a.0.bias': 4, 'b.weight': 1}
    """
    levels = validate_levels(levels)
    names = list(names)
    if not strict:
        levels = {k: c for k, c in levels.items() if any(n == k or fnmatch.fnmatchcase(n, k) for n in names)}
    return match_periods(names, levels)


class PeriodicGradients:
    """Holds the gradients of slow parameters so that they are stepped only every ``C`` steps.

    Call :meth:`before_step` once per optimizer step, after backward (and after unscaling for
    mixed precision) and before ``optimizer.step()``.

    Args:
        named_parameters: ``(name, parameter)`` pairs this object manages (e.g. the parameters of
            one optimizer, named as in the model).
        levels: level specification ``{name or pattern: period}``.
        reduce: ``"mean"`` (default, the CMS rule) or ``"sum"`` of the chunk's gradients.
        strict: raise if a key of ``levels`` matches none of ``named_parameters``.

    Attributes:
        step: number of optimizer steps seen so far (the ``t`` of the last step, 1-based).
        periods: ``{name: period}`` of every managed parameter.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, Tensor]], levels: Mapping[str, int],
                 reduce: str = "mean", *, strict: bool = True) -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        self.reduce = reduce
        self.params: dict[str, Tensor] = dict(named_parameters)
        self.periods = resolve_levels(self.params, levels, strict=strict)
        self.step = 0
        self._acc: dict[str, Tensor] = {}

    # ----------------------------------------------------------------- the rule
    def is_boundary(self, period: int, t: int | None = None) -> bool:
        """Whether a level of this period is stepped at step ``t`` (default: the next step)."""
        t = self.step + 1 if t is None else t
        return t % period == 0

    def slow_names(self) -> list[str]:
        """Names of the parameters with period > 1."""
        return [n for n, c in self.periods.items() if c > 1]

    def before_step(self, skip: bool = False) -> list[str]:
        """Rewrite ``.grad`` of the slow parameters for the coming optimizer step.

        Args:
            skip: the coming step will not happen (e.g. a GradScaler found inf/nan): the gradients
                are neither accumulated nor counted, and the step counter does not advance.

        Returns:
            Names of the slow parameters that the coming step updates (those at their boundary).
        """
        if skip:
            return []
        t = self.step + 1
        stepped: list[str] = []
        for name, period in self.periods.items():
            if period == 1:
                continue
            p = self.params[name]
            g = p.grad
            if g is not None:
                if g.is_sparse:
                    raise TypeError(f"parameter {name!r} has a sparse gradient; slow levels need dense ones")
                acc = self._acc.get(name)
                if acc is None:
                    acc_dtype = torch.promote_types(g.dtype, torch.float32)
                    self._acc[name] = g.detach().to(acc_dtype, copy=True)
                else:
                    acc.add_(g.detach())
            if t % period != 0:
                p.grad = None
                continue
            acc = self._acc.pop(name, None)
            if acc is None:
                p.grad = None
                continue
            if self.reduce == "mean":
                acc.div_(period)
            p.grad = acc.to(p.dtype)
            stepped.append(name)
        self.step = t
        return stepped

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Plain values and CPU tensors: the step counter, the periods and the open chunks."""
        return {
            "step": self.step,
            "reduce": self.reduce,
            "periods": dict(self.periods),
            "accumulators": {n: a.detach().cpu().clone() for n, a in self._acc.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the periods must match the current ones."""
        if dict(state["periods"]) != self.periods:
            changed = sorted(n for n in set(state["periods"]) | set(self.periods)
                             if state["periods"].get(n) != self.periods.get(n))
            raise ValueError(
                f"checkpoint levels differ from the current ones for {changed[:5]}: resume with the "
                "same levels (and the same model) that wrote the checkpoint"
            )
        if state["reduce"] != self.reduce:
            raise ValueError(f"checkpoint has reduce={state['reduce']!r} but this run uses {self.reduce!r}")
        self.step = int(state["step"])
        self._acc = {}
        for n, a in state["accumulators"].items():
            p = self.params[n]
            self._acc[n] = a.to(device=p.device, copy=True)

    def __repr__(self) -> str:
        slow = {n: c for n, c in self.periods.items() if c > 1}
        return f"PeriodicGradients(step={self.step}, reduce={self.reduce!r}, slow={slow})"
