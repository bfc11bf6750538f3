"""Lightning + FSDP2 (ModelParallelStrategy, 2 CPU processes, gloo) with MultiTimescale and
LevelMonitor and a matrix optimizer; each rank saves its full parameters and monitor history.

Run by ``test_lightning_fsdp.py`` as ``python -m tests.distributed.lightning_fsdp_script OUT``
(Lightning re-launches the same command for rank 1)."""

from __future__ import annotations

import sys

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import deepopt
from deepopt.lightning import LevelMonitor, MultiTimescale

LEVELS = {"net.2.*": 2}
STEPS = 6


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(96, 4, generator=g, dtype=torch.float64),
                         torch.randn(96, 2, generator=g, dtype=torch.float64))


def optimizer(params) -> torch.optim.Optimizer:
    return deepopt.MuonMemory(params, lr=0.02, ns_dtype=None)


class Module(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = net()

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, _):
        x, y = batch
        return (self.net(x) - y).square().mean()

    def configure_optimizers(self):
        return optimizer(self.parameters())

    def train_dataloader(self):
        sampler = DistributedSampler(data(), num_replicas=2, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data(), batch_size=6, sampler=sampler)


class _Save(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, module):
        params = {n: p.full_tensor().detach().clone() for n, p in module.named_parameters()}
        monitor = next(c for c in trainer.callbacks if isinstance(c, LevelMonitor))
        torch.save({"params": params, "history": monitor.history, "ns_shapes": sorted(set(NS_CALLS))},
                   f"{self.out}/rank{trainer.global_rank}.pt")


NS_CALLS: list = []


def _record_ns() -> None:
    """Record the shape of every matrix this rank orthogonalizes."""
    from deepopt.levels.orthogonal import level

    inner = level.newton_schulz

    def counted(m, *a, **k):
        NS_CALLS.append(tuple(m.shape))
        return inner(m, *a, **k)

    level.newton_schulz = counted


def main(out: str) -> None:
    torch.set_num_threads(1)
    _record_ns()
    trainer = Trainer(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                      accelerator="cpu", devices=2, max_steps=STEPS, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False,
                      callbacks=[MultiTimescale(LEVELS), LevelMonitor(logging_interval=1), _Save(out)])
    trainer.fit(Module())


if __name__ == "__main__":
    main(sys.argv[1])
