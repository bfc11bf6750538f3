"""Eager LM step time with the layers' Triton kernels on (default) or off, rounds interleaved (GPU).

The causal convolution, the token form's decay-mix passes, the read's backward pass, the L2
normalisations and the residual MLP memory's element-wise stages run as Triton kernels on CUDA;
"off" (``nl_layers.triton_kernels(False)``) takes their torch paths. Eager steps are bound by the
host's launches, whose cost moves between runs by more than the kernels change, so both are
timed in one process, rounds interleaved (as ``lm_value_checks``: AdamW,
32 x 256 tokens, dim 384, depth 6), beside TransformerLM (which has none of them).

Usage: ``python -m benchmarks.layers.lm_kernel_switch [--repeat 20] [--rounds 3]``.

Example (the table on made-up numbers):
    >>> print(table({"A": {"kernels": 10.0, "torch": 12.0}}, "A")[-1])
    | A | 10.0 | 12.0 | 1.20x | 1.00x |
"""

from __future__ import annotations

from .lm_value_checks import arguments, interleaved

MODES = ("kernels", "torch")


def mode(name: str):
    """The layers' Triton kernels on ("kernels") or off ("torch") for the duration of the block."""
    import nl_layers

    return nl_layers.triton_kernels(name == "kernels")


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
