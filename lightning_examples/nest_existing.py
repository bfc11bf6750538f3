"""Nest an ordinary model and keep training it with slow and fast levels, without changing its code.

Stage 1 trains an ordinary ``nn.TransformerEncoder`` character model on Shakespeare (plain Trainer).
Stage 2 continues with the Trainer of the config, whose callbacks do all the Nested Learning:

* ``NestLevels`` calls ``nl_layers.nest`` in ``setup`` (before the optimizer exists): every FFN becomes
  a Continuum Memory System initialized from it (the model computes exactly what it did), and the
  level specification ``{parameter: period}`` is handed on;
* ``MultiTimescale`` makes each level learn at its period (the pre-trained FFN slowly, the new
  level fast), for whatever optimizer the module configures;
* ``LevelMonitor`` logs what each level does (update norms, fraction of steps updated, Adam moments).

The script prints the validation bits per character after pre-training, right after nesting (the
same: nesting preserves the function) and after the continued training, then a per-level summary.
Its CSV logs go to ``./runs/nest_existing-<time>/`` (see :mod:`.run_dir`).

    python -m lightning_examples.nest_existing --config lightning_examples/configs/nest_existing.yaml
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from deepopt.lightning import LevelMonitor, NestLevels

from .run_dir import RunDirCLI

from .char_lm import ShakespeareChars


class OrdinaryCharLM(pl.LightningModule):
    """A plain causal ``nn.TransformerEncoder`` language model: nothing in it knows about levels."""

    def __init__(self, vocab_size: int = 128, dim: int = 64, depth: int = 2, heads: int = 4, ffn: int = 128,
                 max_len: int = 512, lr: float = 3e-3, weight_decay: float = 0.01) -> None:
        super().__init__()
        self.lr, self.weight_decay = lr, weight_decay
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        x = self.embed(tokens) + self.pos[:t]
        return self.head(self.norm(self.encoder(x, mask=mask, is_causal=True)))

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train_bpc", loss / math.log(2), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_bpc", self.loss(batch) / math.log(2), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class NestCLI(RunDirCLI):
    example = "nest_existing"

    def add_arguments_to_parser(self, parser):
        parser.add_argument("--pretrain_steps", type=int, default=200, help="steps of the ordinary model first")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


def _val_bpc(trainer: pl.Trainer, model: pl.LightningModule, dm: pl.LightningDataModule) -> float:
    return float(trainer.validate(model, datamodule=dm, verbose=False)[0]["val_bpc"])


def main(args: list[str] | None = None) -> dict[str, float]:
    cli = NestCLI(OrdinaryCharLM, ShakespeareChars, run=False, args=args, save_config_callback=None)
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    if not any(isinstance(cb, NestLevels) for cb in trainer.callbacks):
        raise ValueError("the config's trainer.callbacks must hold deepopt.lightning.NestLevels (see "
                         "lightning_examples/configs/nest_existing.yaml)")
    plain = pl.Trainer(max_steps=cli.config.pretrain_steps, accelerator=trainer.accelerator, devices=1,
                       default_root_dir=cli.run_dir, logger=False, enable_checkpointing=False, enable_model_summary=False,
                       limit_val_batches=trainer.limit_val_batches, num_sanity_val_steps=0)
    print(f"stage 1: {cli.config.pretrain_steps} steps of the ordinary model")
    plain.fit(model, datamodule=dm)
    result = {"pretrained": _val_bpc(plain, model, dm)}
    n_before = sum(p.numel() for p in model.parameters())
    result["nested"] = _val_bpc(trainer, model, dm)  # NestLevels.setup nests here, before any training
    n_after = sum(p.numel() for p in model.parameters())
    print(f"stage 2: nested ({n_before} -> {n_after} parameters); continuing with the config's callbacks")
    trainer.fit(model, datamodule=dm)
    result["continued"] = _val_bpc(trainer, model, dm)
    print("\nval bits/char | pretrained {pretrained:.4f} | right after nest {nested:.4f} | "
          "after continued training {continued:.4f}".format(**result))
    monitor = next((cb for cb in trainer.callbacks if isinstance(cb, LevelMonitor)), None)
    if monitor is not None and monitor.history:
        last = monitor.history[-1]
        periods = sorted({int(k.split("/")[1].removeprefix("period_")) for k in last if "/period_" in k})
        print("level  | params | last update norm | fraction of steps updated | param norm")
        for c in periods:
            n = sum(1 for v in monitor.periods.values() if v == c)
            key = f"{monitor.prefix}period_{c}/"
            print(f"C = {c:<3} | {n:6d} | {last[key + 'update_norm']:16.4f} | "
                  f"{last[key + 'update_fraction']:25.3f} | {last[key + 'param_norm']:10.3f}")
    cli.announce()
    return result


if __name__ == "__main__":
    main()
