"""The linear memories at long T and small batch: tokens/s of each rule at each length.

This times forward + backward of ``LinearMemory`` for each rule (the layers suite's case: bf16 on
CUDA, ``--tokens`` per call, batch = tokens // T) at each T, all in one process, and prints each
row's tokens/s and the ratio of the first length's tokens/s to each later length's (the target:
within 1.5x of the 1K figure at 64K). Every rule runs fla's kernel on the whole sequence; the
record of 2026-12-06 is ``benchmarks/results/layers/long_context_h100.md``.

Usage: ``python -m benchmarks.layers.long_context_bench [--lengths 1024 65536] [--rules hebbian delta dgd]``.

Example (CPU, tiny):
    >>> rows = main(["--device", "cpu", "--dim", "16", "--heads", "2", "--tokens", "128",
    ...              "--lengths", "32", "64", "--rules", "hebbian", "--quiet"])
    >>> [(r["rule"], r["length"], r["batch"]) for r in rows]
    [('hebbian', 32, 4), ('hebbian', 64, 2)]
"""

from __future__ import annotations

import argparse

import torch

from .mixers import module_case
from .timing import add_mixer_arguments, clock_for, time_calls, tokens_per_second

RULES = ("hebbian", "delta", "dgd")


def _build(rule: str, dim: int, heads: int):
    import nl_layers

    return lambda: nl_layers.LinearMemory(dim, heads=heads, rule=rule)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 65536])
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    add_mixer_arguments(p)
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))  # noqa: E731
    clock, rows = clock_for(args.device), []
    for rule in args.rules:
        for length in args.lengths:
            batch = max(1, args.tokens // length)
            step = module_case(f"linear {rule}", "ours", _build(rule, args.dim, args.heads), args.dim,
                               args.device, dtype).make(batch, length)
            t = time_calls(step, clock, cap_s=args.cap_seconds)
            tps = tokens_per_second(batch * length, t.ms) if t.ms is not None else None
            rows.append({"rule": rule, "length": length, "batch": batch, "ms": t.ms, "tokens_per_s": tps})
            if tps is None:
                say(f"{rule} {batch} x {length}: skipped ({t.note})")
            else:
                say(f"{rule} {batch} x {length}: {t.ms:.2f} ms, {tps / 1e6:.2f} M tok/s")
            del step
    first = args.lengths[0]
    later = args.lengths[1:]
    say("\n| rule | " + " | ".join(f"T={n}" for n in args.lengths)
        + "".join(f" | T={first} / T={n}" for n in later) + " |")
    say("|---|" + "---|" * (len(args.lengths) + len(later)))
    for rule in args.rules:
        by = {r["length"]: r["tokens_per_s"] for r in rows if r["rule"] == rule}
        cells = [f"{by[n] / 1e6:.2f} M" if by[n] else "-" for n in args.lengths]
        ratios = [f"{by[first] / by[n]:.2f}x" if by[first] and by[n] else "-" for n in later]
        say(f"| {rule} | " + " | ".join(cells + ratios) + " |")
    return rows


if __name__ == "__main__":
    main()
