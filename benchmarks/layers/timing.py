"""Timing one forward+backward (or training) step: clocks, adaptive repeats, time caps, OOM.

- A *clock* times one call in milliseconds: :class:`CudaClock` with CUDA events (synchronized
  after each call), :class:`CpuClock` with ``time.perf_counter`` (tests, CPU smoke runs).
- :func:`time_calls` runs warm-up calls, then timed calls until ``repeats`` of them, or at least
  ``min_repeats`` once they add up to ``target_s``; it stops early when the next call would take
  the calls after the first past ``cap_s`` seconds (a slow layer gets fewer repeats, never
  minutes). The first call may compile or autotune: it is never timed; after a first call of more
  than ``3 x cap_s`` the layer is skipped only if its second call also passes ``cap_s``.
  Reported: the median of the timed calls.
- :func:`measure` builds a case at (batch, length), times it, reads the peak memory, and turns
  an out-of-memory error (or any other) into a row that says so.
- :class:`LengthGuard` skips a case's longer lengths once one of its measurements took longer
  than ``cap_s`` (not counting its first call), or its per-call time scaled to the next length
  predicts that.

Example:
    >>> t = time_calls(lambda: sum(range(1000)), CpuClock(), warmup=1, repeats=3)
    >>> t.repeats, t.ms > 0
    (3, True)
    >>> guard = LengthGuard(cap_s=10.0)
    >>> guard.update("attn", 1024, {"seconds": 2.0, "ms": 3000.0})
    >>> guard.reason("attn", 4096)  # 3 s per call at 1K predicts 12 s per call at 4K
    'skipped: 3.0 s per call at T=1,024 predicts 12 s per call at T=4,096 (cap 10 s per measurement)'
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


class CpuClock:
    """Wall-clock milliseconds of one call (``time.perf_counter``)."""

    name = "time.perf_counter"

    def call(self, fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


class CudaClock:
    """Milliseconds of one call between two CUDA events (synchronized after the call)."""

    name = "CUDA events"

    def call(self, fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def clock_for(device: str):
    """CUDA events on a CUDA device, ``perf_counter`` elsewhere."""
    return CudaClock() if device.startswith("cuda") else CpuClock()


@dataclass
class Timing:
    """Median ms of the timed calls (None when none ran), their count, all calls, the first call's ms."""

    ms: float | None
    repeats: int
    calls: int
    first_ms: float
    note: str = ""


def time_calls(fn: Callable[[], object], clock, warmup: int = 2, repeats: int = 10, min_repeats: int = 3,
               target_s: float = 1.0, cap_s: float = 20.0) -> Timing:
    """Warm up, then time calls of ``fn`` (see the module doc for when it stops)."""
    first = clock.call(fn)
    warm_left, timed, last, calls, spent = max(0, warmup - 1), [], first, 1, 0.0
    if first / 1e3 > 3 * cap_s:  # compilation or autotuning (fla: 1-2 min on a fresh machine), or a slow layer
        last = clock.call(fn)
        calls, spent, warm_left = 2, last / 1e3, max(0, warm_left - 1)
        if last / 1e3 > cap_s:
            return Timing(None, 0, 2, first, f"one call took {first / 1e3:.0f} s (> 3 x cap {cap_s:.0f} s), "
                                               f"the next {last / 1e3:.0f} s (> cap)")
    while True:
        if len(timed) >= repeats or (len(timed) >= min_repeats and sum(timed) / 1e3 >= target_s):
            break
        if spent + last / 1e3 > cap_s and calls > 1:
            break  # the next call would pass the cap
        last = clock.call(fn)
        spent += last / 1e3
        calls += 1
        if warm_left:
            warm_left -= 1
        else:
            timed.append(last)
    note = ""
    if not timed:  # the cap cut the warm-up: the last warm-up call stands in (not the first one)
        timed, note = [last], f"1 call after the first ({calls} in all): the cap cut the warm-up"
    return Timing(statistics.median(timed), len(timed), calls, first, note)


