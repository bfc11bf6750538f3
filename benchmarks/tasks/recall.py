"""Associative recall (MQAR-style) with a Titans neural memory layer from ``nl_layers``.

A sequence holds ``PAIRS`` key-value pairs ``k1 v1 k2 v2 ...`` followed by ``QUERIES`` keys drawn
again from them; at each query position the model must output the value that was paired with
that key. Keys and values use disjoint token ranges. The model is an embedding, one memory layer
(residual), a norm and a linear head; loss and accuracy are counted on query positions only.
``eval_loss`` is that cross-entropy on 128 fixed held-out sequences.

Example:
    >>> from benchmarks.tasks.recall import make_batch
    >>> import torch
    >>> x, y, mask = make_batch(4, torch.Generator().manual_seed(0))
    >>> x.shape == y.shape == mask.shape and int(mask.sum()) == 4 * QUERIES
    True
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from .base import Task, seeded_generator

KEYS, VALUES, PAIRS, QUERIES, DIM = 16, 16, 6, 4, 32
CHUNK, BATCH, EVAL_SEQUENCES = 4, 8, 128
VOCAB = KEYS + VALUES
SEQ = 2 * PAIRS + QUERIES
MEMORY_MODULE, MEMORY_CLASS = "nl_layers.memory", "NeuralMemory"


def make_batch(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, targets, mask) of shape (batch, SEQ); targets count only where mask is True."""
    keys = torch.stack([torch.randperm(KEYS, generator=gen)[:PAIRS] for _ in range(batch)])
    values = KEYS + torch.randint(VALUES, (batch, PAIRS), generator=gen)
    pick = torch.stack([torch.randperm(PAIRS, generator=gen)[:QUERIES] for _ in range(batch)])
    tokens = torch.zeros(batch, SEQ, dtype=torch.long)
    tokens[:, 0 : 2 * PAIRS : 2], tokens[:, 1 : 2 * PAIRS : 2] = keys, values
    tokens[:, 2 * PAIRS :] = keys.gather(1, pick)
    targets = torch.zeros_like(tokens)
    targets[:, 2 * PAIRS :] = values.gather(1, pick)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 2 * PAIRS :] = True
    return tokens, targets, mask


def memory_layer(dim: int = DIM) -> nn.Module:
    """``nl_layers.memory.NeuralMemory`` (Titans) at width ``dim``: 2 heads, chunks of ``CHUNK`` tokens."""
    cls = getattr(importlib.import_module(MEMORY_MODULE), MEMORY_CLASS)
    return cls(dim=dim, heads=2, chunk_size=CHUNK)


class RecallModel(nn.Module):
    """Embedding -> x + memory(x) -> norm -> head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.memory = memory_layer()
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        out = self.memory(x)
        if isinstance(out, tuple):  # layers that stream return (output, state)
            out = out[0]
        return self.head(self.norm(x + out))


class RecallProblem:
    """Cross-entropy on query positions (see module doc)."""

    def __init__(self, seed: int, device: torch.device, batch: int = BATCH):
        self.model = RecallModel().to(device)
        self.gen, self.batch, self.device = seeded_generator(seed, salt=55), batch, device
        held_out = make_batch(EVAL_SEQUENCES, torch.Generator().manual_seed(12345))
        self.eval_batch = tuple(t.to(device) for t in held_out)

    def _loss(self, tokens, targets, mask) -> torch.Tensor:
        logits = self.model(tokens)
        return F.cross_entropy(logits[mask], targets[mask])

    def train_loss(self, step: int) -> torch.Tensor:
        return self._loss(*(t.to(self.device) for t in make_batch(self.batch, self.gen)))

    @torch.no_grad()
    def eval_loss(self) -> float:
        return float(self._loss(*self.eval_batch))

    @torch.no_grad()
    def eval_accuracy(self) -> float:
        tokens, targets, mask = self.eval_batch
        return float((self.model(tokens)[mask].argmax(-1) == targets[mask]).float().mean())


TASKS = {
    "recall_titans": Task(
        "recall_titans", f"associative recall ({PAIRS} pairs, {QUERIES} queries) through a Titans memory layer",
        lambda seed, dev: RecallProblem(seed, dev), steps=100, eval_every=10,
        lr_centres={"sgd": 0.3, "adam": 1e-2, "muon": 0.1},
        requires=f"{MEMORY_MODULE}:{MEMORY_CLASS}", tags=("real", "nl_layers")),
}
