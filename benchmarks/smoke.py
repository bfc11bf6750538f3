"""The ``speed`` suite, and its ``--smoke`` run on a CPU.

Without ``--smoke``, :func:`run_speed` is :func:`benchmarks.speed.run_speed_suite` (CUDA events on
the GPT-like list, or the CPU clock on 8 matrices with ``--device cpu``). With ``--smoke`` on a CPU
it runs the same suite code (optimizer construction, state bytes, tables, results files) on a tiny
GPT-like list (dim 64, 2 layers, vocab 256), with the timers, the copy-bandwidth and the matmul
probes replaced by quick CPU-clock versions: a check that the suite works, not a measurement.

Example:
    >>> ms = cpu_time(lambda: None, warmup=1, repeats=3)
    >>> ms >= 0.0
    True
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable
from unittest import mock

from . import speed


def cpu_time(fn: Callable[[], None], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` on the CPU clock after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


@contextlib.contextmanager
def speed_on_cpu():
    """Patch the speed suite's GPU-only probes and its parameter list for a CPU smoke run."""
    tiny = speed.gpt_param_shapes(dim=64, layers=2, vocab=256)
    fast = lambda fn, warmup, repeats: cpu_time(fn, 1, 2)  # noqa: E731
    with mock.patch.object(speed, "time_cuda", fast), mock.patch.object(speed, "time_cpu", fast), \
            mock.patch.object(speed, "copy_bandwidth", lambda device, gib=1.0: 1.0), \
            mock.patch.object(speed, "matmul_tflops", lambda device, n=8192: 1.0), \
            mock.patch.object(speed, "gpt_param_shapes", lambda *a, **k: tiny), \
            mock.patch.object(speed, "cpu_param_shapes", lambda *a, **k: tiny):
        yield


def run_speed(args, out_dir: str) -> dict:
    """The speed suite (``args`` of ``python -m benchmarks run``); a CPU smoke run with ``--smoke``."""
    if args.smoke and not args.device.startswith("cuda"):
        with speed_on_cpu():
            return speed.run_speed_suite(args, out_dir)
    return speed.run_speed_suite(args, out_dir)
