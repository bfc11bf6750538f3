"""Causal depthwise convolution on one GPU: the Triton kernels against the old and the new torch path.

For (B, T, C) in ``SHAPES``, width 4, float32 and bfloat16, with and without a cache:

* errors: ``max |a - r| / max |r|`` of y, dx, dw and dcache, where ``r`` is the old expression
  (zeros + cat, ``F.conv1d(groups=C)`` on the transposed input) run in float32 (cuDNN TF32
  off) on the same (rounded) inputs, and ``a`` the kernels (``impl="triton"``) or the old path in the case's dtype;
* times: medians of CUDA events (:func:`benchmarks.speed.time_cuda`) of the forward (inputs that
  need grad) and of forward + ``autograd.grad`` into x and the weight, for the old path
  (``old``), the new torch path (``torch``: :func:`~nl_layers.ops.causal_conv.causal_conv1d_torch`)
  and the kernels. The old and torch paths return y as a transposed view; what that costs the
  element-wise ops after it is not counted here.

Run ``PYTHONPATH=. python -m benchmarks.layers.causal_conv_bench`` (exits without CUDA); the last
thing printed is a Markdown table. ``--sweep`` first times the kernels' tile sizes (the module
constants ``FWD_*`` and ``BWD_*``) at the first shape.

Example (the new torch path against the old one, on the CPU):
    >>> import torch
    >>> errors(*inputs(2, 5, 3, 4, torch.float32, True, "cpu"), run_torch)
    {'y': 0.0, 'dx': 0.0, 'dw': 0.0, 'dcache': 0.0}
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from nl_layers.ops import causal_conv
from nl_layers.ops.causal_conv import causal_conv1d, causal_conv1d_torch

from ..report import markdown_table
from ..speed import time_cuda

SHAPES = ((32, 256, 1152), (8, 2048, 768))
WIDTH, WARMUP, REPEATS = 4, 5, 50
FWD_TILES = ((16, 64, 4), (8, 128, 4), (16, 128, 8), (32, 64, 8), (32, 32, 4))  # FWD_BT, FWD_BC, FWD_WARPS
BWD_TILES = ((16, 32, 128, 4), (8, 64, 128, 4), (16, 64, 128, 8), (16, 32, 256, 4), (16, 32, 64, 4),
             (32, 64, 128, 16))  # BWD_BT, BWD_BC, BWD_ROWS, BWD_WARPS


def run_old(x, w, cache):
    """The module's former forward: zeros + cat, conv1d on the transposed input."""
    b, _, c = x.shape
    cache = x.new_zeros(b, w.shape[-1] - 1, c) if cache is None else cache
    full = torch.cat([cache, x], dim=1)
    y = F.conv1d(full.transpose(1, 2), w, groups=c).transpose(1, 2)
    return y, full[:, full.shape[1] - (w.shape[-1] - 1):]


def run_torch(x, w, cache):
    return causal_conv1d_torch(x, w, cache)


def run_kernel(x, w, cache):
    return causal_conv1d(x, w, cache, impl="triton")


def inputs(b, t, c, width, dtype, with_cache, device):
    """x, weight, cache (or None) and an output gradient dy, in ``dtype``."""
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    return make(b, t, c), make(c, 1, width), (make(b, width - 1, c) if with_cache else None), make(b, t, c)


def outputs(fn, x, w, cache, dy):
    """y and the gradients of (y * dy).sum() with respect to x, w and the cache, in float32."""
    leaves = [v.detach().requires_grad_() for v in (x, w, cache) if v is not None]
    y, _ = fn(leaves[0], leaves[1], leaves[2] if cache is not None else None)
    grads = torch.autograd.grad(y, leaves, dy)
    return [v.float() for v in (y, *grads)]


def errors(x, w, cache, dy, fn) -> dict[str, float]:
    """``max |fn - ref| / max |ref|`` per output; ref: the old path in float32 on the same inputs."""
    up = lambda v: None if v is None else v.float()  # noqa: E731
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False  # no TF32 in the reference
    try:
        ref = outputs(run_old, up(x), up(w), up(cache), up(dy))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    got = outputs(fn, x, w, cache, dy)
    names = ("y", "dx", "dw", "dcache")[:len(ref)]
    return {n: ((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for n, a, r in zip(names, got, ref)}


def times(fn, x, w, cache, dy) -> tuple[float, float]:
    """Median ms of the forward and of forward + backward (grads of x and w; the cache needs none)."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    fwd = time_cuda(lambda: fn(x, w, cache), WARMUP, REPEATS)
    both = time_cuda(lambda: torch.autograd.grad(fn(x, w, cache)[0], (x, w), dy), WARMUP, REPEATS)
    return fwd, both


def sweep() -> None:
    """Kernel ms of the forward and of forward + backward per tile size, at SHAPES[0], no cache."""
    fwd_names, bwd_names = ("FWD_BT", "FWD_BC", "FWD_WARPS"), ("BWD_BT", "BWD_BC", "BWD_ROWS", "BWD_WARPS")
    keep = {n: getattr(causal_conv, n) for n in fwd_names + bwd_names}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            args = inputs(*SHAPES[0], WIDTH, dtype, False, "cuda")
            for names, tiles, which in ((fwd_names, FWD_TILES, 0), (bwd_names, BWD_TILES, 1)):
                for tile in tiles:
                    for n, v in keep.items():
                        setattr(causal_conv, n, v)
                    for n, v in zip(names, tile):
                        setattr(causal_conv, n, v)
                    label = " ".join(f"{n}={v}" for n, v in zip(names, tile))
                    ms = times(run_kernel, *args)[which]
                    print(f"sweep {str(dtype)[6:]} {('fwd', 'fwd+bwd')[which]} {label}: {ms:.3f} ms", flush=True)
    finally:
        for n, v in keep.items():
            setattr(causal_conv, n, v)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("causal_conv_bench needs a CUDA device")
    print(f"# causal depthwise conv, width {WIDTH}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if "--sweep" in sys.argv[1:]:
        sweep()
    rows = []
    for b, t, c in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for with_cache in (False, True):
                args = inputs(b, t, c, WIDTH, dtype, with_cache, "cuda")
                err_k, err_o = errors(*args, run_kernel), errors(*args, run_old)
                ms = {name: times(fn, *args) for name, fn in (("old", run_old), ("torch", run_torch),
                                                             ("kernel", run_kernel))}
                case = f"({b}, {t}, {c}) {str(dtype)[6:]} {'cache' if with_cache else 'no cache'}"
                print(case, "| kernel err", {k: f"{v:.1e}" for k, v in err_k.items()},
                      "| old err", {k: f"{v:.1e}" for k, v in err_o.items()}, "| ms", ms, flush=True)
                f, fb = (tuple(ms[n][i] for n in ("old", "torch", "kernel")) for i in (0, 1))
                rows.append([case, f"{max(err_k.values()):.1e}", f"{max(err_o.values()):.1e}",
                             *(f"{v:.3f}" for v in f), f"{f[0] / f[2]:.2f}x", f"{f[1] / f[2]:.2f}x",
                             *(f"{v:.3f}" for v in fb), f"{fb[0] / fb[2]:.2f}x", f"{fb[1] / fb[2]:.2f}x"])
    print()
    print(markdown_table(["case", "kernel err", "old err", "fwd old ms", "fwd torch ms", "fwd kernel ms",
                          "old/kernel", "torch/kernel", "f+b old ms", "f+b torch ms", "f+b kernel ms",
                          "old/kernel", "torch/kernel"], rows))


if __name__ == "__main__":
    main()
