"""The linear memories at long T and small batch: the hebbian rule with and without segments.

``nl_layers.ops.linear_memory.segments`` cuts a long sequence at a small batch into segments that
run side by side through fla's kernel (exact: a scan over the segments' memories and one correction
product). This times forward + backward of ``LinearMemory`` for each rule (the layers suite's case:
bf16 on CUDA, ``--tokens`` per call, batch = tokens // T) at each T, hebbian both with the segments
(the default) and without (``segments.MIN_SEGMENT`` raised past T), delta and dgd (never cut) once,
all in one process, and prints each row's tokens/s and its ratio to the same mode's first length
(the issue's target: within 1.5x of the 1K figure at 64K). First it checks that the hebbian layer's
output and input gradient with segments equal those without, on one long sequence.

Usage: ``python -m benchmarks.layers.segments_bench [--lengths 1024 65536] [--rules hebbian delta dgd]``.

Example (CPU, tiny: no segments on a CPU, so both hebbian modes run the same path):
    >>> rows = main(["--device", "cpu", "--dim", "16", "--heads", "2", "--tokens", "128",
    ...              "--lengths", "32", "64", "--rules", "hebbian", "--quiet"])
    >>> [(r["mode"], r["length"]) for r in rows]
    [('segments', 32), ('segments', 64), ('direct', 32), ('direct', 64)]
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from .mixers import module_case
from .timing import add_mixer_arguments, clock_for, time_calls, tokens_per_second

RULES = ("hebbian", "delta", "dgd")


def _build(rule: str, dim: int, heads: int):
    import nl_layers

    return lambda: nl_layers.LinearMemory(dim, heads=heads, rule=rule)


@contextlib.contextmanager
def direct():
    """No segments inside the block: ``MIN_SEGMENT`` past any length."""
    from nl_layers.ops.linear_memory import segments

    saved = segments.MIN_SEGMENT
    segments.MIN_SEGMENT = 1 << 40
    try:
        yield
    finally:
        segments.MIN_SEGMENT = saved


def check_equal(dim: int, heads: int, length: int, device: str, dtype: torch.dtype) -> tuple[float, float, int]:
    """(largest output difference, largest input-gradient difference, segments used) of the hebbian
    layer with segments against without, one sequence of ``length`` tokens, relative to the
    largest magnitude of the direct result."""
    from nl_layers.ops.linear_memory import segments

    torch.manual_seed(0)
    layer = _build("hebbian", dim, heads)().to(device=device, dtype=dtype)
    x = torch.randn(1, length, dim, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    cuts = segments.segment_count(1, length, heads, torch.device(device))

    def run():
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(dy)
        return y.detach().float(), xi.grad.float()

    y_seg, g_seg = run()
    with direct():
        y_dir, g_dir = run()
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))  # noqa: E731
    return rel(y_seg, y_dir), rel(g_seg, g_dir), cuts


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 65536])
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    add_mixer_arguments(p)
    p.add_argument("--check-length", type=int, default=16384, help="one sequence this long for the check")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))  # noqa: E731
    if "hebbian" in args.rules and args.device.startswith("cuda"):
        dy_out, dy_grad, cuts = check_equal(args.dim, args.heads, args.check_length, args.device, dtype)
        say(f"hebbian, 1 x {args.check_length}: {cuts} segments; output {dy_out:.2e}, input gradient {dy_grad:.2e} "
            f"(largest difference from the direct run, relative to its largest entry, {dtype})")
    clock, rows = clock_for(args.device), []
    for rule in args.rules:
        for mode in (("segments", "direct") if rule == "hebbian" else ("direct",)):
            for length in args.lengths:
                batch = max(1, args.tokens // length)
                step = module_case(f"linear {rule}", "ours", _build(rule, args.dim, args.heads), args.dim,
                                   args.device, dtype).make(batch, length)
                with direct() if mode == "direct" else contextlib.nullcontext():
                    t = time_calls(step, clock, cap_s=args.cap_seconds)
                tps = tokens_per_second(batch * length, t.ms)
                rows.append({"rule": rule, "mode": mode, "length": length, "batch": batch, "ms": t.ms,
                             "tokens_per_s": tps})
                say(f"{rule} {mode} {batch} x {length}: {t.ms:.2f} ms, {tps / 1e6:.2f} M tok/s")
                del step
    say("\n| rule | mode | " + " | ".join(f"T={n}" for n in args.lengths) + f" | T={args.lengths[0]} / T={args.lengths[-1]} |")
    say("|---|---|" + "---|" * (len(args.lengths) + 1))
    for rule in args.rules:
        for mode in (("segments", "direct") if rule == "hebbian" else ("direct",)):
            by = {r["length"]: r["tokens_per_s"] for r in rows if r["rule"] == rule and r["mode"] == mode}
            cells = [f"{by[n] / 1e6:.2f} M" for n in args.lengths]
            say(f"| {rule} | {mode} | " + " | ".join(cells) + f" | {by[args.lengths[0]] / by[args.lengths[-1]]:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
