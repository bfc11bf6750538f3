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

import contextlib

from .lm_value_checks import arguments, interleaved

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
    a = arguments(argv, "lm_kernel_switch", __doc__)
    if a is not None:
        print("\n".join(table(interleaved(a.models, MODES, mode, a.repeat, a.rounds), a.models[0])))

if __name__ == "__main__":
    main()
