"""The decay-mix matrix on one GPU: its element-wise passes as Triton kernels against the torch path.

``decay_mix(c, w)`` = D^a D^m diag(w) (N, L, L) of a fast-weight memory's token form, for (N, L) in
``SHAPES`` (N = batch x heads copies), float32:

* errors: ``max |a - r| / max |r|`` of the mix and the gradients of ``(mix * probe).sum()`` with
  respect to the log prefixes c and the column weights w, where ``r`` is the torch path in float64
  on the same inputs;
* times: medians of CUDA events (:func:`benchmarks.speed.time_cuda`) of the forward and of forward +
  ``autograd.grad`` into c and w, for the torch path (``torch``) and the kernels (``kernel``).

Run ``PYTHONPATH=. python -m benchmarks.layers.decay_mix_bench`` (exits without CUDA); the last thing
printed is a Markdown table.

Example (the torch path against itself in float64, on the CPU):
    >>> errors(*inputs(3, 7, torch.float64, "cpu"), kernels=False)
    {'mix': 0.0, 'dc': 0.0, 'dw': 0.0}
"""

from __future__ import annotations

import contextlib
import sys

import torch

from nl_layers.ops.fast_weights import decay_kernels
from nl_layers.ops.fast_weights.scan import decay_mix

from ..report import markdown_table
from ..speed import time_cuda

SHAPES = ((128, 256), (256, 256), (64, 512))
WARMUP, REPEATS = 5, 50


@contextlib.contextmanager
def path(kernels: bool):
    """The kernels on or off for decay_mix's auto dispatch."""
    keep = decay_kernels.kernel_ok
    if not kernels:
        decay_kernels.kernel_ok = lambda *ts: False
    try:
        yield
    finally:
        decay_kernels.kernel_ok = keep


def inputs(n, length, dtype, device):
    """Log prefixes c (2, N, L) of decays near a language model's, column weights w (N, L), a probe (N, L, L)."""
    gen = torch.Generator().manual_seed(0)
    c = (-0.05 * torch.rand(2, n, length, generator=gen, dtype=torch.float64)).cumsum(-1)
    w = 0.1 * torch.rand(n, length, generator=gen, dtype=torch.float64)
    probe = torch.randn(n, length, length, generator=gen, dtype=torch.float64)
    return c.to(device, dtype), w.to(device, dtype), probe.to(device, dtype)


def outputs(c, w, probe):
    c, w = c.detach().requires_grad_(), w.detach().requires_grad_()
    mix = decay_mix(c, w)
    return [t.double() for t in (mix.detach(), *torch.autograd.grad(mix, (c, w), probe))]


def errors(c, w, probe, kernels: bool) -> dict[str, float]:
    with path(False):
        ref = outputs(c.double(), w.double(), probe.double())
    with path(kernels):
        got = outputs(c, w, probe)
    return {n: ((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
            for n, a, r in zip(("mix", "dc", "dw"), got, ref)}


def times(c, w, probe, kernels: bool) -> tuple[float, float]:
    c, w = c.detach().requires_grad_(), w.detach().requires_grad_()
    with path(kernels):
        fwd = time_cuda(lambda: decay_mix(c, w), WARMUP, REPEATS)
        both = time_cuda(lambda: torch.autograd.grad(decay_mix(c, w), (c, w), probe), WARMUP, REPEATS)
    return fwd, both


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("decay_mix_bench needs a CUDA device")
    print(f"# decay mix, float32, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for n, length in SHAPES:
        args = inputs(n, length, torch.float32, "cuda")
        err_k, err_t = errors(*args, kernels=True), errors(*args, kernels=False)
        ms = {name: times(*args, kernels=k) for name, k in (("torch", False), ("kernel", True))}
        print(f"N {n} L {length} | kernel err", {k: f"{v:.1e}" for k, v in err_k.items()},
              "| torch err", {k: f"{v:.1e}" for k, v in err_t.items()}, "| ms", ms, flush=True)
        (ft, bt), (fk, bk) = ms["torch"], ms["kernel"]
        rows.append([f"N {n}, L {length}", f"{max(err_k.values()):.1e}", f"{max(err_t.values()):.1e}",
                     f"{ft:.3f}", f"{fk:.3f}", f"{ft / fk:.2f}x", f"{bt:.3f}", f"{bk:.3f}", f"{bt / bk:.2f}x"])
    print()
    print(markdown_table(["case", "kernel err", "torch err", "fwd torch ms", "fwd kernel ms", "torch/kernel",
                          "f+b torch ms", "f+b kernel ms", "torch/kernel"], rows))


if __name__ == "__main__":
    main()