def add_mixer_arguments(parser) -> None:
    """The arguments every mixer-timing tool shares: ``--dim``, ``--heads``, ``--tokens`` (per call,
    batch = tokens // T), ``--device``, ``--cap-seconds`` (per measurement) and ``--quiet``."""
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per call (batch = tokens // T)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cap-seconds", type=float, default=10.0)
    parser.add_argument("--quiet", action="store_true")


def tokens_per_second(tokens: int, ms: float) -> float:
    return tokens / (ms * 1e-3)


def length_schedule(tokens: int, lengths: Sequence[int]) -> list[tuple[int, int]]:
    """(batch, T) pairs with batch = tokens // T (at least 1).

    >>> length_schedule(65536, (1024, 65536, 131072))
    [(64, 1024), (1, 65536), (1, 131072)]
    """
    return [(max(1, tokens // t), t) for t in lengths]


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _build_and_time(make, batch: int, length: int, clock, timing: dict) -> Timing:
    """In its own frame, so that the layer and its tensors are freed when it returns or raises."""
    return time_calls(make(batch, length), clock, **timing)


def measure(make: Callable[[int, int], Callable[[], object]], batch: int, length: int, device: str, clock,
            tokens: int | None = None, **timing) -> dict:
    """Build the step ``make(batch, length)``, time it (``time_calls`` keywords in ``timing``) and
    return a row: ``ms``, ``tokens_per_s`` (``tokens`` defaults to batch x length), ``peak_GiB``
    (CUDA only), ``repeats``, ``calls``, ``seconds``; or ``error`` ("out of memory", or the
    exception) with ``seconds``."""
    tokens = batch * length if tokens is None else tokens
    row: dict = {"batch": batch, "length": length, "tokens": tokens}
    start = time.perf_counter()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        timed = _build_and_time(make, batch, length, clock, timing)
        if timed.ms is None:
            row["skipped"] = "skipped: " + timed.note
            row["first_call_ms"] = timed.first_ms
        else:
            row.update(ms=timed.ms, tokens_per_s=tokens_per_second(tokens, timed.ms), repeats=timed.repeats,
                       calls=timed.calls, first_call_ms=timed.first_ms)
            if timed.note:
                row["note"] = timed.note
        if cuda:
            row["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as err:  # out of memory at long lengths is a result, not a crash
        row["error"] = "out of memory" if is_out_of_memory(err) else f"{type(err).__name__}: {err}"[:300]
    _free(device)
    row["seconds"] = time.perf_counter() - start
    return row


class LengthGuard:
    """Per case, why a longer length is skipped (see the module doc); ``None`` when it may run."""

    def __init__(self, cap_s: float):
        self.cap_s = cap_s
        self._last: dict[str, tuple[int, dict]] = {}
        self._timed: dict[str, tuple[int, float]] = {}  # the last length that ran, and its ms per call

    def update(self, name: str, length: int, row: dict) -> None:
        self._last[name] = (length, row)
        if row.get("ms"):
            self._timed[name] = (length, row["ms"])

    def reason(self, name: str, length: int) -> str | None:
        if name not in self._last:
            return None
        prev, row = self._last[name]
        if row.get("skipped"):
            return f"skipped: T={prev:,} was skipped"
        after_first = row.get("seconds", 0.0) - row.get("first_call_ms", 0.0) / 1e3  # the first call may compile
        if after_first > self.cap_s:
            return f"skipped: T={prev:,} took {after_first:.0f} s after its first call > cap {self.cap_s:.0f} s"
        if name in self._timed and length > self._timed[name][0]:  # after an error: the last length that ran
            ran, ms = self._timed[name]
            predicted = ms / 1e3 * length / ran  # fixed tokens per call: time grows at least like T
            if 2 * predicted > self.cap_s:  # at least two calls (one warm-up, one timed)
                return (f"skipped: {ms / 1e3:.1f} s per call at T={ran:,} predicts {predicted:.0f} s per call "
                        f"at T={length:,} (cap {self.cap_s:.0f} s per measurement)")
        return None


class Deadline:
    """Seconds left to a section: its share of the budget plus what earlier sections left unused.

    >>> d = Deadline(total_s=100.0, now=lambda: 0.0)
    >>> d.start_section(0.5)
    >>> d.left()
    50.0
    """

    def __init__(self, total_s: float, now: Callable[[], float] = time.perf_counter):
        self.now, self.begin, self.total_s = now, now(), total_s
        self.end = self.begin
        self._planned = 0.0

    def start_section(self, share: float) -> None:
        self._planned += share * self.total_s
        self.end = self.begin + self._planned  # unused time of earlier sections carries over

    def left(self) -> float:
        return self.end - self.now()
