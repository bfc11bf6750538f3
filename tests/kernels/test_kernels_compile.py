"""Every fused optimizer step's Triton kernels compile for an sm90 GPU, checked on a CPU: each case
of test_fused_steps.py runs with ``impl="triton"`` (float32, and bfloat16 parameters with float32
state; deep momentum also with bfloat16 state, its hardware-tanh form) in Triton's interpreter, each
distinct launch then compiled for sm90 (tests/triton_compile.py)."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the 'dev' extra brings it)")

from ..triton_compile import compile_failures, record  # noqa: E402
from . import test_fused_steps as fused_steps  # noqa: E402
from .test_fused_steps import CASES, MODE_OK, run  # noqa: E402

pytestmark = pytest.mark.skipif(not MODE_OK, reason="records launches through Triton's interpreter (a CPU run)")


def test_every_fused_step_kernel_compiles_for_sm90(monkeypatch):
    # two steps make every distinct launch that four do (measured: 169 at 2 and at 4, 159 at 1)
    monkeypatch.setattr(fused_steps, "STEPS", 2)

    def steps():
        for name in CASES:
            run(name, "triton", monkeypatch=monkeypatch)
            run(name, "triton", dtype=torch.bfloat16, state_dtype=torch.float32, monkeypatch=monkeypatch)
            if name.startswith("deep"):  # bf16 state: the hardware tanh (inline PTX) of deep momentum's kernels
                run(name, "triton", dtype=torch.bfloat16, monkeypatch=monkeypatch)

    launches = record(monkeypatch, steps)
    modules = {k["module"] for k in launches}
    assert {"deepopt.levels.momentum.triton_kernels", "deepopt.levels.adaptive.triton_kernels"} <= modules, modules
    failed = compile_failures(launches)
    assert not failed, "\n".join(failed)
