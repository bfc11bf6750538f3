"""Input validation shared by the layers: clear errors that name the parameter and the fix.

Every layer checks its input sequence with :func:`check_sequence` (shape, dtype and, unless turned
off with :func:`set_finite_checks`, finiteness). The finiteness check costs one reduction and, on a
GPU, one host synchronisation per call; turn it off for speed once a pipeline is known to be clean:
NaN or Inf then propagates to the outputs of the affected batch rows (never silently replaced).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

_FINITE_CHECKS = True


def set_finite_checks(enabled: bool) -> None:
    """Turn the NaN/Inf input check of every nl_layers layer on (default) or off."""
    global _FINITE_CHECKS
    _FINITE_CHECKS = bool(enabled)


def finite_checks_enabled() -> bool:
    """Whether layers reject NaN/Inf inputs with a ValueError."""
    return _FINITE_CHECKS


@contextmanager
def finite_checks(enabled: bool) -> Iterator[None]:
    """Turn the NaN/Inf input check on or off inside a ``with`` block; the previous setting returns after."""
    previous = _FINITE_CHECKS
    set_finite_checks(enabled)
    try:
        yield
    finally:
        set_finite_checks(previous)


def check_positive_int(value, name: str, *, allow_none: bool = False) -> None:
    """Raise unless ``value`` is an int >= 1 (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_choice(value, name: str, choices: Iterable[str]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise if ``x`` holds NaN or Inf (skipped when checks are off or under torch.compile)."""
    if not _FINITE_CHECKS or torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{name} contains NaN or Inf; clean the input (or call "
            "nl_layers.set_finite_checks(False) to let NaN propagate instead)"
        )


def check_sequence(x, dim: int, name: str = "x") -> None:
    """Check a (batch, time, dim) floating-point sequence."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, time, {dim}), got {type(x).__name__}")
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (batch, time, {dim}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no time steps (shape {tuple(x.shape)}); pass at least one token")
    check_finite(x, name)


def check_tokens(tokens, vocab_size: int, name: str = "tokens") -> None:
    """Check a (batch, time) tensor of token ids in [0, vocab_size)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, time), got {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must hold integer token ids, got {tensor_dtype(tokens)}")
    if tokens.shape[1] == 0:
        raise ValueError(f"{name} has no time steps; pass at least one token")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"{name} must lie in [0, {vocab_size}), got range [{int(tokens.min())}, {int(tokens.max())}]")


def check_state_batch(state_batch: int, batch: int) -> None:
    """Raise if a streaming state was made for another batch size."""
    if state_batch != batch:
        raise ValueError(
            f"state holds {state_batch} sequences but x has batch size {batch}; pass the state returned "
            "for this batch (or state=None to start new sequences)"
        )


def tensor_dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")
