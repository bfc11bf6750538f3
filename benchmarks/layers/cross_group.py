"""How many chunks the cross-chunk scan takes in one closed form: the Titans memories' tokens/s for
several ``nl_layers.ops.fast_weights.cross.GROUP`` values.

Up to GROUP chunks, every chunk's start state is one product with an (n K) x (n K) operator; beyond,
groups of GROUP chunks in closed form, then the groups' maps recursively and a fix-up pass
(cross.py). A larger GROUP does more arithmetic in fewer passes. This times forward + backward of
each mixer (the layers suite's cases: bf16 on CUDA, ``--tokens`` per call) at each T and GROUP, in
turn within one process, and checks that each GROUP's output equals the default's on a small
float32 input first.

Usage: ``python -m benchmarks.layers.cross_group [--groups 16 32 64] [--lengths 1024 4096 16384]
[--mixers NeuralMemory HopeBlock] [--device cuda]``.

Example (CPU, tiny):
    >>> rows = main(["--device", "cpu", "--dim", "16", "--heads", "2", "--tokens", "256",
    ...              "--lengths", "128", "--groups", "2", "16", "--mixers", "NeuralMemory", "--quiet"])
    >>> sorted({r["group"] for r in rows}), rows[0]["mixer"]
    ([2, 16], 'NeuralMemory')
"""

from __future__ import annotations

import argparse

import torch

from .mixers import module_case
from .timing import add_mixer_arguments, clock_for, time_calls, tokens_per_second

MIXERS = ("NeuralMemory", "SelfModifyingTitans", "HopeBlock")


def _build(name: str, dim: int, heads: int):
    import nl_layers

    return lambda: getattr(nl_layers, name)(dim, heads=heads)


def _first(y):
    return y[0] if isinstance(y, tuple) else y


def check_equal(name: str, groups, dim: int, heads: int, device: str) -> float:
    """Largest difference of each GROUP's output from the default's (float32, 2 sequences of more
    than 2 x max(groups) chunks, the last one partial)."""
    from nl_layers.ops.fast_weights import cross

    torch.manual_seed(0)
    layer = _build(name, dim, heads)().to(device)
    x = torch.randn(2, layer_chunk(layer) * (2 * max(groups) + 1) + 5, dim, device=device)
    default, worst = cross.GROUP, 0.0
    try:
        with torch.no_grad():
            want = _first(layer(x))
            for g in groups:
                cross.GROUP = g
                worst = max(worst, float((_first(layer(x)) - want).abs().max()))
    finally:
        cross.GROUP = default
    return worst


def layer_chunk(layer) -> int:
    """The chunk size of the layer's memory (its first submodule with ``chunk_size``)."""
    return next(m.chunk_size for m in layer.modules() if isinstance(getattr(m, "chunk_size", None), int))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS)
    add_mixer_arguments(p)
    args = p.parse_args(argv)
    from nl_layers.ops.fast_weights import cross

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    clock, default, rows = clock_for(args.device), cross.GROUP, []
    for name in args.mixers:
        diff = check_equal(name, args.groups, args.dim, args.heads, args.device)
        if not args.quiet:
            print(f"{name}: largest output difference across groups (float32) {diff:.2e}", flush=True)
        for length in args.lengths:
            step = module_case(name, "ours", _build(name, args.dim, args.heads), args.dim, args.device, dtype).make(
                max(1, args.tokens // length), length)
            for g in args.groups:
                cross.GROUP = g
                try:
                    t = time_calls(step, clock, cap_s=args.cap_seconds)
                finally:
                    cross.GROUP = default
                tps = tokens_per_second(max(1, args.tokens // length) * length, t.ms)
                rows.append({"mixer": name, "length": length, "group": g, "ms": t.ms, "tokens_per_s": tps,
                             "max_diff": diff})
                if not args.quiet:
                    print(f"{name} T={length} GROUP={g}: {t.ms:.2f} ms, {tps / 1e6:.2f} M tok/s", flush=True)
            del step
    if not args.quiet:
        print(f"\n| mixer | T | " + " | ".join(f"GROUP={g}" for g in args.groups) + " |")
        print("|---|---|" + "---|" * len(args.groups))
        for name in args.mixers:
            for length in args.lengths:
                cells = [f"{r['tokens_per_s'] / 1e6:.2f} M" for r in rows if r["mixer"] == name and r["length"] == length]
                print(f"| {name} | {length} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
