"""Deep momentum (DMGD, paper Eq. 50): the momentum buffer becomes a small network.

The memory of one parameter tensor is ``m_phi(u) = b + sum_j w2_j tanh(w1_j k + b1_j)``, applied
element-wise, with ``k = u / rms(u)`` the gradient normalized per tensor. Its parameters are
``phi = (b, w1, b1, w2)``: ``b`` has the parameter's shape (the linear, per-element part of the
memory) and ``w1, b1, w2`` (``hidden`` numbers each) a shared element-wise MLP. The memory learns
by gradient descent with decay on the inner objective of momentum, the dot product with the
incoming gradient (computed with ``torch.func.grad``):

    L(phi; u) = -<b, u> - (1/n) sum_e u_e MLP(k_e),
    b <- a b - grad_b L,   w2 <- a w2 - eta grad_w2 L,   (w1, b1) <- (w1, b1) - eta grad L,

with ``eta = inner_lr``: the decay ``a`` forgets the memory's content (``b`` and the output layer
``w2``) while the input features ``w1, b1`` learn without decay (decaying them too would silence
the MLP within ~1/(1-a) steps).

Its read-out at the current gradient drives the step: ``W <- W - lr sigma(m_phi(u_t))`` with
``sigma`` in {"identity", "sign", "ns"} (Newton-Schulz on matrices, identity elsewhere).

Reduction: the update of ``b`` is exactly ``b <- a b + u``; with ``inner_lr=0`` and the default
``w2 = 0`` the MLP stays silent and DeepMomentum is exactly SGD momentum (``torch.optim.SGD``,
dampening 0), which a test checks bit for bit.

The memory's initial MLP weights are the group key ``"memory_init"`` (so a meta-learned
initialization travels in the optimizer's ``state_dict``), and ``momentum``/``inner_lr`` may be
tensors: :mod:`deepopt.meta` differentiates through the memory with respect to all three.

Example:
    >>> import torch
    >>> from deepopt.levels.deep import DeepMemory
    >>> lvl = DeepMemory(hidden=4); group = dict(lvl.defaults); p = torch.zeros(6)
    >>> s = lvl.write(lvl.init(p, group), torch.randn(6), p, group, t=1)
    >>> sorted(s)
    ['b1', 'bias', 'w1', 'w2']
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor
from torch.func import grad

from ..base import Direction, Level, State, axpy, check_nonnegative, zeros_like
from ..orthogonal.level import NS_COEFFICIENTS, adjust_lr_ratio, newton_schulz

__all__ = ["DeepMemory", "default_memory_init", "SIGMAS"]

SIGMAS = ("identity", "sign", "ns")
_MLP_KEYS = ("w1", "b1", "w2")


def default_memory_init(hidden: int = 8) -> dict[str, Tensor]:
    """Deterministic initial MLP weights: spread slopes and offsets, silent output (``w2 = 0``)."""
    return {"w1": torch.linspace(0.5, 2.0, hidden), "b1": torch.linspace(-1.0, 1.0, hidden),
            "w2": torch.zeros(hidden)}


def _normalize(u: Tensor) -> Tensor:
    return u / (u.square().mean().sqrt() + 1e-30)


def _mlp(phi: Mapping[str, Tensor], k: Tensor) -> Tensor:
    hidden = torch.tanh(k.unsqueeze(-1) * phi["w1"] + phi["b1"])
    return hidden @ phi["w2"]


def _inner_loss(phi: Mapping[str, Tensor], u: Tensor, k: Tensor) -> Tensor:
    """Momentum's dot-product objective over the memory's read-out (per-element mean for the MLP)."""
    return -(phi["bias"] * u).sum() - (u * _mlp(phi, k)).mean()


_inner_grad = grad(_inner_loss)


class DeepMemory(Level):
    """Deep momentum memory; see the module docstring for the math.

    Args:
        momentum: decay ``a`` of all memory parameters (group key ``"momentum"``).
        inner_lr: the MLP's inner learning rate (group key ``"inner_lr"``; 0 = classic momentum).
        sigma: read-out map, one of ``SIGMAS`` (group key ``"sigma"``).
        hidden: width of the element-wise MLP (structural).
        memory_init: initial ``{"w1", "b1", "w2"}`` tensors of shape ``(hidden,)`` (group key
            ``"memory_init"``, learnable by :mod:`deepopt.meta`); default :func:`default_memory_init`.
    """

    name = "deep"

    def __init__(self, momentum: float = 0.9, inner_lr: float = 0.1, sigma: str = "identity", hidden: int = 8,
                 memory_init: Mapping[str, Tensor] | None = None, keys: Mapping[str, str] | None = None) -> None:
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"invalid hidden: {hidden!r}; the memory MLP needs an int width >= 1")
        self.hidden = hidden
        init = dict(memory_init) if memory_init is not None else default_memory_init(hidden)
        self._check_init(init)
        self.memory_init = {k: init[k].detach().clone() for k in _MLP_KEYS}
        super().__init__(keys=keys, momentum=momentum, inner_lr=inner_lr, sigma=sigma, memory_init=self.memory_init)

    def _check_init(self, init: Any) -> None:
        if not isinstance(init, Mapping) or any(
                k not in init or not isinstance(init[k], Tensor) or tuple(init[k].shape) != (self.hidden,)
                for k in _MLP_KEYS):
            raise ValueError(f"invalid memory_init: needs a dict of tensors {_MLP_KEYS} of shape ({self.hidden},) "
                             f"(hidden={self.hidden})")

    def validate(self, group: Mapping[str, Any]) -> None:
        check_nonnegative(group, self.key("momentum"))
        check_nonnegative(group, self.key("inner_lr"))
        if self.hp(group, "sigma") not in SIGMAS:
            raise ValueError(f"invalid sigma: {self.hp(group, 'sigma')!r}; use one of {SIGMAS}")
        self._check_init(self.hp(group, "memory_init"))

    def init(self, p: Tensor, group: Mapping[str, Any]) -> State:
        init = self.hp(group, "memory_init")
        # a copy per parameter: the in-place fast path writes into these buffers
        state = {k: init[k].to(device=p.device, dtype=p.dtype, copy=True) for k in _MLP_KEYS}
        state["bias"] = zeros_like(p)
        return state

    def write(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> State:
        a, eta = self.hp(group, "momentum"), self.hp(group, "inner_lr")
        grads = _inner_grad(state, x, _normalize(x))
        new = {"bias": torch.add(state["bias"] * a, grads["bias"], alpha=-1.0)}
        for k in _MLP_KEYS:
            keep = state[k] * a if k == "w2" else state[k]  # decay the memory's content, not its features
            new[k] = axpy(keep, grads[k], -eta) if isinstance(eta, Tensor) or eta != 0 else keep
        return new

    def read(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> Direction:
        # the MLP is always read (a silent one adds exact zeros), so no branch depends on the state
        out = state["bias"] + _mlp(state, _normalize(x))
        sigma = self.hp(group, "sigma")
        if sigma == "sign":
            return Direction(out.sign())
        if sigma == "ns" and p.ndim >= 2:
            o = newton_schulz(out.reshape(out.shape[0], -1), NS_COEFFICIENTS, 5, 1e-7).reshape(out.shape)
            return Direction(o, mul=adjust_lr_ratio(p.shape, None))
        return Direction(out)

    def stats(self, state: State) -> dict[str, float]:
        return {"bias": float(state["bias"].float().norm()), "mlp_w2": float(state["w2"].float().norm())}
