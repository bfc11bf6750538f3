"""Check and time the fused decay-mix kernels against the torch reference on one GPU.

For N in {128, 512} copies and L in {256, 512} tokens, with realistic log gates (log a in
[-0.2, 0], log m in [-2, 0]) in float32: the largest error of mix and of dc (through a random
upstream gradient) relative to the largest entry of a float64 reference, for the kernels
(ieee, and tf32 for information: the dispatcher uses ieee), and for the float32 torch
``_DecayMix``; then the median forward and forward+backward times of both (CUDA events,
:func:`benchmarks.speed.time_cuda`), and the peak memory of a forward+backward. A Markdown table
comes last, with the torch / kernel time ratios. Without CUDA it prints a message and exits.

Usage: ``PYTHONPATH=. python -m benchmarks.layers.mix_kernel_bench [--repeats 20]``.

Example (the error measure):
    >>> rel_err(torch.tensor([1.0, 2.1]), torch.tensor([1.0, 2.0], dtype=torch.float64))
    0.05
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..speed import time_cuda

SIZES = [(128, 256), (128, 512), (512, 256), (512, 512)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (want in float64), rounded to 3 significant digits."""
    return float(f"{float((got.double() - want).abs().max() / want.abs().max()):.3g}")


def prefixes(n: int, length: int) -> torch.Tensor:
    la, lm = -0.2 * torch.rand(n, length, device="cuda"), -2 * torch.rand(n, length, device="cuda")
    return torch.stack([la, lm]).cumsum(-1)


def errors(c: torch.Tensor) -> dict:
    """mix and dc errors of the kernels (ieee, tf32) and of torch float32, against float64."""
    from nl_layers.ops.fast_weights import mix_kernel
    from nl_layers.ops.fast_weights.scan import _DecayMix

    c64 = c.double().requires_grad_()
    ref = _DecayMix.apply(c64)[0]
    g = torch.randn_like(ref)
    dref = torch.autograd.grad(ref, c64, g)[0]
    del ref
    out = {}
    for name, mix_fn, grad_fn in (
        ("kernel", mix_kernel.mix_forward, mix_kernel.mix_backward),
        ("kernel tf32", lambda c: mix_kernel.mix_forward(c, precision="tf32"),
         lambda c, g: mix_kernel.mix_backward(c, g, precision="tf32")),
        ("torch", lambda c: _DecayMix.apply(c)[0], None),
    ):
        mix = mix_fn(c)
        want = _DecayMix.apply(c64.detach())[0]
        out[f"{name} mix err"] = rel_err(mix, want)
        del mix, want
        if grad_fn is None:
            cc = c.detach().requires_grad_()
            dc = torch.autograd.grad(_DecayMix.apply(cc)[0], cc, g.float())[0]
        else:
            dc = grad_fn(c, g.float())
        out[f"{name} dc err"] = rel_err(dc, dref)
    return out


def timings(c: torch.Tensor, repeats: int) -> dict:
    """Median ms of forward (c requires grad: the torch path saves its D's) and forward+backward, and peak GiB."""
    from nl_layers.ops.fast_weights.scan import decay_mix

    c = c.detach().requires_grad_()
    g = torch.randn(c.shape[1], c.shape[2], c.shape[2], device="cuda")
    out = {}
    for impl, name in (("torch", "torch"), ("triton", "kernel")):
        out[f"{name} fwd ms"] = time_cuda(lambda impl=impl: decay_mix(c, impl=impl), warmup=3, repeats=repeats)
        step = lambda impl=impl: torch.autograd.grad(decay_mix(c, impl=impl), c, g)  # noqa: E731
        out[f"{name} fwd+bwd ms"] = time_cuda(step, warmup=3, repeats=repeats)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        out[f"{name} peak GiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    return out


def table(rows: list[dict]) -> str:
    head = ["N", "L", "mix err (kernel / torch)", "dc err (kernel / torch)", "tf32 mix / dc err",
            "fwd ms (torch / kernel)", "ratio", "fwd+bwd ms (torch / kernel)", "ratio", "peak GiB (torch / kernel)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["N"], r["L"], f"{r['kernel mix err']:.2e} / {r['torch mix err']:.2e}",
            f"{r['kernel dc err']:.2e} / {r['torch dc err']:.2e}",
            f"{r['kernel tf32 mix err']:.2e} / {r['kernel tf32 dc err']:.2e}",
            f"{r['torch fwd ms']:.3f} / {r['kernel fwd ms']:.3f}", f"{r['torch fwd ms'] / r['kernel fwd ms']:.2f}x",
            f"{r['torch fwd+bwd ms']:.3f} / {r['kernel fwd+bwd ms']:.3f}",
            f"{r['torch fwd+bwd ms'] / r['kernel fwd+bwd ms']:.2f}x",
            f"{r['torch peak GiB']} / {r['kernel peak GiB']}",
        ]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("mix_kernel_bench: needs a CUDA device (the kernels' CPU path is Triton's interpreter, not worth timing)")
        sys.exit(0)
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, allow_tf32 (matmul): {torch.backends.cuda.matmul.allow_tf32}")
    rows = []
    for n, length in SIZES:
        c = prefixes(n, length)
        row = {"N": n, "L": length, **errors(c), **timings(c, args.repeats)}
        print(row, flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
