"""Eager LM step time with the layers' value checks inside the model, skipped (default) or run (GPU).

A value check of a layer's input (NaN/Inf) is one host synchronisation on a GPU. A language model
checks its token ids once; since this change the layers inside it skip the check of the model's
own activations. This times the eager training step (as ``lm_profile``: AdamW, 32 x 256 tokens,
dim 384, depth 6) both ways in one run, rounds interleaved, and with every value check off.

Usage: ``python -m benchmarks.layers.lm_value_checks [--repeat 20] [--rounds 3]``.

Example (the table on made-up numbers):
    >>> print(table({"A": {"inner skipped": 10.0, "inner checked": 12.0, "all off": 9.5}})[-1])
    | A | 10.0 | 12.0 | 9.5 | 1.20x |
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

from .lm_profile import _training_step
from .lm_steps import lm_builders
from .timing import clock_for, time_calls

MODES = ("inner skipped", "inner checked", "all off")


@contextlib.contextmanager
def mode(name: str):
    """The value checks as in ``name`` (see MODES) for the duration of the block."""
    import nl_layers
    from nl_layers import _checks

    saved = _checks.inner_activations
    if name == "inner checked":  # the behaviour before: every layer re-checks its input
        _checks.inner_activations = contextlib.nullcontext
    try:
        with nl_layers.value_checks(name != "all off"):
            yield
    finally:
        _checks.inner_activations = saved


def table(rows: dict) -> list[str]:
    lines = ["| model | " + " ms | ".join(MODES) + " ms | checked / skipped |", "|---|---|---|---|---|"]
    for name, t in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{t[m]:.1f}" for m in MODES)
                     + f" | {t['inner checked'] / t['inner skipped']:.2f}x |")
    return lines


def interleaved(models, modes, mode, repeat: int, rounds: int) -> dict:
    """{model: {mode: median ms}} of the eager training step (AdamW, 32 x 256 tokens, dim 384,
    depth 6, TF32) under each ``mode(name)`` context, the modes interleaved in every round (GPU)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    builders = lm_builders(256, 384, 6, 4)
    clock = clock_for("cuda")
    rows = {}
    for name in models:
        torch.manual_seed(0)
        model = builders[name]().cuda()
        step = _training_step(model, 256, 32, 256, "cuda", capturable=False)
        times = {m: [] for m in modes}
        for _ in range(rounds):
            for m in modes:
                with mode(m):
                    times[m].append(time_calls(step, clock, warmup=2, repeats=repeat, target_s=1e9).ms)
        rows[name] = {m: statistics.median(t) for m, t in times.items()}
        print(name, {m: round(v, 1) for m, v in rows[name].items()}, flush=True)
    print(f"\n{torch.cuda.get_device_name()}, eager AdamW step, ms (median of {rounds} rounds of {repeat})\n")
    return rows


def arguments(argv, prog: str, doc: str):
    """--models, --repeat, --rounds of an interleaved eager comparison; None without CUDA (said)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["TransformerLM", "TitansLM", "HopeLM()"])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{prog}: needs a CUDA device; nothing to do")
        return None
    return a


def main(argv=None) -> None:
    a = arguments(argv, "lm_value_checks", __doc__)
    if a is not None:
        print("\n".join(table(interleaved(a.models, MODES, mode, a.repeat, a.rounds))))

if __name__ == "__main__":
    main()
