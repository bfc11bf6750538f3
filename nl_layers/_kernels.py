"""One switch for the layers' own Triton kernels (``impl="auto"`` paths), like torch's SDPA backend flags.

The layers dispatch to Triton kernels on CUDA where one computes their op (the causal
convolution, the fast-weight token form's decay-mix and read passes, row-wise L2 normalisation,
the residual MLP memory's factor stages and its shared read's activation) and to the torch paths
elsewhere. The kernels cut the GPU's work; each launch costs the host more than a torch op, so an
eager step that waits on the host can be faster on the torch paths, while a step replayed as a
CUDA graph gains the kernels' GPU time in full. The switch changes only ``"auto"`` dispatch (an
explicit ``impl="triton"`` still runs the kernel) and never the results beyond float rounding.

Example:
    >>> import nl_layers
    >>> with nl_layers.triton_kernels(False):
    ...     nl_layers.triton_kernels_enabled()
    False
    >>> nl_layers.triton_kernels_enabled()
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

_ENABLED = True
IMPLS = ("auto", "triton", "torch")


def set_triton_kernels(enabled: bool) -> None:
    """Let ``impl="auto"`` take the layers' Triton kernels on CUDA (default) or always the torch paths."""
    global _ENABLED
    _ENABLED = bool(enabled)


def triton_kernels_enabled() -> bool:
    """Whether ``impl="auto"`` may take the layers' Triton kernels."""
    return _ENABLED


@contextmanager
def triton_kernels(enabled: bool) -> Iterator[None]:
    """:func:`set_triton_kernels` inside a ``with`` block; the previous setting returns after."""
    previous = _ENABLED
    set_triton_kernels(enabled)
    try:
        yield
    finally:
        set_triton_kernels(previous)


def resolve_impl(impl: str, kernel_ok: Callable[[], bool], has_triton: bool) -> str:
    """The path an op's ``impl`` argument takes: "auto" -> "triton" where ``kernel_ok()`` else "torch";
    an explicit "triton" needs triton; any other name raises.

    Example:
        >>> resolve_impl("auto", lambda: False, True)
        'torch'
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if kernel_ok() else "torch"
    if impl == "triton" and not has_triton:
        raise RuntimeError("impl='triton' needs triton")
    return impl
