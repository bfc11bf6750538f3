"""Adam and diagonal preconditioners as element-wise L2 memories of gradients (paper App. B).

Adam's moments are the optimal memory of an element-wise regression of gradients: the solution of
sum_i ||m (.) g_i - P||^2 + lambda ||m||^2 with P = (sum_i g_i^2)^(1/2) gives the step
``W <- W - eta M / (sqrt(H) + eps)`` with accumulators ``M += b1 g`` and ``H += b2 g^2``
(``form="accumulate"``, paper-literal, AdaGrad-like). The exponential-moving-average form with
bias correction (``form="ema"``, the default) is exactly ``torch.optim.AdamW``'s:

    m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2,
    d = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).

:class:`DiagonalPreconditioner` keeps only the second moment and preconditions its input,
``P(x) = x / (sqrt(v_hat) + eps)``; with a ``period`` it is a slow level ("preconditioners as
levels", Eq. 47). :class:`FactoredPreconditioner` keeps Adafactor's factored second moment instead
(one mean of ``g^2`` per row and per column of each tensor viewed as a matrix): two vectors of state
in place of a tensor.

Example:
    >>> import torch
    >>> from deepopt.levels import AdamMoments
    >>> lvl = AdamMoments(); group = dict(lvl.defaults); p = torch.zeros(2)
    >>> s = lvl.write(lvl.init(p, group), torch.tensor([1.0, -2.0]), p, group, t=1)
    >>> lvl.read(s, None, p, group, t=1).materialize()  # first Adam step is ~ sign(g)
    tensor([ 1.0000, -1.0000])
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ..base import (Direction, Level, State, addcmul, axpy, check_nonnegative, check_unit_interval, sqrt_moment,
                    zeros_like)

__all__ = ["AdamMoments", "DiagonalPreconditioner", "FactoredPreconditioner", "ADAM_FORMS", "FACTORED_EPS"]

ADAM_FORMS = ("ema", "accumulate")


def _check_betas(group: Mapping[str, Any], key: str, form: str) -> None:
    betas = group[key]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"invalid {key}: {betas!r}; give two floats (beta1, beta2)")
    for i, b in enumerate(betas):
        if form == "ema":
            check_unit_interval(group, f"{key}[{i}]", value=b)
        elif not float(b) >= 0.0:
            raise ValueError(f"invalid {key}[{i}]: {b!r}; it must be >= 0")


class AdamMoments(Level):
    """Adam's first and second moments; read-out ``m_hat / (sqrt(v_hat) + eps)``.

    Args:
        betas: ``(b1, b2)`` (group key ``"betas"``).
        eps: added to the denominator (group key ``"eps"``).
        form: ``"ema"`` (torch AdamW, default) or ``"accumulate"`` (paper-literal sums).
        amsgrad: read ``v_max = max(v_max, v)`` instead of ``v`` (torch's AMSGrad; group key
            ``"amsgrad"``, absent and off when None).
    """

    name = "adam"
    elementwise = True  # acts on each entry alone: runs on local DTensor shards

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 form: str = "ema", period: int = 1, keys: Mapping[str, str] | None = None,
                 amsgrad: bool | None = None) -> None:
        extra = {} if amsgrad is None else {"amsgrad": amsgrad}
        super().__init__(period=period, keys=keys, betas=tuple(betas), eps=eps, form=form, **extra)

    def _ams(self, group: Mapping[str, Any]) -> bool:
        return bool(group.get(self.key("amsgrad"), False))

    def validate(self, group: Mapping[str, Any]) -> None:
        form = self.hp(group, "form")
        if form not in ADAM_FORMS:
            raise ValueError(f"invalid form: {form!r}; use one of {ADAM_FORMS}")
        _check_betas(group, self.key("betas"), form)
        check_nonnegative(group, self.key("eps"))
        if not isinstance(group.get(self.key("amsgrad"), False), bool):
            raise ValueError(f"invalid amsgrad: {group[self.key('amsgrad')]!r}; use True or False")

    def init(self, p: Tensor, group: Mapping[str, Any]) -> State:
        state = {"exp_avg": zeros_like(p), "exp_avg_sq": zeros_like(p)}
        if self._ams(group):
            state["max_exp_avg_sq"] = zeros_like(p)
        return state

    def write(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> State:
        b1, b2 = self.hp(group, "betas")
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if self.hp(group, "form") == "accumulate":
            new = {"exp_avg": axpy(m, x, b1), "exp_avg_sq": addcmul(v, x, x, b2)}
        else:
            new = {"exp_avg": m.lerp(x, 1 - b1), "exp_avg_sq": addcmul(v * b2, x, x, 1 - b2)}
        if self._ams(group):
            new["max_exp_avg_sq"] = torch.maximum(state["max_exp_avg_sq"], new["exp_avg_sq"])
        return new

    def read(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> Direction:
        m, eps = state["exp_avg"], self.hp(group, "eps")
        v = state["max_exp_avg_sq" if self._ams(group) else "exp_avg_sq"]
        if self.hp(group, "form") == "accumulate":
            return Direction(m, sqrt_moment(v) + eps)
        b1, b2 = self.hp(group, "betas")
        bc2_sqrt = (1 - b2**t) ** 0.5
        return Direction(m, sqrt_moment(v) / bc2_sqrt + eps, div=1 - b1**t)

    def write_(self, states: list[State], xs: list[Tensor], ps: list[Tensor],
               group: Mapping[str, Any], ts: list[int]) -> None:
        b1, b2 = self.hp(group, "betas")
        ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        if self.hp(group, "form") == "accumulate":
            torch._foreach_add_(ms, xs, alpha=b1)
            torch._foreach_addcmul_(vs, xs, xs, value=b2)
        else:
            torch._foreach_lerp_(ms, xs, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, xs, xs, value=1 - b2)
        if self._ams(group):
            torch._foreach_maximum_([s["max_exp_avg_sq"] for s in states], vs)

    def read_(self, states: list[State], xs: list[Tensor], ps: list[Tensor],
              group: Mapping[str, Any], ts: list[int]) -> list[Direction]:
        ms = [s["exp_avg"] for s in states]
        vs = [s["max_exp_avg_sq" if self._ams(group) else "exp_avg_sq"] for s in states]
        dens = torch._foreach_sqrt(vs)
        eps = self.hp(group, "eps")
        if self.hp(group, "form") == "accumulate":
            torch._foreach_add_(dens, eps)
            return [Direction(m, d) for m, d in zip(ms, dens)]
        b1, b2 = self.hp(group, "betas")
        torch._foreach_div_(dens, [(1 - b2**t) ** 0.5 for t in ts])
        torch._foreach_add_(dens, eps)
        return [Direction(m, d, div=1 - b1**t) for m, d, t in zip(ms, dens, ts)]


class _SecondMoment(Level):
    """A memory of ``g^2`` that preconditions its input (the shared hyperparameters and write input of
    :class:`DiagonalPreconditioner` and :class:`FactoredPreconditioner`)."""

    write_first = True

    def __init__(self, beta2: float = 0.999, eps: float = 1e-8, period: int = 1,
                 keys: Mapping[str, str] | None = None) -> None:
        super().__init__(period=period, keys=keys, beta2=beta2, eps=eps)

    def validate(self, group: Mapping[str, Any]) -> None:
        check_unit_interval(group, self.key("beta2"))
        check_nonnegative(group, self.key("eps"))

    def write_input(self, x: Tensor) -> Tensor:
        return x * x


class DiagonalPreconditioner(_SecondMoment):
    """Second-moment memory ``v <- b2 v + (1 - b2) g^2``; read ``x / (sqrt(v_hat) + eps)``.

    As a slow level (``period=C``) it accumulates ``g^2`` and is rewritten at steps
    1, C + 1, 2C + 1, ... (a preconditioner is undefined before its first write), while every
    step's input is preconditioned by the held statistic.

    Args:
        beta2: decay of the second moment (group key ``"beta2"``).
        eps: added to the denominator (group key ``"eps"``).
    """

    name = "precond"
    elementwise = True  # acts on each entry alone: runs on local DTensor shards

    def init(self, p: Tensor, group: Mapping[str, Any]) -> State:
        return {"exp_avg_sq": zeros_like(p)}

    def write(self, state: State, x2: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> State:
        b2 = self.hp(group, "beta2")
        return {"exp_avg_sq": axpy(state["exp_avg_sq"] * b2, x2, 1 - b2)}

    def read(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> Direction:
        bc2_sqrt = (1 - self.hp(group, "beta2") ** t) ** 0.5
        return Direction(x, sqrt_moment(state["exp_avg_sq"]) / bc2_sqrt + self.hp(group, "eps"))

    def _plain(self, group: Mapping[str, Any]) -> bool:
        """Whether the foreach path applies: float hyperparameters (tensors go through the reference)."""
        return not any(isinstance(self.hp(group, k), Tensor) for k in ("beta2", "eps"))

    def write_(self, states: list[State], xs: list[Tensor], ps: list[Tensor],
               group: Mapping[str, Any], ts: list[int]) -> None:
        """The write in place over the list (``xs`` are the squared inputs): the reference's
        operations, foreach."""
        if not self._plain(group):
            return super().write_(states, xs, ps, group, ts)
        b2 = self.hp(group, "beta2")
        vs = [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(vs, b2)
        torch._foreach_add_(vs, xs, alpha=1 - b2)

    def read_(self, states: list[State], xs: list[Tensor], ps: list[Tensor],
              group: Mapping[str, Any], ts: list[int]) -> list[Direction]:
        """The read over the list: denominators by foreach, as the reference computes them."""
        if not self._plain(group):
            return super().read_(states, xs, ps, group, ts)
        b2, eps = self.hp(group, "beta2"), self.hp(group, "eps")
        dens = torch._foreach_sqrt([s["exp_avg_sq"] for s in states])
        torch._foreach_div_(dens, [(1 - b2**t) ** 0.5 for t in ts])
        torch._foreach_add_(dens, eps)
        return [Direction(x, d) for x, d in zip(xs, dens)]


#: Adafactor's ``eps1``: added to ``g^2`` before its row and column means (an all-zero gradient
#: leaves positive statistics, so ``v_hat`` is never ``0 / 0``)
FACTORED_EPS = 1e-30


class FactoredPreconditioner(_SecondMoment):
    r"""Adafactor's factored second moment (Shazeer & Stern, 2018); read ``x / (sqrt(v_hat) + eps)``.

    Each tensor is viewed as a matrix (rows = first dim; a vector is one row). The memory keeps the
    means of ``g^2`` over each row and each column,

    .. math::
        r \leftarrow \beta_2 r + (1 - \beta_2)\,\mathrm{mean}_j (g_{ij}^2 + \epsilon_1), \quad
        c \leftarrow \beta_2 c + (1 - \beta_2)\,\mathrm{mean}_i (g_{ij}^2 + \epsilon_1), \quad
        \hat v_{ij} = \frac{r_i c_j}{\mathrm{mean}(r)\,(1 - \beta_2^t)},

    the rank-one fit of Adam's ``v`` (exact for a vector, whose one row is its second moment). Its
    state is ``rows + cols`` numbers (float32, float64 for float64 parameters) instead of one per
    entry, so a step reads no second moment per element. Nested Learning reading: the same
    element-wise L2 memory of gradients as :class:`DiagonalPreconditioner`, compressed to a
    factored memory.

    Args:
        beta2: decay of the statistics (group key ``"beta2"``).
        eps: added to the denominator (group key ``"eps"``).

    Example:
        >>> import torch
        >>> lvl = FactoredPreconditioner(); group = dict(lvl.defaults); p = torch.zeros(2, 3)
        >>> g = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]])
        >>> s = lvl.write(lvl.init(p, group), lvl.write_input(g), p, group, t=1)
        >>> d = lvl.read(s, g, p, group, t=1).materialize()  # a rank-one gradient: Adam's sign(g)
        >>> torch.allclose(d, torch.ones(2, 3))  # to rounding (the last bit differs between CPUs)
        True
    """

    name = "factored"

    def init(self, p: Tensor, group: Mapping[str, Any]) -> State:
        rows = p.shape[0] if p.ndim >= 2 else 1
        dt = torch.float64 if p.dtype == torch.float64 else torch.float32
        return {"exp_avg_sq_row": p.new_zeros(rows, dtype=dt), "exp_avg_sq_col": p.new_zeros(p.numel() // rows, dtype=dt)}

    def write(self, state: State, x2: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> State:
        b2 = self.hp(group, "beta2")
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        m = x2.reshape(row.numel(), -1).to(row.dtype)  # mean(g^2 + eps1) = mean(g^2) + eps1: no shifted copy
        return {"exp_avg_sq_row": axpy(row * b2, m.mean(1) + FACTORED_EPS, 1 - b2),
                "exp_avg_sq_col": axpy(col * b2, m.mean(0) + FACTORED_EPS, 1 - b2)}

    def read(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> Direction:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        bc2_sqrt = (1 - self.hp(group, "beta2") ** t) ** 0.5
        # sqrt(v_hat) = sqrt(r_i) sqrt(c_j / mean r) / sqrt(1 - b2^t): one outer product of two short
        # vectors plus eps, one pass over the tensor (and no underflow of a tiny r_i c_j)
        den = torch.outer(sqrt_moment(row), sqrt_moment(col / row.mean()) / bc2_sqrt) + self.hp(group, "eps")
        return Direction(x, den.reshape(x.shape).to(x.dtype))

    def stats(self, state: State) -> dict[str, float]:
        return {"exp_avg_sq_row": float(state["exp_avg_sq_row"].norm()),
                "exp_avg_sq_col": float(state["exp_avg_sq_col"].norm())}
