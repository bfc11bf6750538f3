"""Two-process CPU DDP run with MultiTimescale (gloo); each rank saves its final parameters.

Run by ``test_ddp.py`` as ``python -m tests.lightning.ddp_script OUTDIR`` (Lightning's "ddp"
strategy re-launches this command for rank 1)."""

from __future__ import annotations

import sys

import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from deepopt.lightning import MultiTimescale

from .lightning_reference import LEVELS, TinyModule, loader


class _SaveParams(Callback):
    def __init__(self, out: str):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        torch.save({"params": params, "steps": trainer.callbacks[0].steps}, f"{self.out}/rank{trainer.global_rank}.pt")


class _RankSlices(TinyModule):
    """Rank r reads samples r, r+2, r+4, ... in order (Lightning's own sampler would shuffle)."""

    def train_dataloader(self):
        data = loader().dataset
        sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                     shuffle=False)
        return DataLoader(data, batch_size=6, sampler=sampler)


def main(out: str) -> None:
    torch.set_num_threads(1)
    module = _RankSlices(opt="adamw", lr=0.05, weight_decay=0.1, decay=0.95)
    trainer = Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=7, logger=False, use_distributed_sampler=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      callbacks=[MultiTimescale(LEVELS), _SaveParams(out)])
    trainer.fit(module)


if __name__ == "__main__":
    main(sys.argv[1])
