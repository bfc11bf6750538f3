"""Where reduced-precision matmuls are native, so that an ``"auto"`` setting takes them only there.

A bf16 matmul with float32 accumulation halves the cost of a float32 one on recent GPUs and on
CPUs with AVX512-BF16 or AMX; elsewhere torch emulates it, far slower than float32 (on a 2-core
AVX2 AMD EPYC, torch 2.13: a (8, 256, 1024) x (8, 1024, 256) ``bmm`` takes 1.06 s in bf16 and 13 ms
in float32). DeltaMomentum's forget term and the ``"auto"`` Newton-Schulz form read this.

Example:
    >>> import torch
    >>> from deepopt.levels.precision import native_bf16_matmul
    >>> isinstance(native_bf16_matmul(torch.device("cpu")), bool)
    True
"""

from __future__ import annotations

import functools

import torch

__all__ = ["native_bf16_matmul", "ns_compute_dtype"]


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 matmuls (float32 accumulation) run natively on ``device``: CUDA GPUs of compute
    capability 8.0 or newer, and CPUs with AVX512-BF16 or AMX-BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        caps = _cpu_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


@functools.lru_cache(maxsize=None)
def _cpu_capabilities() -> dict:
    try:
        return dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError, TypeError):  # an older torch: take the float32 path
        return {}


def ns_compute_dtype(dtype: torch.dtype, method: str, device: torch.device) -> torch.dtype:
    """The dtype a Newton-Schulz iteration of form ``method`` computes in on ``device`` when asked
    for ``dtype``: ``method="auto"`` on a CPU without native bf16 matmuls computes a 16-bit request
    in float32 (80x faster there, and a smaller rounding error); every other case keeps ``dtype``
    (``"standard"`` stays torch's bf16 iteration bit for bit on every machine)."""
    if (method == "auto" and dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cpu"
            and not native_bf16_matmul(device)):
        return torch.float32
    return dtype
