"""Associative recall: the one recall model (any ``nl_layers`` mixer) and the ``recall_titans`` task.

Data: :func:`benchmarks.data.mqar_batch` (MQAR: key-value pairs, then every key queried once
more; loss and accuracy count at the query positions only).

Model (:class:`RecallModel`): embedding -> ``depth`` pre-norm blocks ``x + mixer(RMSNorm(x))``
then ``x + SwiGLU(RMSNorm(x))`` -> RMSNorm -> linear head, evaluated at the query positions.
Mixers (:func:`make_mixer`): ``attention`` (``nl_layers.AttentionMemory``, causal, RoPE),
``hebbian`` / ``delta`` / ``dgd`` (``nl_layers.LinearMemory`` rules, each after a causal depthwise
convolution of width 4, as in Zoology's and DeltaNet's models), ``titans``
(``nl_layers.NeuralMemory``) and ``self_modifying`` (``nl_layers.SelfModifyingTitans``); heads
default to width // 64. The ``recall`` suite trains it at several widths; the ``recall_titans``
task of ``quality`` is one Titans block at width 32 (2 heads, chunks of 4) on 6 pairs.

Example:
    >>> model = RecallModel("attention", dim=32, vocab=16)
    >>> tokens, targets, mask = mqar_batch(2, 16, 4, 7, 8, torch.Generator().manual_seed(0))
    >>> model(tokens, mask).shape
    torch.Size([8, 16])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import mqar_batch, split_vocab
from .base import Task, seeded_generator

MIXERS = ("attention", "hebbian", "delta", "dgd", "titans", "self_modifying")
# the recall_titans task: MQAR with 6 pairs in 24 tokens over 32 symbols, one Titans block at width 32
PAIRS, SEQ, VOCAB, DIM, CHUNK, BATCH, EVAL_SEQUENCES = 6, 24, 32, 32, 4, 8, 128
MEMORY_MODULE, MEMORY_CLASS = "nl_layers.memory", "NeuralMemory"


class ShortConv(nn.Module):
    """Causal depthwise convolution y_t = sum_{j<width} w_j x_{t-j}, initialised to the identity."""

    def __init__(self, dim: int, width: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, 1, width))
        with torch.no_grad():
            self.weight[:, 0, -1] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = F.pad(x.transpose(1, 2), (self.weight.shape[-1] - 1, 0))
        return F.conv1d(pad, self.weight, groups=x.shape[-1]).transpose(1, 2)


def make_mixer(mixer: str, dim: int, memory_max_lr: float | None = None, heads: int | None = None,
               chunk_size: int = 16) -> nn.Module:
    """The sequence mixer ``mixer`` at width ``dim``; forward returns (y, state).

    ``memory_max_lr`` bounds the inner step of the two Titans layers (None: the layers' default);
    ``chunk_size`` is theirs too (the linear rules use chunks of 64)."""
    import nl_layers

    extra = {} if memory_max_lr is None else {"max_lr": memory_max_lr}
    heads = heads or max(1, dim // 64)
    if mixer == "attention":
        return nl_layers.AttentionMemory(dim, heads, causal=True, rope=True)
    if mixer in ("hebbian", "delta", "dgd"):
        return nl_layers.LinearMemory(dim, heads, rule=mixer, chunk_size=64)
    if mixer == "titans":
        return nl_layers.NeuralMemory(dim, heads, chunk_size=chunk_size, **extra)
    if mixer == "self_modifying":
        return nl_layers.SelfModifyingTitans(dim, heads, chunk_size=chunk_size, **extra)
    raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")


class RecallBlock(nn.Module):
    """x + mixer(RMSNorm(x)) (a short convolution first for the linear rules), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, mixer: str, dim: int, memory_max_lr: float | None = None, heads: int | None = None,
                 chunk_size: int = 16):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.conv = ShortConv(dim) if mixer in ("hebbian", "delta", "dgd") else None
        self.mixer = make_mixer(mixer, dim, memory_max_lr, heads, chunk_size)
        self.gate, self.up = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.down = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        h = self.conv(h) if self.conv is not None else h
        x = x + self.mixer(h)[0]
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class RecallModel(nn.Module):
    """Embedding -> ``depth`` blocks -> RMSNorm -> head; ``forward(tokens, mask)`` gives logits at mask only."""

    def __init__(self, mixer: str, dim: int, vocab: int, depth: int = 2, memory_max_lr: float | None = None,
                 heads: int | None = None, chunk_size: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(RecallBlock(mixer, dim, memory_max_lr, heads, chunk_size) for _ in range(depth))
        self.norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits at the query positions: ``mask`` a boolean (batch, seq) mask (the rows of
        ``x[mask]``), or a (batch, queries) tensor of positions in increasing order per sequence
        (:func:`query_positions`: the same rows, in the same order, from static shapes, which a CUDA
        graph can capture)."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        if mask.dtype == torch.bool:
            return self.head(self.norm(x[mask]))
        picked = x.gather(1, mask.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.head(self.norm(picked.reshape(-1, x.shape[-1])))


def query_positions(mask: torch.Tensor, queries: int) -> torch.Tensor:
    """The positions of ``mask``'s True entries as a (batch, ``queries``) tensor, increasing along
    each row (every MQAR sequence has ``queries`` of them): ``x.gather`` at them gives the rows of
    ``x[mask]`` in their order, from shapes that do not depend on the data.

    Example:
        >>> m = torch.tensor([[False, True, True], [True, False, True]])
        >>> query_positions(m, 2)
        tensor([[1, 2],
                [0, 2]])
    """
    counts = mask.sum(1)
    if not bool((counts == queries).all()):
        raise ValueError(f"queries={queries} must equal every row's number of True entries in mask, got "
                         f"{sorted(set(counts.tolist()))}")
    return mask.nonzero()[:, 1].reshape(mask.shape[0], queries)


class RecallProblem:
    """The ``recall_titans`` task: cross-entropy at the query positions of MQAR sequences."""

    def __init__(self, seed: int, device: torch.device, batch: int = BATCH):
        self.model = RecallModel("titans", DIM, VOCAB, depth=1, heads=2, chunk_size=CHUNK).to(device)
        self.keys, self.values = split_vocab(VOCAB)
        self.gen, self.batch, self.device = seeded_generator(seed, salt=55), batch, device
        held_out = mqar_batch(EVAL_SEQUENCES, SEQ, PAIRS, self.keys, self.values, torch.Generator().manual_seed(12345))
        self.eval_batch = tuple(t.to(device) for t in held_out)

    def _loss(self, tokens, targets, mask) -> torch.Tensor:
        return F.cross_entropy(self.model(tokens, mask), targets[mask])

    def train_loss(self, step: int) -> torch.Tensor:
        batch = mqar_batch(self.batch, SEQ, PAIRS, self.keys, self.values, self.gen)
        return self._loss(*(t.to(self.device) for t in batch))

    @torch.no_grad()
    def eval_loss(self) -> float:
        return float(self._loss(*self.eval_batch))

    @torch.no_grad()
    def eval_accuracy(self) -> float:
        tokens, targets, mask = self.eval_batch
        return float((self.model(tokens, mask).argmax(-1) == targets[mask]).float().mean())


TASKS = {
    "recall_titans": Task(
        "recall_titans", f"MQAR ({PAIRS} pairs in {SEQ} tokens) through one Titans NeuralMemory block (d={DIM})",
        lambda seed, dev: RecallProblem(seed, dev), steps=100, eval_every=10,
        lr_centres={"sgd": 0.3, "adam": 1e-2, "muon": 0.1},
        requires=f"{MEMORY_MODULE}:{MEMORY_CLASS}", tags=("real", "nl_layers")),
}
