"""Momentum as an associative memory of gradients, and its delta-rule variant.

Momentum (paper Eqs. 10-13, 33) is the memory that solves, at every step,

    m_t = argmin_m  -<m, g_t> + 1/(2 eta) ||m - a m_{t-1}||^2   =>   m_t = a m_{t-1} + eta g_t,

i.e. one gradient step on a dot-product (Hebbian) objective. Delta momentum (Eq. 49) swaps the
objective for an L2 regression, so the memory also *forgets along the current gradient*:

    m_t = m_{t-1} (a I - lam G^T G / ||G||_F^2) + g_t,     lam in [0, 1],

with the gradient normalized so the decay stays bounded; lam = 0 is classic momentum.

Example:
    >>> import torch
    >>> from deepopt.levels import Momentum
    >>> lvl = Momentum(momentum=0.9)
    >>> p = torch.zeros(3); g = torch.ones(3); group = dict(lvl.defaults)
    >>> s = lvl.write(lvl.init(p, group), g, p, group, t=1)
    >>> s = lvl.write(s, g, p, group, t=2)
    >>> s["momentum_buffer"]
    tensor([1.9000, 1.9000, 1.9000])
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..base import Direction, Level, State, axpy, check_nonnegative, check_unit_interval, zeros_like
from ..precision import native_bf16_matmul

__all__ = ["Momentum", "DeltaMomentumLevel", "as_matrix", "forget_terms", "resolve_forget_dtype"]

_FORMS = ("sgd", "ema")


class Momentum(Level):
    """Momentum memory ``m <- a m + (1 - dampening) g`` (``form="sgd"``, torch's SGD) or
    ``m <- a m + (1 - a) g`` (``form="ema"``, torch's Muon).

    Read-out: ``m``, or with Nesterov ``g + a m`` (sgd) / ``(1 - a) g + a m`` (ema).

    Args:
        momentum: the decay ``a`` (group key ``"momentum"``).
        dampening: sgd form only; the first write copies ``g`` as torch's SGD does.
        nesterov: read the look-ahead.
        form: ``"sgd"`` or ``"ema"``.
        period, keys: see :class:`~deepopt.levels.base.Level`.
    """

    name = "momentum"
    elementwise = True  # acts on each entry alone: runs on local DTensor shards

    def __init__(self, momentum: float = 0.9, dampening: float = 0.0, nesterov: bool = False,
                 form: str = "sgd", period: int = 1, keys: Mapping[str, str] | None = None) -> None:
        if form not in _FORMS:
            raise ValueError(f"invalid form: {form!r}; use one of {_FORMS}")
        self.form = form
        hp = dict(momentum=momentum, nesterov=nesterov)
        if form == "sgd":
            hp["dampening"] = dampening
        super().__init__(period=period, keys=keys, **hp)

    def validate(self, group: Mapping[str, Any]) -> None:
        check_nonnegative(group, self.key("momentum"))
        if self.form == "sgd":
            check_nonnegative(group, self.key("dampening"))
            if self.hp(group, "nesterov") and (self.hp(group, "momentum") <= 0 or self.hp(group, "dampening") != 0):
                raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")

    def init(self, p: Tensor, group: Mapping[str, Any]) -> State:
        return {"momentum_buffer": zeros_like(p)}

    def write(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> State:
        buf, a = state["momentum_buffer"], self.hp(group, "momentum")
        if self.form == "ema":
            return {"momentum_buffer": buf.lerp(x, 1 - a)}
        if t == 1 or _no_momentum(a):  # torch's SGD starts the buffer as a copy of the first gradient
            return {"momentum_buffer": x.clone()}  # (and without momentum steps along g, ignoring dampening)
        return {"momentum_buffer": axpy(buf * a, x, 1 - self.hp(group, "dampening"))}

    def read(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> Direction:
        buf, a = state["momentum_buffer"], self.hp(group, "momentum")
        if not self.hp(group, "nesterov"):
            return Direction(buf)
        return Direction(x.lerp(buf, a) if self.form == "ema" else axpy(x, buf, a))

    def write_(self, states: list[State], xs: list[Tensor], ps: list[Tensor],
               group: Mapping[str, Any], ts: list[int]) -> None:
        bufs = [s["momentum_buffer"] for s in states]
        a = self.hp(group, "momentum")
        if self.form == "ema":
            torch._foreach_lerp_(bufs, xs, 1 - a)
            return
        first = list(range(len(ts))) if _no_momentum(a) else [i for i, t in enumerate(ts) if t == 1]
        for i in first:
            bufs[i].copy_(xs[i])
        if len(first) < len(bufs):
            keep = set(first)
            rest = [i for i in range(len(bufs)) if i not in keep]
            b, g = [bufs[i] for i in rest], [xs[i] for i in rest]
            torch._foreach_mul_(b, a)
            torch._foreach_add_(b, g, alpha=1 - self.hp(group, "dampening"))

    def read_(self, states: list[State], xs: list[Tensor], ps: list[Tensor],
              group: Mapping[str, Any], ts: list[int]) -> list[Direction]:
        bufs = [s["momentum_buffer"] for s in states]
        if not self.hp(group, "nesterov"):
            return [Direction(b) for b in bufs]
        a = self.hp(group, "momentum")
        if self.form == "ema":
            return [Direction(x.lerp(b, a)) for x, b in zip(xs, bufs)]
        return [Direction(d) for d in torch._foreach_add(xs, bufs, alpha=a)]


def _no_momentum(a: Any) -> bool:
    return not isinstance(a, Tensor) and a == 0


def as_matrix(x: Tensor) -> Tensor:
    """View a tensor as a matrix: rows = first dim (vectors and scalars become one row)."""
    if x.ndim <= 1:
        return x.reshape(1, -1)
    return x.reshape(x.shape[0], -1)


def resolve_forget_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    """``"auto"``: ``torch.bfloat16`` where :func:`native_bf16_matmul` holds on ``device``, else None
    (the buffer's dtype); a dtype or None is returned unchanged."""
    if dtype == "auto":
        return torch.bfloat16 if native_bf16_matmul(device) else None
    return dtype


def forget_terms(bufs: Sequence[Tensor], grads: Sequence[Tensor], dtype: torch.dtype | str | None = None,
                 cast: bool = True) -> list[Tensor]:
    """Delta momentum's forget terms ``M G^T G`` (``M``, ``G`` the buffer and gradient as matrices),
    each in its buffer's shape and dtype. Associated the cheaper way round (``(M G^T) G`` when
    ``rows <= cols``, else ``M (G^T G)``; a CUDA batch forms the symmetric ``G^T G`` on its upper
    triangle of tiles, which makes ``M (G^T G)`` the cheaper way for square matrices too) and, off
    the CPU, batched: one ``bmm`` pair per group of
    equal shapes (on the CPU a batch saves no launch and costs its stacking copies: one ``mm`` pair
    per matrix).
    ``dtype``: the matmuls' dtype (e.g. ``torch.bfloat16``: inputs rounded to it, accumulation in
    float32 as every bf16 matmul of torch does), applied to float32 and narrower matrices only
    (a vector's term is a dot product: no matmul to save); None computes in the buffer's dtype;
    ``"auto"``: bf16 on devices where it is native, the buffer's dtype elsewhere
    (:func:`resolve_forget_dtype`).
    ``cast=False`` leaves the terms in the matmul dtype (for a caller that folds them into a
    float32 update in one op: widening bf16 is exact, so the values are the same).

    Example:
        >>> import torch
        >>> m, g = torch.randn(2, 3), torch.randn(2, 3)
        >>> torch.allclose(forget_terms([m], [g])[0], m @ g.T @ g)
        True
    """
    out: list[Tensor | None] = [None] * len(bufs)
    groups: dict[tuple, list[int]] = {}
    for i, (m, g) in enumerate(zip(bufs, grads)):
        groups.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    for (shape, mdt, device), idx in groups.items():
        dt = resolve_forget_dtype(dtype, device)
        dt = dt if dt is not None and torch.finfo(mdt).bits <= 32 and len(shape) >= 2 else mdt
        ms = [as_matrix(bufs[i]) for i in idx]
        gs = [as_matrix(grads[i]) for i in idx]
        if len(idx) == 1 or device.type == "cpu":  # the CPU gains nothing from a batch but its copies
            for i, m, g in zip(idx, ms, gs):
                out[i] = _forget(m.to(dt), g.to(dt), mdt if cast else dt).reshape(shape)
            continue
        m = torch.empty((len(idx), *ms[0].shape), dtype=dt, device=ms[0].device)
        g = torch.empty_like(m)
        for j, (x, y) in enumerate(zip(ms, gs)):  # one conversion pass per tensor, straight into the stacked buffers
            m[j].copy_(x)
            g[j].copy_(y)
        f = _forget(m, g, mdt if cast else dt)
        for j, i in enumerate(idx):
            out[i] = f[j].reshape(shape)
    return out  # type: ignore[return-value]


class ForgetStacks:
    """Delta momentum's forget-term inputs for a list of matrix shapes, stacked per shape in the
    matmuls' dtype (``forget_dtype`` resolved as :func:`forget_terms` does), for a kernel to write
    the buffers and gradients into (:meth:`slots`, no stacking copies); :meth:`forget_terms` then
    runs one batched matmul pair per shape on them. Every slot must be written first.

    Example:
        >>> st = ForgetStacks([(2, 3), (2, 3), (4, 1)], None, torch.float32, torch.device("cpu"))
        >>> m, g = st.slots(0); _ = m.copy_(torch.ones(2, 3)), g.copy_(torch.ones(2, 3))
        >>> for j in (1, 2):
        ...     _ = [t.zero_() for t in st.slots(j)]
        >>> st.forget_terms()[0]
        tensor([[6., 6., 6.],
                [6., 6., 6.]])
    """

    def __init__(self, shapes: Sequence[tuple[int, int]], forget_dtype: torch.dtype | str | None,
                 buffer_dtype: torch.dtype, device: torch.device) -> None:
        dt = resolve_forget_dtype(forget_dtype, device)
        self.dtype = dt if dt is not None and torch.finfo(buffer_dtype).bits <= 32 else buffer_dtype
        groups: dict[tuple, list[int]] = {}
        for j, shape in enumerate(shapes):
            groups.setdefault(tuple(shape), []).append(j)
        self._where = {j: (shape, pos) for shape, js in groups.items() for pos, j in enumerate(js)}
        self.m = {shape: torch.empty((len(js), *shape), dtype=self.dtype, device=device) for shape, js in groups.items()}
        self.g = {shape: torch.empty_like(m) for shape, m in self.m.items()}

    def slots(self, j: int) -> tuple[Tensor, Tensor]:
        """Matrix ``j``'s (buffer, gradient) input slots: contiguous ``(rows, cols)`` views."""
        shape, pos = self._where[j]
        return self.m[shape][pos], self.g[shape][pos]

    def forget_terms(self) -> list[Tensor]:
        """``M G^T G`` of every matrix, in input order, in the matmuls' dtype."""
        out: list[Tensor | None] = [None] * len(self._where)
        terms = {shape: _forget(self.m[shape], self.g[shape], self.dtype) for shape in self.m}
        for j, (shape, pos) in self._where.items():
            out[j] = terms[shape][pos]
        return out  # type: ignore[return-value]


def _forget(m: Tensor, g: Tensor, dtype: torch.dtype) -> Tensor:
    """``m g^T g`` (matrices or stacks of them), associated the cheaper way round, in ``dtype``.
    A CUDA stack with ``rows >= cols`` forms the symmetric ``G^T G`` on its upper triangle of tiles
    (:func:`~deepopt.levels.orthogonal.symmetric.symmetric_baddbmm`; square matrices too, where
    that makes ``M (G^T G)`` the cheaper association)."""
    gt = g.mT
    if m.ndim == 3 and m.is_cuda and m.shape[-2] >= m.shape[-1]:
        from ..orthogonal.symmetric import symmetric_baddbmm

        f = m @ symmetric_baddbmm(gt, gt)
    else:
        f = (m @ gt) @ g if m.shape[-2] <= m.shape[-1] else m @ (gt @ g)
    return f.to(dtype)


class DeltaMomentumLevel(Level):
    """Delta momentum: ``m <- a m - lam (m G^T G) / ||G||_F^2 + g`` (Eq. 49, normalized).

    The memory is the momentum buffer viewed as a matrix (rows = first dim; a vector is one
    row, where ``G^T G / ||G||^2`` is the rank-1 projection on the gradient direction). The
    first write copies ``g`` and ``lam = 0`` is exactly :class:`Momentum` (sgd form, dampening 0).

    Args:
        momentum: the decay ``a`` (group key ``"momentum"``).
        delta: ``lam`` in [0, 1], the strength of forgetting along the gradient (key ``"delta"``).
        nesterov: read ``g + a m``.
        forget_dtype: the dtype of the forget term's matmuls for float32 and narrower parameters
            (not a group key; None: the parameter's; ``"auto"``, what DeltaMomentum uses: bf16
            where bf16 matmuls are native, see :func:`~deepopt.levels.precision.native_bf16_matmul`). ``torch.bfloat16``
            halves their cost with float32 accumulation; the term is scaled by
            ``lam / ||G||^2``, so its bf16 rounding (relative 2^-8) moves the buffer by at most
            about ``lam 2^-8 ||m||`` per step.
    """

    name = "delta"

    def __init__(self, momentum: float = 0.9, delta: float = 0.5, nesterov: bool = False,
                 period: int = 1, keys: Mapping[str, str] | None = None,
                 forget_dtype: torch.dtype | str | None = None) -> None:
        super().__init__(period=period, keys=keys, momentum=momentum, delta=delta, nesterov=nesterov)
        if not (forget_dtype is None or forget_dtype == "auto"
                or (isinstance(forget_dtype, torch.dtype) and forget_dtype.is_floating_point)):
            raise ValueError(f"invalid forget_dtype: {forget_dtype!r}; use 'auto', a floating torch dtype or None")
        self.forget_dtype = forget_dtype

    def validate(self, group: Mapping[str, Any]) -> None:
        check_nonnegative(group, self.key("momentum"))
        check_unit_interval(group, self.key("delta"), closed_right=True)

    def init(self, p: Tensor, group: Mapping[str, Any]) -> State:
        return {"momentum_buffer": zeros_like(p)}

    def write(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> State:
        if t == 1:
            return {"momentum_buffer": x.clone()}
        buf = state["momentum_buffer"]
        a, lam = self.hp(group, "momentum"), self.hp(group, "delta")
        decayed = buf * a
        if isinstance(lam, Tensor) or lam != 0:
            g = as_matrix(x)
            sq = (g * g).sum()
            sq = torch.where(sq > 0, sq, torch.ones_like(sq))  # g = 0 forgets nothing (forget = 0)
            forget = forget_terms([buf], [x], self.forget_dtype)[0]
            decayed = decayed - forget * (lam / sq)
        return {"momentum_buffer": torch.add(decayed, x, alpha=1.0)}

    def write_(self, states: list[State], xs: list[Tensor], ps: list[Tensor],
               group: Mapping[str, Any], ts: list[int]) -> None:
        """The same write over a list: forget terms batched over equal shapes, the rest foreach."""
        bufs = [s["momentum_buffer"] for s in states]
        a, lam = self.hp(group, "momentum"), self.hp(group, "delta")
        first = [i for i, t in enumerate(ts) if t == 1]
        for i in first:
            bufs[i].copy_(xs[i])
        rest = [i for i, t in enumerate(ts) if t != 1]
        if not rest:
            return
        b, g = [bufs[i] for i in rest], [xs[i] for i in rest]
        if isinstance(lam, Tensor) or lam != 0:
            forget = forget_terms(b, g, self.forget_dtype, cast=False)
            sq = torch._foreach_norm(g, 2)
            torch._foreach_mul_(sq, sq)
            scale = [torch.where(s > 0, s, torch.ones_like(s)).reciprocal_().mul_(-lam) for s in sq]
            torch._foreach_mul_(b, a)
            torch._foreach_addcmul_(b, forget, scale)  # b - lam F / ||g||^2 (scale: 0-d tensors)
        else:
            torch._foreach_mul_(b, a)
        torch._foreach_add_(b, g)

    def read(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> Direction:
        buf = state["momentum_buffer"]
        if self.hp(group, "nesterov"):
            return Direction(axpy(x, buf, self.hp(group, "momentum")))
        return Direction(buf)
