"""Check and time the fused token-form read (nl_layers/ops/fast_weights/read_kernel.py) on one GPU.

y_t = out_t + sum_{r <= t} M_tr (x_t . right_r) left_r for N = 128 copies (batch 32 x 4 heads),
L = 256 and (i, o) in {(96, 192), (192, 96), (64, 64)}, in fp32 (TF32 on) and under bf16 autocast
(float32 leaves, mixing kept float32, as in the language models). For each: the largest error of
the kernel's output and of every gradient (M below the diagonal, left, right, x, out), relative
to the largest entry of a float64 reference, beside the same error of the torch expression; then
the median milliseconds of forward and forward+backward, kernel and torch, in the same run
(CUDA events: :func:`benchmarks.speed.time_cuda`). A Markdown table comes last (ratio: kernel / torch).

Usage: ``PYTHONPATH=. python -m benchmarks.layers.read_kernel_bench [--warmup 5] [--repeats 30]``.
Without CUDA it prints a message and exits.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from benchmarks.speed import time_cuda
from nl_layers.ops.fast_weights.read_kernel import rank1_read_tokens, rank1_read_tokens_reference

N, L = 128, 256
DEVICE = "cuda"
SHAPES = ((96, 192), (192, 96), (64, 64))
NAMES = ("y", "dM", "dleft", "dright", "dx", "dout")


def _inputs(i, o):
    mixing = torch.randn(N, L, L, device=DEVICE).tril() / L**0.5
    factors = [torch.randn(N, L, d, device=DEVICE) / d**0.5 for d in (o, i, i)]
    return [t.requires_grad_() for t in [mixing, *factors, torch.randn(N, L, o, device=DEVICE)]]


def _run(fn, ins, g, autocast):
    ctx = torch.autocast(DEVICE, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        y = fn(*ins)
    return [y.float()] + [t.float() for t in torch.autograd.grad(y, ins, g.to(y.dtype))]


def _errors(got, want):
    """max |got - want| / max |want| for each output; dM below the diagonal only (the kernel takes
    M as lower-triangular and gives 0 above)."""
    return [((a.tril() if k == 1 else a).double() - (b.tril() if k == 1 else b)).abs().max().item()
            / b.abs().max().item() for k, (a, b) in enumerate(zip(got, want))]


def bench(i, o, bf16, warmup, repeats):
    ins = _inputs(i, o)
    g = torch.randn(N, L, o, device=DEVICE)
    kernel = lambda *a: rank1_read_tokens(*a, impl="triton")  # noqa: E731
    precise = _run(rank1_read_tokens_reference, [t.detach().double().requires_grad_() for t in ins], g.double(), False)
    got, ref = _run(kernel, ins, g, bf16), _run(rank1_read_tokens_reference, ins, g, bf16)
    assert (got[1].triu(1) == 0).all(), "dM above the diagonal must be zero"
    err_k, err_t = _errors(got, precise), _errors(ref, precise)
    label = f"i={i} o={o} {'bf16 autocast' if bf16 else 'fp32 tf32'}"
    print(f"{label}: relative error vs float64, kernel / torch: "
          + ", ".join(f"{n} {a:.1e}/{b:.1e}" for n, a, b in zip(NAMES, err_k, err_t)))
    ctx = (lambda: torch.autocast(DEVICE, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    times = {}
    for name, fn in (("kernel", kernel), ("torch", rank1_read_tokens_reference)):
        def fwd(fn=fn):
            with ctx():
                fn(*ins)

        def fwd_bwd(fn=fn):
            with ctx():
                y = fn(*ins)
            torch.autograd.grad(y, ins, g.to(y.dtype))

        times[name] = (time_cuda(fwd, warmup, repeats), time_cuda(fwd_bwd, warmup, repeats))
    return label, max(err_k), max(err_t), times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("read_kernel_bench: needs a CUDA device; nothing to do")
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    rows = [bench(i, o, bf16, args.warmup, args.repeats) for bf16 in (False, True) for i, o in SHAPES]
    print(f"\nN={N} L={L}, {torch.cuda.get_device_name()}; ms are CUDA-event medians of {args.repeats}\n")
    print("| case | max rel err kernel | max rel err torch | fwd kernel | fwd torch | fwd ratio "
          "| fwd+bwd kernel | fwd+bwd torch | fwd+bwd ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, ek, et, t in rows:
        (fk, bk), (ft, bt) = t["kernel"], t["torch"]
        print(f"| {label} | {ek:.1e} | {et:.1e} | {fk:.3f} | {ft:.3f} | {fk / ft:.2f} "
              f"| {bk:.3f} | {bt:.3f} | {bk / bt:.2f} |")


if __name__ == "__main__":
    main()
