"""DDP with two CPU processes (gloo): both ranks end with the same parameters, and those equal the
single-process reference on the combined batch (rank r reads samples r, r+2, ...)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .lightning_reference import PERIODS, reference_fit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree_with_each_other_and_the_reference(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.lightning.ddp_script", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["steps"] == r1["steps"] == [7]
    want = reference_fit(7, opt="adamw", lr=0.05, weight_decay=0.1, decay=0.95, periods=PERIODS, batch_size=12)
    for n in want:
        assert torch.equal(r0["params"][n], r1["params"][n]), f"ranks differ on {n}"
        torch.testing.assert_close(r0["params"][n], want[n], rtol=0, atol=1e-10, msg=n)
