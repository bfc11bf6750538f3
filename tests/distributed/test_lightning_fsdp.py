"""Lightning's FSDP2 strategy (ModelParallelStrategy) on two CPU processes: MultiTimescale's slow
level steps in lockstep on both ranks, LevelMonitor runs, and MuonMemory on DTensor shards equals a
single-process loop on the combined batch (float64, tolerance 1e-10), with each rank orthogonalizing
only the matrices :func:`deepopt.distributed.ns_owners` gives it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")  # the optional extra "lightning"; skip this module without it

import deepopt
from deepopt.lightning import PeriodicGradients

from . import lightning_fsdp_script as script

ROOT = Path(__file__).resolve().parents[2]


def reference() -> dict[str, torch.Tensor]:
    model = script.net()
    opt = script.optimizer(model.parameters())
    periodic = PeriodicGradients([(f"net.{n}", p) for n, p in model.named_parameters()], script.LEVELS)
    x, y = script.data().tensors
    for s in range(script.STEPS):  # rank r reads samples r, r+2, ...: together, 12 consecutive samples
        xb, yb = x[12 * s: 12 * s + 12], y[12 * s: 12 * s + 12]
        opt.zero_grad()
        (model(xb) - yb).square().mean().backward()
        periodic.before_step()
        opt.step()
    return {f"net.{n}": p.detach() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_lightning_fsdp2_multitimescale_and_monitor(tmp_path):
    pytest.importorskip("lightning")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.distributed.lightning_fsdp_script", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    want = reference()
    for n, w in want.items():
        assert torch.equal(r0["params"][n], r1["params"][n]), f"ranks differ on {n}"
        torch.testing.assert_close(r0["params"][n], w, rtol=0, atol=1e-10, msg=n)
    assert r0["history"] and r0["history"] == r1["history"]
    shapes = [(8, 4), (2, 8)]  # the two weights, in parameter order
    owners = deepopt.distributed.ns_owners(shapes, 2)
    for rank, r in enumerate((r0, r1)):
        assert r["ns_shapes"] == sorted(s for s, o in zip(shapes, owners) if o == rank), (rank, r["ns_shapes"])
