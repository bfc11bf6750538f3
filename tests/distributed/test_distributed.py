"""deepopt under DDP and FSDP2 with two CPU processes (gloo): equal to one process on the full batch.

Tolerance: 1e-10 in float64 (the data-parallel gradient is the mean of two half-batch means,
which rounds differently from one full-batch mean; Newton-Schulz runs in float64 here).
Checkpoints: DCP saved at world size 2 resumes bit-exactly at world size 2, and within 1e-10 at
world size 1 (same rounding caveat).
"""

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import deepopt

from . import workers

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_full_batch(mode, tmp_path):
    out = tmp_path / "result.json"
    mp.spawn(workers.equality_worker, args=(2, free_port(), mode, str(out)), nprocs=2)
    diffs = json.loads(out.read_text())
    assert set(diffs) == set(deepopt.OPTIMIZERS)
    bad = {k: v for k, v in diffs.items() if not v < 1e-10}
    assert not bad, f"{mode}: distributed differs from one process: {bad}"


def test_dcp_checkpoint_resumes_at_world_size_two_and_one(tmp_path):
    ckpt, a, b = tmp_path / "ckpt", tmp_path / "a.json", tmp_path / "b.json"
    ckpt.mkdir()
    mp.spawn(workers.checkpoint_worker, args=(2, free_port(), str(ckpt), str(a)), nprocs=2)   # train, save, finish
    mp.spawn(workers.checkpoint_worker, args=(2, free_port(), str(ckpt), str(b)), nprocs=2)   # load, finish
    uninterrupted, resumed = json.loads(a.read_text()), json.loads(b.read_text())
    for name in deepopt.OPTIMIZERS:
        assert resumed[name] == uninterrupted[name], f"{name}: resume at world size 2 is not exact"

    for name in sorted(deepopt.OPTIMIZERS):  # world size 1: no process group at all
        model = workers.model_fn()
        opt = workers.make(name, model)
        deepopt.distributed.load(model, opt, str(ckpt / name))
        workers.train(model, opt, 3, start=3)
        for p, q in zip(model.parameters(), uninterrupted[name]):
            torch.testing.assert_close(p.detach(), torch.tensor(q, dtype=torch.float64), rtol=0, atol=1e-10,
                                       msg=f"{name}: resume at world size 1")
