"""Input validation shared by the layers: clear errors that name the parameter and the fix.

What each check costs, per call:

- argument checks (:func:`check_positive_int`, :func:`check_choice`): constructors only, free;
- shape, dtype and length checks of :func:`check_sequence` / :func:`check_tokens`: tensor
  metadata only (no kernel, no synchronisation); always on, also under ``torch.compile``;
- value checks, which read the data and so need the host:

  * finiteness (:func:`check_finite`, by every layer on its input): one ``isfinite().all()``
    reduction and, on a GPU, one device-to-host synchronisation;
  * token range (:func:`check_tokens`, by the language models): one ``aminmax`` reduction and,
    on a GPU, one synchronisation. Without it an out-of-range id still fails, in the embedding
    lookup: IndexError on the CPU, a device-side assert (which ends the CUDA context) on a GPU.

Value checks run in eager mode only: they are skipped while ``torch.compile`` traces (so compiled
models have no graph break and no synchronisation from them), and they can be turned off globally
with :func:`set_value_checks` (or the :func:`value_checks` context manager) once a pipeline is
known to be clean, which makes an eager forward free of synchronisation too. NaN or Inf then
propagates to the outputs of the affected batch rows (never silently replaced).
``set_finite_checks`` / ``finite_checks`` / ``finite_checks_enabled`` are the older names of the
same switch.

Example:
    >>> import torch, nl_layers
    >>> lm = nl_layers.TransformerLM(vocab_size=10, dim=16, depth=1, heads=2)
    >>> lm(torch.tensor([[3, 10]]))
    Traceback (most recent call last):
    ...
    ValueError: tokens must lie in [0, 10), got range [3, 10] (...)
    >>> with nl_layers.value_checks(False):     # no host synchronisation in forward
    ...     logits = lm(torch.tensor([[3, 9]]))
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

_VALUE_CHECKS = True
_INNER = threading.local()  # depth of models, in this thread, whose layers skip checks of inner activations


def set_value_checks(enabled: bool) -> None:
    """Turn the value checks (NaN/Inf inputs, token range) of every nl_layers layer on (default) or off."""
    global _VALUE_CHECKS
    _VALUE_CHECKS = bool(enabled)


def value_checks_enabled() -> bool:
    """Whether layers check input values (NaN/Inf, token range) in eager mode."""
    return _VALUE_CHECKS


@contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the value checks on or off inside a ``with`` block; the previous setting returns after."""
    previous = _VALUE_CHECKS
    set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def _run_value_checks() -> bool:
    # is_compiling first: while tracing, the switch is never read (no guard on it, no recompile).
    return not torch.compiler.is_compiling() and _VALUE_CHECKS and not getattr(_INNER, "depth", 0)


@contextmanager
def inner_activations() -> Iterator[None]:
    """Inside a model whose inputs were checked (a language model's token ids), its layers skip
    the value checks of their inputs: those are the model's own activations, and each check would
    synchronise the host with the GPU once per layer call. Thread-local; shape and type checks
    still run. Entered through :func:`run_inner`."""
    _INNER.depth = getattr(_INNER, "depth", 0) + 1
    try:
        yield
    finally:
        _INNER.depth -= 1


def run_inner(fn, *args):
    """``fn(*args)`` inside :func:`inner_activations`, or directly while compiling (the checks never
    run there, and the traced code holds no context manager)."""
    if torch.compiler.is_compiling():
        return fn(*args)
    with inner_activations():
        return fn(*args)


# Older names of the same switch.
set_finite_checks, finite_checks_enabled, finite_checks = set_value_checks, value_checks_enabled, value_checks


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
    """Raise if ``x`` holds NaN or Inf (eager value check: one reduction, one sync on a GPU)."""
    if _run_value_checks() and not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{name} contains NaN or Inf; clean the input (or call "
            "nl_layers.set_value_checks(False) to let NaN propagate instead)"
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
    """Check a (batch, time) tensor of integer token ids; the range [0, vocab_size) is an eager value check."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, time), got {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must hold integer token ids, got {tensor_dtype(tokens)}")
    if tokens.shape[1] == 0:
        raise ValueError(f"{name} has no time steps; pass at least one token")
    if not _run_value_checks() or tokens.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(tokens)).tolist()  # one synchronisation on a GPU
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{name} must lie in [0, {vocab_size}), got range [{low}, {high}] "
            "(nl_layers.set_value_checks(False) skips this check and its synchronisation)"
        )


def check_state_batch(state_batch: int, batch: int) -> None:
    """Raise if a streaming state was made for another batch size."""
    if state_batch != batch:
        raise ValueError(
            f"state holds {state_batch} sequences but x has batch size {batch}; pass the state returned "
            "for this batch (or state=None to start new sequences)"
        )


def tensor_dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")
