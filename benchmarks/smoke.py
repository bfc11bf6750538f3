"""The ``speed`` suite, and its ``--smoke`` run on a CPU.

Without ``--smoke``, :func:`run_speed` is :func:`benchmarks.speed.run_speed_suite` (CUDA events on
the GPT-like list, or the CPU clock on 8 matrices with ``--device cpu``). With ``--smoke`` on a CPU
it runs the same suite code (optimizer construction, state bytes, tables, results files) on a tiny
GPT-like list (dim 64, 2 layers, vocab 256), with the timers, the copy-bandwidth and the matmul
probes replaced by quick CPU-clock versions: a check that the suite works, not a measurement.

Example:
    >>> with speed_on_cpu():
    ...     speed.time_cuda(lambda: None, warmup=10, repeats=100) >= 0.0  # the quick CPU clock
    True
"""

from __future__ import annotations

import contextlib
from unittest import mock

from . import speed


@contextlib.contextmanager
def speed_on_cpu():
    """Patch the speed suite's GPU-only probes and its parameter list for a CPU smoke run."""
    tiny = speed.gpt_param_shapes(dim=64, layers=2, vocab=256)
    time_cpu = speed.time_cpu
    fast = lambda fn, warmup, repeats: time_cpu(fn, 1, 2)  # noqa: E731
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
