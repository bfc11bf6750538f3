"""Compose levels into one update rule (optax's ``chain``, with update periods).

``Chain(l1, l2, ...)`` feeds the gradient to ``l1``; each level writes its memory (every step,
or at its period's boundaries with the mean of the accumulated chunk) and reads it; the read is
the next level's input; the last read is the update direction. State is one flat dict per
parameter with keys namespaced by level name (``"momentum.momentum_buffer"``), plus ``"step"``
(a float32 tensor, as in torch's optimizers) and ``"<level>.accumulator"`` for slow levels.

Two forms, which tests check agree in float64:

* :meth:`Chain.update` -- the reference: pure, one tensor, returns ``(direction, new_state)``;
* :meth:`Chain.update_` -- the fast path: a list of tensors, state updated in place.

Example:
    >>> import torch
    >>> from deepopt.chain import Chain
    >>> from deepopt.levels import Momentum, NewtonSchulz
    >>> muon = Chain(Momentum(0.95, nesterov=True, form="ema"), NewtonSchulz())
    >>> group = {**muon.defaults}
    >>> p = torch.randn(4, 8); state = muon.init(p, group)
    >>> d, state = muon.update(state, torch.randn(4, 8), p, group)
    >>> d.num.shape, int(state["step"])
    (torch.Size([4, 8]), 1)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .levels.base import Direction, Level, State, advance_steps, is_boundary, level_step, static_step

__all__ = ["Chain"]


class Chain:
    """An ordered stack of levels; see the module docstring.

    Args:
        *levels: the levels, input side first. Names must be unique within the chain.
        lr_scale: a param-group key whose value multiplies this chain's learning rate (e.g.
            ``"fallback_lr_ratio"`` for Muon's element-wise fallback); None for none.
    """

    def __init__(self, *levels: Level, lr_scale: str | None = None) -> None:
        self.lr_scale = lr_scale
        if not levels:
            raise ValueError("Chain needs at least one level")
        names = [lvl.name for lvl in levels]
        if len(set(names)) != len(names):
            raise ValueError(f"level names must be unique in a chain, got {names}; rename one (level.name = ...)")
        self.levels: tuple[Level, ...] = tuple(levels)
        self.defaults: dict[str, Any] = {}
        for lvl in levels:
            for k, v in lvl.defaults.items():
                if k in self.defaults and self.defaults[k] != v:
                    raise ValueError(f"levels disagree on hyperparameter {k!r} ({self.defaults[k]!r} vs {v!r}); "
                                     f"give one of them other keys, e.g. keys={{{k!r}: 'other_{k}'}}")
                self.defaults[k] = v

    def __repr__(self) -> str:
        return "Chain(" + ", ".join(map(repr, self.levels)) + ")"

    # ------------------------------------------------------------------ structure
    def validate(self, group: Mapping[str, Any]) -> None:
        for lvl in self.levels:
            lvl.validate(group)

    def applies_to(self, p: Tensor, group: Mapping[str, Any]) -> bool:
        return all(lvl.applies_to(p, group) for lvl in self.levels)

    def init(self, p: Tensor, group: Mapping[str, Any]) -> State:
        state: State = {"step": torch.tensor(0.0, dtype=torch.float32)}
        for lvl in self.levels:
            for k, v in lvl.init(p, group).items():
                state[f"{lvl.name}.{k}"] = v
            if lvl.period > 1:
                state[f"{lvl.name}.accumulator"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def stats(self, state: State) -> dict[str, float]:
        """Norms of every memory buffer, keyed ``"<level>/<buffer>_norm"``."""
        out: dict[str, float] = {}
        for lvl in self.levels:
            sub = _sub(state, lvl.name)
            for k, v in lvl.stats(sub).items():
                out[f"{lvl.name}/{k}_norm"] = v
        return out

    # ------------------------------------------------------------------ reference (pure)
    def update(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any]) -> tuple[Direction, State]:
        """One step on one tensor. Pure: returns the direction and a new state dict."""
        new: State = {"step": state["step"] + 1}
        t = static_step(state["step"]) + 1
        d = Direction(x)
        for i, lvl in enumerate(self.levels):
            sub = _sub(state, lvl.name)
            if lvl.period > 1:
                acc_key = f"{lvl.name}.accumulator"
                acc = state[acc_key] + lvl.write_input(x)
                if is_boundary(t, lvl.period, lvl.write_first):
                    sub = lvl.write(sub, acc / _chunk(t, lvl), p, group, level_step(t, lvl.period, lvl.write_first))
                    acc = torch.zeros_like(acc)
                new[acc_key] = acc
            else:
                sub = lvl.write(sub, lvl.write_input(x), p, group, t)
            new.update({f"{lvl.name}.{k}": v for k, v in sub.items()})
            tl = level_step(t, lvl.period, lvl.write_first)
            d = lvl.read(sub, x, p, group, tl) if tl > 0 else Direction(torch.zeros_like(x))
            if i + 1 < len(self.levels):
                x = d.materialize()
        return self._scaled(d, group), new

    def _scaled(self, d: Direction, group: Mapping[str, Any]) -> Direction:
        if self.lr_scale is None:
            return d
        return d._replace(mul=d.mul * group[self.lr_scale])

    # ------------------------------------------------------------------ fast path (in place)
    def update_(self, states: Sequence[State], xs: Sequence[Tensor], ps: Sequence[Tensor],
                group: Mapping[str, Any]) -> list[Direction]:
        """One step on a list of tensors; states are updated in place."""
        ts = advance_steps(list(states))
        xs, ps = list(xs), list(ps)
        ds: list[Direction] = [Direction(x) for x in xs]
        for i, lvl in enumerate(self.levels):
            subs = _subs(states, lvl.name)
            tls = ts if lvl.period == 1 else [level_step(t, lvl.period, lvl.write_first) for t in ts]
            if lvl.period > 1:
                accs = [s[f"{lvl.name}.accumulator"] for s in states]
                torch._foreach_add_(accs, [lvl.write_input(x) for x in xs])
                hit = [j for j, t in enumerate(ts) if is_boundary(t, lvl.period, lvl.write_first)]
                if hit:
                    chunk = [accs[j] / _chunk(ts[j], lvl) for j in hit]
                    lvl.write_([subs[j] for j in hit], chunk, [ps[j] for j in hit], group, [tls[j] for j in hit])
                    torch._foreach_zero_([accs[j] for j in hit])
            else:
                lvl.write_(subs, [lvl.write_input(x) for x in xs], ps, group, ts)
            live = [j for j, tl in enumerate(tls) if tl > 0]
            if len(live) == len(xs):  # every level has written (the usual case): no zeros to make
                ds = lvl.read_(subs, xs, ps, group, tls)
            else:
                read = lvl.read_([subs[j] for j in live], [xs[j] for j in live], [ps[j] for j in live], group,
                                 [tls[j] for j in live]) if live else []
                ds = [Direction(torch.zeros_like(x)) for x in xs]
                for j, d in zip(live, read):
                    ds[j] = d
            if i + 1 < len(self.levels):
                xs = [d.materialize() for d in ds]
        return [self._scaled(d, group) for d in ds]


def _sub(state: State, name: str) -> State:
    prefix = f"{name}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k != f"{name}.accumulator"}


def _subs(states: Sequence[State], name: str) -> list[State]:
    """:func:`_sub` of every state: the keys are read from the first (a chain's states share them)
    and looked up in the others, which fall back to :func:`_sub` where they differ."""
    if not states:
        return []
    prefix = f"{name}."
    acc = f"{name}.accumulator"
    pairs = [(k, k[len(prefix):]) for k in states[0] if k.startswith(prefix) and k != acc]
    n = len(states[0])
    out = []
    for s in states:
        try:
            sub = {short: s[k] for k, short in pairs}
        except KeyError:
            sub = None
        out.append(sub if sub is not None and len(s) == n else _sub(s, name))
    return out


def _chunk(t: int, lvl: Level) -> int:
    """How many steps the chunk written at step ``t`` spans (the first write_first chunk is one)."""
    return 1 if (lvl.write_first and t == 1) else lvl.period
