"""Character-level language modelling on Shakespeare: the ``char_transformer`` and ``hope_lm`` tasks.

Text: :func:`benchmarks.data.genre_text` (one genre's plays, Markdown stripped, lower-cased, a
36-symbol alphabet, the last 10% held out). ``eval_loss`` is the mean cross-entropy (nats per
character; divide by ln 2 for bits per character) on 32 fixed held-out windows. Models from
``nl_layers``: ``TransformerLM`` (dim 64, 2 blocks, 4 heads) and ``HopeLM``.

Example:
    >>> problem = TASKS["char_transformer"].build(0, "cpu")
    >>> 3.0 < problem.eval_loss() < 4.5  # about ln(36) at initialization
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ALPHABET, genre_text, windows
from .base import Task, seeded_generator

CONTEXT, BATCH, EVAL_WINDOWS = 32, 8, 32


def char_transformer(dim: int = 64, depth: int = 2, heads: int = 4) -> nn.Module:
    """The char Transformer of the CPU suites: ``nl_layers.TransformerLM`` (Transformer++: RoPE,
    RMSNorm, SwiGLU) over ``ALPHABET``."""
    import nl_layers

    return nl_layers.TransformerLM(len(ALPHABET), dim, depth, heads=heads)


def xy_windows(ids: torch.Tensor, starts: torch.Tensor, context: int = CONTEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-character targets) of the windows of ``context + 1`` ids at ``starts``."""
    chunk = windows(ids, starts, context + 1)
    return chunk[:, :-1], chunk[:, 1:]


class CharLMProblem:
    """Next-character cross-entropy of a language model on one genre (see module doc)."""

    def __init__(self, model: nn.Module, seed: int, device: torch.device, genre: str = "comedies"):
        self.model = model.to(device)
        self.device = device
        self.gen = seeded_generator(seed, salt=101)
        self.set_genre(genre)

    def set_genre(self, genre: str) -> None:
        """Switch the text (the continual suite trains on genres in sequence)."""
        self.train_ids, held_out = genre_text(genre)
        starts = torch.linspace(0, len(held_out) - CONTEXT - 2, EVAL_WINDOWS).long()
        self.eval_x, self.eval_y = (t.to(self.device) for t in xy_windows(held_out, starts))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.train_ids) - CONTEXT - 1, (BATCH,), generator=self.gen)
        return tuple(t.to(self.device) for t in xy_windows(self.train_ids, starts))

    def train_loss(self, step: int) -> torch.Tensor:
        x, y = self.batch()
        return F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())

    @torch.no_grad()
    def eval_loss(self) -> float:
        return float(F.cross_entropy(self.model(self.eval_x).flatten(0, 1), self.eval_y.flatten()))

    def eval_bpc(self) -> float:
        return self.eval_loss() / math.log(2.0)


def build_hope_lm(block: str = "attention", dim: int = 64, depth: int = 2, chunk_size: int = 16) -> nn.Module:
    """A small ``nl_layers.HopeLM``: ``block="attention"`` (HOPE-attention: softmax attention + CMS) or
    ``"hope"`` (self-modifying Titans + CMS), 2 heads, CMS with one level (period 1)."""
    import nl_layers

    return nl_layers.HopeLM(vocab_size=len(ALPHABET), dim=dim, depth=depth, heads=2, block=block,
                            chunk_size=chunk_size)


class _Logits(nn.Module):
    """Adapts a model whose forward returns a tuple or an object with ``.logits`` to plain logits."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.inner(ids)
        if isinstance(out, tuple):
            out = out[0]
        return getattr(out, "logits", out)


TASKS = {
    "char_transformer": Task(
        "char_transformer", "nl_layers.TransformerLM (d=64, 2 blocks, context 32, batch 8) on Shakespeare comedies; held-out nats/char",
        lambda seed, dev: CharLMProblem(char_transformer(), seed, dev), steps=150, eval_every=10,
        lr_centres={"sgd": 0.3, "adam": 3e-3, "muon": 3e-2}, tags=("real",)),
    "hope_lm": Task(
        "hope_lm", "nl_layers.HopeLM, HOPE-attention blocks (d=64, 2 blocks, context 32, batch 8) on Shakespeare "
        "comedies; held-out nats/char",
        lambda seed, dev: CharLMProblem(_Logits(build_hope_lm("attention")), seed, dev), steps=100, eval_every=10,
        lr_centres={"sgd": 0.3, "adam": 3e-3, "muon": 1e-2}, requires="nl_layers:HopeLM", tags=("real",)),
    "hope_lm_titans": Task(
        "hope_lm_titans", "nl_layers.HopeLM, self-modifying-Titans HOPE block (d=32, 1 block, chunk 16) on "
        "Shakespeare comedies; held-out nats/char (GPU-sized: not in the CPU quality suite)",
        lambda seed, dev: CharLMProblem(_Logits(build_hope_lm("hope", dim=32, depth=1)), seed, dev), steps=100,
        eval_every=10, lr_centres={"sgd": 0.3, "adam": 3e-3, "muon": 1e-2}, requires="nl_layers:HopeLM",
        tags=("real", "slow")),
}
