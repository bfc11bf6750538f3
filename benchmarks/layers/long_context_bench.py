"""The linear memories at long T and small batch: tokens/s of each rule at each length.

This times forward + backward of ``LinearMemory`` for each rule (the layers suite's case: bf16 on
CUDA, ``--tokens`` per call, batch = tokens // T) at each T, all in one process, and prints each
row's tokens/s and the ratio of the first length's tokens/s to each later length's (the target:
within 1.5x of the 1K figure at 64K).

The delta rules (delta, dgd) on fla cut long sequences at small batch into segments side by side
(``nl_layers.ops.linear_memory.fla_split``). ``--segments`` times them at each count given:
``auto`` (the layer's own choice, the default), ``1`` (never cut: fla's kernel on the whole
sequence) or a fixed count. Before timing, on CUDA with fla, ``--check`` compares the split
against the unsplit call at the longest length (output and input gradient). The hebbian rule is
never cut (one row per length). Records: ``benchmarks/results/layers/long_context_h100.md``.

Usage: ``python -m benchmarks.layers.long_context_bench [--lengths 1024 65536] [--rules hebbian delta dgd]
[--segments auto 1 16] [--check]``.

Example (CPU, tiny):
    >>> rows = main(["--device", "cpu", "--dim", "16", "--heads", "2", "--tokens", "128",
    ...              "--lengths", "32", "64", "--rules", "hebbian", "--quiet"])
    >>> [(r["rule"], r["segments"], r["length"], r["batch"]) for r in rows]
    [('hebbian', 'auto', 32, 4), ('hebbian', 'auto', 64, 2)]
"""

from __future__ import annotations

import argparse

import torch

from .mixers import module_case
from .timing import add_mixer_arguments, clock_for, time_calls, tokens_per_second

RULES = ("hebbian", "delta", "dgd")
DELTA_RULES = ("delta", "dgd")


def _build(rule: str, dim: int, heads: int):
    import nl_layers

    return lambda: nl_layers.LinearMemory(dim, heads=heads, rule=rule)


def _segments_arg(text: str):
    if text == "auto":
        return text
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"a segment count is 'auto' or >= 1, got {text}")
    return count


def _split_context(mode):
    """The context in which a delta rule runs with ``mode`` segments ('auto': the layer's choice)."""
    import contextlib

    from nl_layers.ops.linear_memory import fla

    return contextlib.nullcontext() if mode == "auto" else fla.segments(mode)


def check(rule: str, dim: int, heads: int, length: int, device: str, mode="auto") -> tuple[int, float, float]:
    """The split against the unsplit call on one sequence of ``length``: (segments, output error,
    input-gradient error), each the largest difference relative to the unsplit one's largest entry."""
    from nl_layers.ops.linear_memory import fla, fla_split

    torch.manual_seed(0)
    layer = _build(rule, dim, heads)().to(device=device, dtype=torch.bfloat16)
    x = torch.randn(1, length, dim, device=device, dtype=torch.bfloat16)
    grad = torch.randn_like(x)

    def run(ctx):
        xi = x.clone().requires_grad_()
        with ctx:
            y = layer(xi)
            y = y[0] if isinstance(y, tuple) else y
            y.backward(grad)
        return y.detach().float(), xi.grad.float()

    y0, g0 = run(fla.segments(1))
    y1, g1 = run(_split_context(mode))
    count = mode if mode != "auto" else fla_split.segment_count(1, length, heads, torch.device(device))

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    return count, rel(y1, y0), rel(g1, g0)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 65536])
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--segments", type=_segments_arg, nargs="+", default=["auto"],
                   help="segment counts for the delta rules: 'auto' (the layer's choice), 1 (unsplit), or a count")
    p.add_argument("--check", action="store_true", help="compare the split with the unsplit call first (CUDA, fla)")
    add_mixer_arguments(p)
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))  # noqa: E731
    if args.check:
        for rule in (r for r in args.rules if r in DELTA_RULES):
            for mode in (m for m in args.segments if m != 1):
                n = max(args.lengths)
                count, out, grad = check(rule, args.dim, args.heads, n, args.device, mode)
                say(f"check: {rule}, 1 x {n}: {count} segments; output {out:.2e}, input gradient {grad:.2e} (largest "
                    "difference from the unsplit call, relative to its largest entry, torch.bfloat16)")
    clock, rows = clock_for(args.device), []
    for rule in args.rules:
        modes = args.segments if rule in DELTA_RULES else ["auto"]
        for mode in modes:
            for length in args.lengths:
                batch = max(1, args.tokens // length)
                step = module_case(f"linear {rule}", "ours", _build(rule, args.dim, args.heads), args.dim,
                                   args.device, dtype).make(batch, length)
                if rule in DELTA_RULES:
                    inner = step

                    def step(inner=inner, mode=mode):
                        with _split_context(mode):
                            inner()

                t = time_calls(step, clock, cap_s=args.cap_seconds)
                tps = tokens_per_second(batch * length, t.ms) if t.ms is not None else None
                rows.append({"rule": rule, "segments": mode, "length": length, "batch": batch, "ms": t.ms,
                             "tokens_per_s": tps})
                label = f"{rule} (segments {mode}) {batch} x {length}"
                if tps is None:
                    say(f"{label}: skipped ({t.note})")
                else:
                    say(f"{label}: {t.ms:.2f} ms, {tps / 1e6:.2f} M tok/s")
                del step
    first = args.lengths[0]
    later = args.lengths[1:]
    say("\n| rule | segments | " + " | ".join(f"T={n}" for n in args.lengths)
        + "".join(f" | T={first} / T={n}" for n in later) + " |")
    say("|---|---|" + "---|" * (len(args.lengths) + len(later)))
    for rule in args.rules:
        for mode in (args.segments if rule in DELTA_RULES else ["auto"]):
            by = {r["length"]: r["tokens_per_s"] for r in rows if r["rule"] == rule and r["segments"] == mode}
            cells = [f"{by[n] / 1e6:.2f} M" if by[n] else "-" for n in args.lengths]
            ratios = [f"{by[first] / by[n]:.2f}x" if by[first] and by[n] else "-" for n in later]
            say(f"| {rule} | {mode} | " + " | ".join(cells + ratios) + " |")
    return rows


if __name__ == "__main__":
    main()
