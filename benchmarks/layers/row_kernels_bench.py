"""The memory nodes' row-wise Triton kernels on one GPU, each node against its torch paths.

Three autograd nodes of the memory layers, at the sizes of the language models' step (batch 32 x
256 tokens, dim 384, 4 heads of 96; the residual MLP memory's hidden width 192):

* ``heads``: ``normalized_heads`` (HOPE's x^ and q per head; L2 normalisation kernels);
* ``factors``: the residual MLP's gradient factors and norms (``factors_and_norms``, dgd; factor kernels);
* ``shared``: four memories read from one input with two readout heads (``shared_silu_read``; the
  silu kernels between token-major and memory-major layouts).

For each, float32: the error ``max |a - r| / max |r|`` of every output and input gradient against the
torch paths in float64 on the same inputs, and the medians of CUDA events
(:func:`benchmarks.speed.time_cuda`) of the forward and of forward + ``autograd.grad`` with the
layers' Triton kernels on (``kernel``) and off (``torch``, ``nl_layers.triton_kernels(False)``).

Run ``PYTHONPATH=. python -m benchmarks.layers.row_kernels_bench`` (exits without CUDA); the last
thing printed is a Markdown table.

Example (one node's torch path against itself in float64, on the CPU, at a small size):
    >>> fn, leaves = case("heads", torch.float64, "cpu", scale=64)
    >>> errors(fn, leaves, kernels=False)
    0.0
"""

from __future__ import annotations

import sys

import torch

import nl_layers
from nl_layers._modules import normalized_heads
from nl_layers.memory.mlp import ResidualMLPMemory, shared_silu_read

from ..report import markdown_table
from ..speed import time_cuda

CASES = ("heads", "factors", "shared")
WARMUP, REPEATS = 5, 30


def case(name: str, dtype: torch.dtype, device: str, scale: int = 1):
    """(fn, leaves) of one node at the LM step's sizes (token counts divided by ``scale``): fn(*leaves)
    returns a tuple of tensors."""
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape, s=1.0: (s * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device, dtype)  # noqa: E731
    if name == "heads":
        leaves = [make(32 // scale or 1, 256, 384), make(384, 384, s=384**-0.5)]
        return (lambda x, w: normalized_heads(x, w, 4)), leaves
    if name == "factors":
        memory = ResidualMLPMemory(96, 192)
        leaves = [make(128 // scale or 1, 256, 96), make(128 // scale or 1, 256, 96), make(192, 96, s=96**-0.5),
                  make(96, 192, s=0.1 * 192**-0.5)]

        def factors(k, v, w_in, w_out):
            facs, g, rho = memory.factors_and_norms({"w_in": w_in, "w_out": w_out}, k, v, True)
            return facs["w_in"][0], facs["w_out"][0], facs["w_out"][1], g, rho

        return factors, leaves
    if name == "shared":
        leaves = [make(32768 // scale, 96), make(4, 192, 96, s=96**-0.5), make(4, 96, 192, s=0.1 * 192**-0.5),
                  make(2, 96, s=96**-0.5)]
        return (lambda *a: tuple(shared_silu_read(*a))), leaves
    raise ValueError(f"case must be one of {CASES}, got {name!r}")


def _outputs(fn, leaves, probes=None):
    leaves = [t.detach().requires_grad_() for t in leaves]
    outs = fn(*leaves)
    probes = probes or [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64).to(o.device)
                        for i, o in enumerate(outs)]
    grads = torch.autograd.grad(outs, leaves, [p.to(o.dtype) for p, o in zip(probes, outs)])
    return [t.detach() for t in outs] + list(grads), probes


def errors(fn, leaves, kernels: bool) -> float:
    """The largest relative error of any output or input gradient against the float64 torch paths."""
    with nl_layers.triton_kernels(False):
        ref, probes = _outputs(fn, [t.double() for t in leaves])
    with nl_layers.triton_kernels(kernels):
        got, _ = _outputs(fn, leaves, probes)
    return max(((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for a, r in zip(got, ref))


def times(fn, leaves, kernels: bool) -> tuple[float, float]:
    """(forward ms, forward + backward ms)."""
    leaves = [t.detach().requires_grad_() for t in leaves]
    probes = [torch.randn_like(o) for o in fn(*leaves)]
    with nl_layers.triton_kernels(kernels):
        fwd = time_cuda(lambda: fn(*leaves), WARMUP, REPEATS)
        both = time_cuda(lambda: torch.autograd.grad(fn(*leaves), leaves, probes), WARMUP, REPEATS)
    return fwd, both


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("row_kernels_bench needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True  # as the LM benchmarks (the errors then carry TF32's products)
    print(f"# memory nodes' row kernels, float32, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for name in CASES:
        fn, leaves = case(name, torch.float32, "cuda")
        err_k, err_t = errors(fn, leaves, True), errors(fn, leaves, False)
        (ft, bt), (fk, bk) = times(fn, leaves, False), times(fn, leaves, True)
        print(f"{name} | kernel err {err_k:.1e} | torch err {err_t:.1e} | ms torch {ft:.3f} / {bt:.3f}, "
              f"kernel {fk:.3f} / {bk:.3f}", flush=True)
        rows.append([name, f"{err_k:.1e}", f"{err_t:.1e}", f"{ft:.3f}", f"{fk:.3f}", f"{ft / fk:.2f}x", f"{bt:.3f}",
                     f"{bk:.3f}", f"{bt / bk:.2f}x"])
    print()
    print(markdown_table(["node", "kernel err", "torch err", "fwd torch ms", "fwd kernel ms", "torch/kernel",
                          "f+b torch ms", "f+b kernel ms", "torch/kernel"], rows))


if __name__ == "__main__":
    main()
