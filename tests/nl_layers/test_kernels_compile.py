"""Every Triton kernel the language models launch compiles for an sm90 GPU, checked on a CPU: one
training step of TitansLM and HopeLM (float32 and bfloat16) with every layer kernel forced, in
Triton's interpreter, each distinct launch then compiled for sm90 (tests/triton_compile.py)."""

import os

import pytest
import torch

from ..triton_compile import compile_failures, record

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="records launches through Triton's interpreter (a CPU run)")
pytest.importorskip("triton")


def _force_kernels(monkeypatch):
    from nl_layers.ops import causal_conv, normalize_kernels
    from nl_layers.ops.fast_weights import decay_kernels, factor_kernels, read_kernels, shared_read_kernels

    monkeypatch.setattr(causal_conv, "_kernel_ok", lambda *a, **k: True)
    for module in (normalize_kernels, factor_kernels, shared_read_kernels, read_kernels, decay_kernels):
        monkeypatch.setattr(module, "kernel_ok", lambda *a, **k: True)


def test_every_lm_kernel_compiles_for_sm90(monkeypatch):
    import nl_layers

    _force_kernels(monkeypatch)

    def steps():
        for cls in (nl_layers.TitansLM, nl_layers.HopeLM):
            for dtype in (torch.float32, torch.bfloat16):
                torch.manual_seed(0)
                lm = cls(vocab_size=11, dim=16, depth=1, heads=2).to(dtype)
                lm.loss(torch.randint(0, 11, (2, 13))).backward()

    launches = record(monkeypatch, steps)
    names = {k["name"] for k in launches}
    assert {"_silu_kernel", "_silu_backward_kernel", "_normalize_kernel", "_read_grads_kernel"} <= names, names
    failed = compile_failures(launches)
    assert not failed, "\n".join(failed)
