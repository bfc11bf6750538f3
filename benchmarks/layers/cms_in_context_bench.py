"""The in-context CMS: its closed-form chunk step against the generic torch.func path, same run.

Two CMS with the same weights, levels stepping every 16 and 64 tokens (``in_context=(None, 16,
64)``): one with ``activation="gelu"`` (closed form, :mod:`nl_layers.cms_in_context_mlp`), one with
the same function given as a lambda, which the closed form does not know (the generic
``vmap``/``grad``/``jvp`` path). Each (width, batch, length) first checks that both give the same
output, then times forward and forward + backward of both in interleaved rounds (median over
rounds), and prints tokens/s and the ratio.

Usage: ``python -m benchmarks.layers.cms_in_context_bench [--sizes 64x4x256 256x4x256] [--device cpu]``.

Example (CPU, tiny):
    >>> rows = main(["--sizes", "8x2x32", "--rounds", "1", "--repeats", "1", "--quiet"])
    >>> sorted(rows[0]) == ["batch", "closed", "dim", "generic", "kind", "length", "max_diff", "ratio"]
    True
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def build(dim: int, activation, device: str):
    import nl_layers

    torch.manual_seed(0)
    return nl_layers.CMS(dim, periods=(1, 4, 16), in_context=(None, 16, 64), activation=activation).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(dim: int, batch: int, length: int, device: str, rounds: int, repeats: int) -> list[dict]:
    closed, generic = build(dim, "gelu", device), build(dim, lambda z: F.gelu(z), device)
    generic.load_state_dict(closed.state_dict())
    x = torch.randn(batch, length, dim, device=device, requires_grad=True)
    with torch.no_grad():
        diff = float((closed(x) - generic(x)).abs().max())
    times: dict = {}
    for _ in range(rounds):
        for name, model in (("closed", closed), ("generic", generic)):
            for kind in ("forward", "forward+backward"):
                def call():
                    if kind == "forward":
                        with torch.no_grad():
                            model(x)
                    else:
                        model(x).square().mean().backward()
                call()
                _sync(device)
                start = time.perf_counter()
                for _ in range(repeats):
                    call()
                _sync(device)
                times.setdefault((name, kind), []).append((time.perf_counter() - start) / repeats)
    rows = []
    for kind in ("forward", "forward+backward"):
        c, g = statistics.median(times[("closed", kind)]), statistics.median(times[("generic", kind)])
        rows.append({"dim": dim, "batch": batch, "length": length, "kind": kind, "closed": batch * length / c,
                     "generic": batch * length / g, "ratio": g / c, "max_diff": diff})
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["64x4x256", "256x4x256"], help="width x batch x length")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for size in args.sizes:
        dim, batch, length = (int(v) for v in size.split("x"))
        rows += measure(dim, batch, length, args.device, args.rounds, args.repeats)
    if not args.quiet:
        print("| width x batch x length | pass | closed form tok/s | generic tok/s | generic / closed | output difference |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['dim']} x {r['batch']} x {r['length']} | {r['kind']} | {r['closed']:,.0f} | "
                  f"{r['generic']:,.0f} | {r['ratio']:.2f}x | {r['max_diff']:.1e} |")
    return rows


if __name__ == "__main__":
    main()
