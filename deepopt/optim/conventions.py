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

import functools
import importlib.util
import numbers
from typing import Any, Mapping

import torch
from torch import Tensor

from ..kernels.launch import interpreting
from ..kernels.nonfinite import KERNEL_DTYPES, kernel_nonfinite_flag, nonfinite_flag_torch
from ..levels.base import _HOST, host_ints

__all__ = ["CONVENTIONS", "check_conventions", "check_real", "state_dtype_for", "host_ints", "all_finite",
           "device_flag", "flag_set", "flag_to_host", "nonfinite_flag", "tensor_step", "outside_graphs", "run_eagerly"]

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


_PLAIN = {Tensor, torch.nn.Parameter}
#: on the CPU, tensors of at least this many elements are checked by their sum (see nonfinite_flag)
_LARGE = 1 << 15


def nonfinite_flag(tensors: list[Tensor]) -> Tensor | None:
    """A float32 one-element tensor on the tensors' device, 1.0 where any entry of any tensor is NaN
    or +-Inf, else 0.0 (None for no tensors). No host sync: one multi-tensor reduction per (device,
    dtype) group, as torch's ``_amp_foreach_non_finite_check_and_unscale_`` (read only here):

    * CUDA: one Triton launch per dtype that reads the gradients and sets the flag
      (:func:`~deepopt.kernels.nonfinite.kernel_nonfinite_flag`); without Triton, and for DTensor
      gradients, ``torch._foreach_norm(ts, inf)``, non-finite iff some max-norm is;
    * CPU: the sum of each large tensor (one vectorized read at memory speed, float32 accumulation
      for 16-bit dtypes: about half the cost of ``torch._foreach_norm(ts, 2)``, which accumulates in
      float64 there, and ~80x less than the max-norm), ``torch._foreach_norm(ts, 2)`` of the small
      ones (one call instead of a sum each): a NaN or Inf entry always makes its sum or norm
      non-finite; a non-finite one only says "maybe" (large finite entries can overflow it), so
      then, and only then, the exact max-norm decides (on the CPU reading a flag is no sync).

    DTensor gradients give their global flag (the norms reduce over the shards). Tensors on several
    devices: the flags meet on the first one.

    Example:
        >>> import torch
        >>> nonfinite_flag([torch.ones(3), torch.tensor([1.0, float("nan")])])
        tensor([1.])
        >>> nonfinite_flag([torch.full((2,), 1e30)])  # huge but finite
        tensor([0.])
    """
    from ..distributed import is_dtensor

    buckets: dict[tuple, list[Tensor]] = {}
    if tensors and set(map(type, tensors)) <= _PLAIN:  # (device, dtype) groups in one C++ call
        from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

        for (device, dtype), (lists, _) in _group_tensors_by_device_and_dtype([list(tensors)]).items():
            buckets[(device, dtype, False)] = lists[0]
    else:
        for t in tensors:
            buckets.setdefault((t.device, t.dtype, is_dtensor(t)), []).append(t)
    flags = []
    for (device, _, dtensor), ts in buckets.items():
        if device.type == "cpu" and not dtensor:
            wide = torch.float32 if ts[0].dtype in (torch.float16, torch.bfloat16) else None
            large = [t for t in ts if t.numel() >= _LARGE]
            sums = [t.sum(dtype=wide) for t in large]
            if len(large) < len(ts):  # small tensors: one multi-tensor call costs less than a sum each
                sums += torch._foreach_norm([t for t in ts if t.numel() < _LARGE], 2)
            bad = ~torch.stack(sums).isfinite().all()
            if bool(bad):  # maybe: an overflow of finite entries, or a real NaN/Inf
                bad = nonfinite_flag_torch(ts)
        elif device.type == "cuda" and not dtensor and _kernel_checks(ts[0].dtype):
            bad = kernel_nonfinite_flag(ts)
        else:
            bad = nonfinite_flag_torch(ts)
            if is_dtensor(bad):
                bad = bad.full_tensor()
        flags.append(bad.reshape(1).to(torch.float32))
    if not flags:
        return None
    flag = flags[0]
    for f in flags[1:]:
        flag = flag.maximum(f.to(flag.device, non_blocking=True))
    return flag


def _kernel_checks(dtype: torch.dtype) -> bool:
    """Whether CUDA gradients of ``dtype`` get the Triton check: a kernel dtype, compiled Triton
    (not the interpreter) importable."""
    return dtype in KERNEL_DTYPES and not interpreting() and _triton_available()


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def all_finite(tensors: list[Tensor]) -> bool:
    """Are all entries of all tensors finite? :func:`nonfinite_flag` read on the host (one sync on
    CUDA), outside compiled graphs."""
    return _HOST.get("finite", _all_finite)(tensors)


def _all_finite(tensors: list[Tensor]) -> bool:
    flag = nonfinite_flag(tensors)
    return flag is None or not bool(flag)


def device_flag(tensors: list[Tensor]) -> Tensor | None:
    """:func:`nonfinite_flag`, kept out of compiled graphs (its CPU refinement reads the host)."""
    return _HOST.get("nonfinite", nonfinite_flag)(tensors)


def flag_set(flag: Tensor) -> bool:
    """Read a non-finite flag on the host (free on the CPU, a sync on CUDA), outside compiled graphs."""
    return _HOST.get("flag", _flag_set)(flag)


def _flag_set(flag: Tensor) -> bool:
    return bool(flag)


def flag_to_host(flag: Tensor) -> tuple[Tensor, Any]:
    """Start copying a CUDA flag to the host: ``(pinned host tensor, CUDA event)``; the copy is
    asynchronous (no sync), and the host tensor holds the flag once the event has completed.
    Outside compiled graphs."""
    return _HOST.get("to_host", _flag_to_host)(flag)


def _flag_to_host(flag: Tensor) -> tuple[Tensor, Any]:
    host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def run_eagerly(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` outside compiled graphs: for the shell's bookkeeping on its own attributes (a
    pending flag, the skipped-step count), which some torch versions' dynamo cannot trace (2.11:
    "setattr on a user-defined object" of an optimizer). Eager callers pay nothing."""
    if not torch.compiler.is_compiling():
        return fn(*args)
    return _HOST.get("call", _call)(fn, *args)


def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)


def outside_graphs() -> None:
    """Wrap the shell's host reads for ``torch.compile`` (see :func:`deepopt.levels.base.outside_graphs`)."""
    from ..levels.base import outside_graphs as wrap

    wrap(finite=_all_finite, flag=_flag_set, nonfinite=nonfinite_flag, to_host=_flag_to_host, call=_call)
