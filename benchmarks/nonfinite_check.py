"""GPU time of the NaN/Inf check of the gradients, Triton kernel against the torch form, and of the
optimizer steps that run it, with each form in the same run.

On the speed suite's GPT-like list (:func:`benchmarks.speed.gpt_param_shapes`, ``--layers``
blocks), per dtype: the check alone in its torch form (``torch._foreach_norm(ts, inf)``, then "are
the norms finite") and as the Triton kernel at each ``(elements per program, warps)`` of
``CONFIGS`` (read GB/s beside each), and the host's time per call on many tiny gradients; then one synchronised step of each optimizer of
``--optimizers`` with the kernel check and with the torch form, alternated ``--rounds`` times
(median), beside the torch optimizer it is compared with.

Usage: ``python -m benchmarks.nonfinite_check [--layers 24] [--optimizers AdamMemory MomentumMemory]``.

Example (a row of the check table on made-up numbers):
    >>> check_row("kernel (4096, 8)", 1.0, 2e9)
    '| kernel (4096, 8) | 1.000 | 2000 |'
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .speed import counterpart, gpt_param_shapes, speed_optimizers, time_cuda

CONFIGS = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 8), (8192, 16)]
OPTIMIZERS = ["AdamMemory", "MomentumMemory", "PreconditionedMomentum"]


def check_row(label: str, ms: float, nbytes: int) -> str:
    return f"| {label} | {ms:.3f} | {nbytes / (ms * 1e-3) / 1e9:.0f} |"


def check_table(shapes, dtype: torch.dtype, configs, repeats: int) -> list[str]:
    """The check alone: the torch form, then the kernel at each config (its flag checked to be 0)."""
    from deepopt.kernels import nonfinite

    grads = [torch.randn(s, device="cuda", dtype=dtype) for _, s in shapes]
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    lines = [f"check of {nbytes / 1e9:.2f} GB of {str(dtype).split('.')[-1]} gradients",
             "| form | ms | read GB/s |", "|---|---|---|"]
    lines.append(check_row("torch (_foreach_norm inf)", time_cuda(lambda: nonfinite.nonfinite_flag_torch(grads), 3,
                                                                 repeats), nbytes))
    size = dtype.itemsize
    saved = nonfinite.CHECK_CONFIGS[size]
    try:
        for cfg in configs:
            nonfinite.CHECK_CONFIGS[size] = cfg
            assert float(nonfinite.kernel_nonfinite_flag(grads)) == 0.0
            lines.append(check_row(f"kernel {cfg}", time_cuda(lambda: nonfinite.kernel_nonfinite_flag(grads), 3,
                                                               repeats), nbytes))
    finally:
        nonfinite.CHECK_CONFIGS[size] = saved
    grads[len(grads) // 2].view(-1)[-1] = float("nan")
    assert float(nonfinite.kernel_nonfinite_flag(grads)) == 1.0
    return lines


def host_table(tensors: int = 145, numel: int = 64, calls: int = 300) -> list[str]:
    """Host microseconds per check call on many tiny gradients (the GPU idle: the launches' Python),
    the two forms alternated, median over the calls."""
    from deepopt.kernels import nonfinite

    grads = [torch.randn(numel, device="cuda") for _ in range(tensors)]
    times: dict[str, list[float]] = {"torch": [], "kernel": []}
    forms = {"torch": nonfinite.nonfinite_flag_torch, "kernel": nonfinite.kernel_nonfinite_flag}
    for _ in range(calls):
        for name, fn in forms.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn(grads)
            times[name].append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return [f"host time of one check, {tensors} tensors of {numel} elements", "| form | us |", "|---|---|"] + [
        f"| {name} | {statistics.median(ts[calls // 10:]):.1f} |" for name, ts in times.items()]


def step_table(shapes, dtype: torch.dtype, names, rounds: int, repeats: int) -> list[str]:
    """Each optimizer's synchronised step with the kernel check and with the torch form, alternated."""
    from deepopt.optim import conventions

    makers = speed_optimizers(None, "cuda")
    rows = ["| optimizer | kernel check ms | torch check ms | torch optimizer ms | x torch (kernel) | "
            "x torch (torch check) |", "|---|---|---|---|---|---|"]
    real = conventions._kernel_checks
    base: dict[str, float] = {}
    for name in list(dict.fromkeys(counterpart(n, "cuda") for n in names)) + list(names):
        params = [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True) for _, s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = makers[name](params)
        if name not in names:
            base[name] = time_cuda(opt.step, 3, repeats * rounds)
        else:
            times: dict[bool, list[float]] = {True: [], False: []}
            try:
                for _ in range(rounds):
                    for kernel in (True, False):
                        conventions._kernel_checks = real if kernel else (lambda dt: False)
                        times[kernel].append(time_cuda(opt.step, 2, repeats))
            finally:
                conventions._kernel_checks = real
            k, t = statistics.median(times[True]), statistics.median(times[False])
            ref = base[counterpart(name, "cuda")]
            rows.append(f"| {name} | {k:.2f} | {t:.2f} | {ref:.2f} ({counterpart(name, 'cuda')}) | {k / ref:.3f} | "
                        f"{t / ref:.3f} |")
        del opt, params
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24, help="blocks of the GPT-like list (dim 2048)")
    p.add_argument("--optimizers", nargs="+", default=OPTIMIZERS)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("nonfinite_check: needs a CUDA device; nothing to do")
        return
    shapes = gpt_param_shapes(layers=a.layers)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("\n".join(host_table()) + "\n")
    for dtype in (torch.float32, torch.bfloat16):
        print("\n".join(check_table(shapes, dtype, CONFIGS, a.repeats)) + "\n")
    for dtype in (torch.float32, torch.bfloat16):
        print(f"steps, {str(dtype).split('.')[-1]}")
        print("\n".join(step_table(shapes, dtype, a.optimizers, a.rounds, a.repeats)) + "\n")


if __name__ == "__main__":
    main()
