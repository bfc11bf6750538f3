"""torch.optim conventions shared by every deepopt optimizer shell.

Param-group keys every torch optimizer has, with torch's defaults (:data:`CONVENTIONS`):

* ``maximize``: step along ``+g`` (the shell uses ``-g`` as the gradient; grads are never
  modified in place).
* ``foreach``: ``None`` (the ``impl`` choice), ``True`` (multi-tensor ``torch._foreach_*`` path)
  or ``False`` (tensor by tensor). Both give the same numbers, as in torch.
* ``fused``, ``capturable``, ``differentiable``: only their off values are supported; any
  other value raises a ``ValueError`` naming the argument (deepopt's fused path is
  ``impl="triton"``; differentiable steps are :mod:`deepopt.functional`).

Hyperparameter types follow torch: ``lr`` and ``weight_decay`` are real numbers or one-element
tensors (a string raises ``TypeError``, a bad value ``ValueError``), checked before parameters.

State precision (``state_dtype``, a group key): the optimizer state is kept in that dtype and the
step computed in it (``p`` and ``g`` upcast, the result rounded once into ``p``). float16
parameters get float32 state by default: float16's range cannot hold Adam's ``v ~ g^2`` nor
``eps = 1e-8``, so torch's AdamW turns float16 parameters non-finite at its first step.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping

import torch
from torch import Tensor

from ..levels.base import _HOST, host_ints

__all__ = ["CONVENTIONS", "check_conventions", "check_real", "state_dtype_for", "host_ints", "all_finite",
           "tensor_step", "outside_graphs"]

#: group keys of torch's optimizers, with their defaults (filled into older checkpoints' groups).
CONVENTIONS: dict[str, Any] = {"maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                               "fused": None}

_UNSUPPORTED = {
    "fused": (False, None, "deepopt's fused path is impl='triton' (its own kernels, not torch's fused ones)"),
    "capturable": (False, False, "the step reads its step count on the host, so it cannot be captured in a CUDA graph"),
    "differentiable": (False, False, "differentiate through steps with deepopt.functional (pure, torch.func-ready)"),
}


def check_real(name: str, value: Any, what: str) -> None:
    """torch's checks for ``lr``/``weight_decay``: a real number or a one-element tensor, ``>= 0``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"invalid {name}: a Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        v = float(value.detach())
    elif isinstance(value, numbers.Real):
        v = float(value)
    else:
        raise TypeError(f"invalid {name}: {value!r} ({type(value).__name__}); {what} must be a real number "
                        "or a one-element Tensor")
    if not v >= 0.0:
        raise ValueError(f"invalid {name}: {value!r}; {what} must be >= 0")


def check_conventions(group: Mapping[str, Any]) -> None:
    """Raise a ``ValueError`` naming the argument for a convention value deepopt does not support."""
    if not isinstance(group.get("maximize", False), bool):
        raise ValueError(f"invalid maximize: {group['maximize']!r}; use True or False")
    if group.get("foreach") not in (None, True, False):
        raise ValueError(f"invalid foreach: {group['foreach']!r}; use None, True or False")
    for key, (ok, default, why) in _UNSUPPORTED.items():
        v = group.get(key, default)
        if v not in (ok, default):
            raise ValueError(f"{key}={v!r} is not supported: {why}; use {key}={default!r}")
    dtype = group.get("state_dtype")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"invalid state_dtype: {dtype!r}; use a floating torch dtype such as torch.float32")


def state_dtype_for(p: Tensor, group: Mapping[str, Any]) -> torch.dtype | None:
    """The dtype the state of ``p`` lives (and its step is computed) in, or None for ``p.dtype``.

    The group's ``state_dtype`` if set, float32 for float16 parameters, else ``p.dtype``. A
    ``state_dtype`` narrower than the parameter is refused (the step would round ``p``)."""
    dtype = group.get("state_dtype")
    if dtype is None:
        return torch.float32 if p.dtype == torch.float16 else None
    if dtype == p.dtype:
        return None
    if torch.promote_types(dtype, p.dtype) != dtype:
        raise ValueError(f"invalid state_dtype: {dtype} is narrower than the parameters' {p.dtype}; the step is "
                         "computed in state_dtype, so it must be at least as wide (e.g. torch.float32)")
    return dtype


def tensor_step(value: Any) -> Any:
    """A checkpoint's per-parameter ``step`` as a float32 tensor (older torch saved a number)."""
    if isinstance(value, Tensor) or not isinstance(value, numbers.Real):
        return value
    return torch.tensor(float(value), dtype=torch.float32)


def all_finite(tensors: list[Tensor]) -> bool:
    """Are all entries of all tensors finite? One max-norm reduction per (device, dtype) over the
    whole list (``torch._foreach_norm``) and a single host sync, outside compiled graphs."""
    return _HOST.get("finite", _all_finite)(tensors)


def _all_finite(tensors: list[Tensor]) -> bool:
    from ..distributed import is_dtensor

    buckets: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype, is_dtensor(t)), []).append(t)
    flags = [torch.stack(torch._foreach_norm(ts, float("inf"))).isfinite().all() for ts in buckets.values()]
    return all(bool(f) for f in flags)


def outside_graphs() -> None:
    """Wrap the shell's host reads for ``torch.compile`` (see :func:`deepopt.levels.base.outside_graphs`)."""
    from ..levels.base import outside_graphs as wrap

    wrap(finite=_all_finite)
