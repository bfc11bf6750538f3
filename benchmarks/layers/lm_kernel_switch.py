"""Eager LM step time with the fast-weight Triton kernels on (default) or off, rounds interleaved (GPU).

The token form's decay-mix passes (``decay_kernels``) and the read's backward pass
(``read_kernels``) run as Triton kernels on CUDA; "off" forces their torch paths. Eager steps are
bound by the host's launches, whose cost moves between runs by more than the kernels change, so
both are timed in one process, rounds interleaved (as ``lm_value_checks``: AdamW, 32 x 256 tokens,
dim 384, depth 6), beside TransformerLM (which has neither).

Usage: ``python -m benchmarks.layers.lm_kernel_switch [--repeat 20] [--rounds 3]``.

Example (the table on made-up numbers):
    >>> print(table({"A": {"kernels": 10.0, "torch": 12.0}}, "A")[-1])
    | A | 10.0 | 12.0 | 1.20x | 1.00x |
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

from .lm_profile import _training_step
from .lm_steps import lm_builders
from .timing import clock_for, time_calls

MODES = ("kernels", "torch")


@contextlib.contextmanager
def mode(name: str):
    """The fast-weight kernels on ("kernels") or off ("torch") for the duration of the block."""
    from nl_layers.ops.fast_weights import decay_kernels, read_kernels

    saved = decay_kernels.kernel_ok, read_kernels.kernel_ok
    if name == "torch":
        decay_kernels.kernel_ok = read_kernels.kernel_ok = lambda *ts: False
    try:
        yield
    finally:
        decay_kernels.kernel_ok, read_kernels.kernel_ok = saved


def table(rows: dict, base: str) -> list[str]:
    lines = ["| model | kernels ms | torch ms | torch / kernels | kernels / base kernels |", "|---|---|---|---|---|"]
    for name, t in rows.items():
        lines.append(f"| {name} | {t['kernels']:.1f} | {t['torch']:.1f} | {t['torch'] / t['kernels']:.2f}x"
                     f" | {t['kernels'] / rows[base]['kernels']:.2f}x |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["TransformerLM", "TitansLM", "HopeLM()"])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("lm_kernel_switch: needs a CUDA device; nothing to do")
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    builders = lm_builders(256, 384, 6, 4)
    clock = clock_for("cuda")
    rows = {}
    for name in a.models:
        torch.manual_seed(0)
        model = builders[name]().cuda()
        step = _training_step(model, 256, 32, 256, "cuda", capturable=False)
        times = {m: [] for m in MODES}
        for _ in range(a.rounds):
            for m in MODES:
                with mode(m):
                    times[m].append(time_calls(step, clock, warmup=2, repeats=a.repeat, target_s=1e9).ms)
        rows[name] = {m: statistics.median(t) for m, t in times.items()}
        print(name, {m: round(v, 1) for m, v in rows[name].items()}, flush=True)
    print(f"\n{torch.cuda.get_device_name()}, eager AdamW step, ms (median of {a.rounds} rounds of {a.repeat})\n")
    print("\n".join(table(rows, a.models[0])))


if __name__ == "__main__":
    main()
