"""Multi-scale momentum with orthogonalized read-outs: the level behind M3 (paper Algorithm 1).

K momentum memories, level i with decay ``b_i``, period ``C_i`` and mixing weight ``w_i``, and one
second-moment memory ``V``:

    literal:  M_i <- M_i + b_i S_i           (S_i = sum of the gradients of level i's last chunk)
              V   <- V + b2 g^2
    stable:   M_i <- b_i M_i + (1 - b_i) S_i / C_i,  V <- b2 V + (1 - b2) g^2,  bias-corrected
    read:     d = (sum_i w_i O_i) / (sqrt(V) + eps),  O_i = NS(M_i)  (matrices; recomputed only at
              level i's boundaries), O_i = M_i elsewhere (element-wise fallback)
    stable, matrices only: d <- target_rms * d / rms(d)   ("RMS-matched": the step has AdamW's RMS)

With the paper's two levels, (b1, C=1, w=1) is the fast memory M1 and (b3, C=f, w=alpha) the slow M2.
The literal form blows up step sizes on trained models (NS(M) has entries ~1/sqrt(n), divided by
sqrt(V) ~ |g|); the stable form (default) fixes that and is documented side by side in
:class:`deepopt.M3`.

Special cases (tested exactly): one level ``(b1, 1, 1.0)`` without orthogonalization is
``torch.optim.AdamW`` (stable form) and :class:`~deepopt.AdamMemory` ``form="accumulate"`` (literal).

Example:
    >>> import torch
    >>> from deepopt.levels.multiscale import MultiScaleMomentum
    >>> lvl = MultiScaleMomentum(); group = dict(lvl.defaults); p = torch.randn(8, 16)
    >>> s = lvl.write(lvl.init(p, group), torch.randn(8, 16), p, group, t=1)
    >>> d = lvl.read(s, None, p, group, t=1).materialize()
    >>> round(float(d.square().mean().sqrt()), 3)
    0.2
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..base import Direction, Level, State, check_nonnegative, check_unit_interval, sqrt_moment, zeros_like
from ..orthogonal.level import NS_COEFFICIENTS, check_ns_method, owner_batched
from ..precision import ns_compute_dtype

__all__ = ["MultiScaleMomentum", "M3_FORMS"]

M3_FORMS = ("stable", "literal")


class MultiScaleMomentum(Level):
    """See the module docstring.

    Args:
        momenta: ``((b_1, C_1, w_1), ...)``, one triple per momentum level (group key ``"momenta"``).
        beta2, eps: the second-moment memory (group keys ``"beta2"``, ``"eps"``).
        form: ``"stable"`` or ``"literal"`` (group key ``"form"``).
        target_rms: RMS of the matrix step in the stable form; None disables the matching.
        ns_steps, ns_coefficients: the Newton-Schulz read-out (its form: the group's ``ns_method``,
            default ``"standard"``; M3 writes ``"auto"``, see :mod:`deepopt.levels.orthogonal`).
        ns_dtype: its computation dtype (bfloat16 by default).
    """

    name = "m3"
    #: not element-wise only through Newton-Schulz and the RMS of the step (a DTensor reduction):
    #: deepopt.distributed spreads the Newton-Schulz over ranks
    ns_spread = True

    def __init__(self, momenta: Sequence[tuple[float, int, float]] = ((0.9, 1, 1.0), (0.99, 10, 0.5)),
                 beta2: float = 0.999, eps: float = 1e-8, form: str = "stable", target_rms: float | None = 0.2,
                 ns_steps: int = 5, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 ns_dtype: torch.dtype | None = torch.bfloat16, keys: Mapping[str, str] | None = None) -> None:
        super().__init__(keys=keys, momenta=tuple(tuple(m) for m in momenta), beta2=beta2, eps=eps, form=form,
                         target_rms=target_rms, ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients))
        self.ns_dtype = ns_dtype

    def validate(self, group: Mapping[str, Any]) -> None:
        momenta, form = self.hp(group, "momenta"), self.hp(group, "form")
        if form not in M3_FORMS:
            raise ValueError(f"invalid form: {form!r}; use one of {M3_FORMS}")
        if not momenta:
            raise ValueError("invalid momenta: give at least one (beta, period, weight) level")
        for i, lvl in enumerate(momenta):
            if len(lvl) != 3:
                raise ValueError(f"invalid momenta[{i}]: {lvl!r}; each level is (beta, period, weight)")
            beta, period, _ = lvl
            if form == "stable":
                check_unit_interval(group, f"momenta[{i}] beta", value=beta)
            elif not beta >= 0:
                raise ValueError(f"invalid momenta[{i}] beta: {beta!r}; it must be >= 0")
            if not isinstance(period, int) or period < 1:
                raise ValueError(f"invalid momenta[{i}] period: {period!r}; use an int >= 1")
        (check_unit_interval if form == "stable" else check_nonnegative)(group, self.key("beta2"))
        check_nonnegative(group, self.key("eps"))
        rms = self.hp(group, "target_rms")
        if rms is not None and not rms > 0:
            raise ValueError(f"invalid target_rms: {rms!r}; use a float > 0 or None")
        check_ns_method(group)

    def _matrix(self, p: Tensor, group: Mapping[str, Any]) -> bool:
        flag = group.get("orthogonalize")
        return p.ndim >= 2 and (flag is None or bool(flag))

    def init(self, p: Tensor, group: Mapping[str, Any]) -> State:
        state = {"exp_avg_sq": zeros_like(p)}
        for i, (_, period, _) in enumerate(self.hp(group, "momenta")):
            state[f"m{i}"] = zeros_like(p)
            if period > 1:
                state[f"acc{i}"] = zeros_like(p)
                if self._matrix(p, group):
                    state[f"o{i}"] = zeros_like(p)
        return state

    def _ns(self, m: Tensor, group: Mapping[str, Any]) -> Tensor:
        return self._ns_many([m], group)[0]

    def _ns_many(self, ms: list[Tensor], group: Mapping[str, Any]) -> list[Tensor]:
        """``NS(m)`` of each, in ``m``'s shape and dtype (DTensors: spread over ranks)."""
        from ...distributed import orthogonalize_many
        from ..orthogonal.batched import orthogonalize_one

        coeffs, steps = tuple(self.hp(group, "ns_coefficients")), self.hp(group, "ns_steps")
        method = check_ns_method(group)
        dt = ns_compute_dtype(self.ns_dtype, method, ms[0].device) if ms and self.ns_dtype else self.ns_dtype
        outs = orthogonalize_many(ms, lambda x: orthogonalize_one(x, coeffs, steps, 1e-7, dt, method),
                                  dt, owner_batched(ms, coeffs, steps, 1e-7, dt, group))
        return [o.to(m.dtype) for o, m in zip(outs, ms)]

    def _write(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> tuple[State, list[int]]:
        """The write without its Newton-Schulz: the new state and the levels whose ``o`` is due."""
        stable = self.hp(group, "form") == "stable"
        b2 = self.hp(group, "beta2")
        v = state["exp_avg_sq"]
        new = {"exp_avg_sq": torch.addcmul(v * b2, x, x, value=1 - b2) if stable else torch.addcmul(v, x, x, value=b2)}
        matrix = self._matrix(p, group)
        due = []
        for i, (beta, period, _) in enumerate(self.hp(group, "momenta")):
            m = state[f"m{i}"]
            if period == 1:
                new[f"m{i}"] = m.lerp(x, 1 - beta) if stable else torch.add(m, x, alpha=beta)
                continue
            acc = state[f"acc{i}"] + x
            if t % period:
                new[f"m{i}"], new[f"acc{i}"] = m, acc
                if matrix:
                    new[f"o{i}"] = state[f"o{i}"]
                continue
            m = m.lerp(acc / period, 1 - beta) if stable else torch.add(m, acc, alpha=beta)
            new[f"m{i}"], new[f"acc{i}"] = m, torch.zeros_like(acc)
            if matrix:
                due.append(i)
        return new, due

    def write(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> State:
        new, due = self._write(state, x, p, group, t)
        for i, o in zip(due, self._ns_many([new[f"m{i}"] for i in due], group)):
            new[f"o{i}"] = o
        return new

    def write_(self, states: list[State], xs: list[Tensor], ps: list[Tensor],
               group: Mapping[str, Any], ts: list[int]) -> None:
        """The reference's write for each tensor, with every due Newton-Schulz in one call."""
        news, jobs = [], []
        for j, (state, x, p, t) in enumerate(zip(states, xs, ps, ts)):
            new, due = self._write(state, x, p, group, t)
            news.append(new)
            jobs += [(j, i) for i in due]
        for (j, i), o in zip(jobs, self._ns_many([news[j][f"m{i}"] for j, i in jobs], group)):
            news[j][f"o{i}"] = o
        for state, new in zip(states, news):
            for k, v in new.items():
                if state[k] is not v:
                    state[k].copy_(v)

    def read(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> Direction:
        fast = [i for i, (_, period, _) in enumerate(self.hp(group, "momenta")) if period == 1]
        os_ = self._ns_many([state[f"m{i}"] for i in fast], group) if self._matrix(p, group) else []
        return self._read(state, p, group, t, dict(zip(fast, os_)))

    def read_(self, states: list[State], xs: list[Tensor], ps: list[Tensor],
              group: Mapping[str, Any], ts: list[int]) -> list[Direction]:
        """The reference's read for each tensor, with every fast level's Newton-Schulz in one call."""
        fast = [i for i, (_, period, _) in enumerate(self.hp(group, "momenta")) if period == 1]
        jobs = [(j, i) for j, p in enumerate(ps) if self._matrix(p, group) for i in fast]
        outs = dict(zip(jobs, self._ns_many([states[j][f"m{i}"] for j, i in jobs], group)))
        return [self._read(s, p, group, t, {i: outs[(j, i)] for i in fast if (j, i) in outs})
                for j, (s, p, t) in enumerate(zip(states, ps, ts))]

    def _read(self, state: State, p: Tensor, group: Mapping[str, Any], t: int, fast: dict[int, Tensor]) -> Direction:
        """The read, given ``fast[i] = NS(M_i)`` of the period-1 levels (matrices)."""
        stable = self.hp(group, "form") == "stable"
        momenta, eps, b2 = self.hp(group, "momenta"), self.hp(group, "eps"), self.hp(group, "beta2")
        v = state["exp_avg_sq"]
        den = (sqrt_moment(v) / (1 - b2**t) ** 0.5 + eps) if stable else sqrt_moment(v) + eps
        if not self._matrix(p, group):
            if len(momenta) == 1 and momenta[0][1] == 1:
                beta, _, w = momenta[0]
                return Direction(state["m0"], den, mul=w, div=(1 - beta**t) if stable else 1.0)
            num = torch.zeros_like(p)
            for i, (beta, period, w) in enumerate(momenta):
                ti = t // period
                if ti > 0:
                    num = num + state[f"m{i}"] * (w / ((1 - beta**ti) if stable else 1.0))
            return Direction(num, den)
        num = torch.zeros_like(p)
        for i, (_, period, w) in enumerate(momenta):
            o = fast[i] if period == 1 else state[f"o{i}"]
            num = num + o * w
        d = num / den
        rms = self.hp(group, "target_rms")
        if stable and rms is not None:
            d = d * (rms / (d.square().mean().sqrt() + 1e-30))
        return Direction(d)

    def stats(self, state: State) -> dict[str, float]:
        return {k: float(v.float().norm()) for k, v in state.items() if k.startswith("m") or k == "exp_avg_sq"}
