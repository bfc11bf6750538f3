"""Task sequences for the ``continual`` suite.

- ``permuted_digits``: 4 tasks; task j shows the 64 digit pixels in a fixed random order (task 0 =
  identity); one 10-way head; metric: held-out accuracy.
- ``split_digits``: 5 tasks, classes {0,1}, {2,3}, ..., {8,9}; task-incremental (the logits are
  masked to the task's two classes in training and evaluation); metric: held-out accuracy.
- ``shakespeare_genres``: a char Transformer trained on comedies, then histories, then tragedies;
  metric: held-out bits per character (lower is better).

A sequence gives the model for a seed, a training minibatch loss for task j, stored examples for the
replay buffer, the loss on stored examples, and the evaluation of task j. ``slow_spec`` is the
level specification (parameter-name glob -> period) the deepopt methods use: the lower layers
(digits) or the Transformer MLPs (text) update every 4 steps, the rest every step.

Example:
    >>> seq = SEQUENCES["split_digits"]()
    >>> model = seq.model(0)
    >>> 0.0 <= seq.evaluate(model, 0) <= 1.0
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .tasks.base import seeded_generator
from .tasks.digits import DigitsMLP, digits_split
from .tasks.text import BATCH as TEXT_BATCH
from .tasks.text import CONTEXT, CharTransformer, _windows, genre_text

DIGITS_BATCH = 64


def _on(model: nn.Module, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors moved to the model's device (data stays on the CPU until it is used)."""
    device = next(model.parameters()).device
    return [t.to(device) for t in tensors]


class PermutedDigits:
    name, metric, higher_is_better = "permuted_digits", "accuracy", True
    slow_spec = {"body.*": 4}

    def __init__(self, n_tasks: int = 4, steps: int = 150):
        self.n_tasks, self.steps = n_tasks, steps
        gen = torch.Generator().manual_seed(2024)
        self.perms = [torch.arange(64)] + [torch.randperm(64, generator=gen) for _ in range(n_tasks - 1)]
        self.x_tr, self.y_tr, self.x_te, self.y_te = digits_split()

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return DigitsMLP(hidden=64)

    def sample(self, task: int, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.y_tr), (n,), generator=gen)
        return self.x_tr[idx][:, self.perms[task]], self.y_tr[idx]

    def loss_on(self, model: nn.Module, task: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = _on(model, x, y)
        return F.cross_entropy(model(x), y)

    def train_loss(self, model: nn.Module, task: int, gen: torch.Generator) -> torch.Tensor:
        return self.loss_on(model, task, *self.sample(task, gen, DIGITS_BATCH))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, task: int) -> float:
        x, y = _on(model, self.x_te[:, self.perms[task]], self.y_te)
        return float((model(x).argmax(-1) == y).float().mean())


class SplitDigits(PermutedDigits):
    name = "split_digits"

    def __init__(self, n_tasks: int = 5, steps: int = 60):
        self.n_tasks, self.steps = n_tasks, steps
        self.x_tr, self.y_tr, self.x_te, self.y_te = digits_split()
        self.classes = [torch.tensor([2 * j, 2 * j + 1]) for j in range(n_tasks)]
        self.train_idx = [torch.nonzero(torch.isin(self.y_tr, c)).flatten() for c in self.classes]
        self.test_idx = [torch.nonzero(torch.isin(self.y_te, c)).flatten() for c in self.classes]

    def _masked(self, logits: torch.Tensor, task: int) -> torch.Tensor:
        mask = torch.full((10,), -math.inf, device=logits.device)
        mask[self.classes[task]] = 0.0
        return logits + mask

    def sample(self, task: int, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pick = self.train_idx[task][torch.randint(len(self.train_idx[task]), (n,), generator=gen)]
        return self.x_tr[pick], self.y_tr[pick]

    def loss_on(self, model: nn.Module, task: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = _on(model, x, y)
        return F.cross_entropy(self._masked(model(x), task), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, task: int) -> float:
        x, y = _on(model, self.x_te[self.test_idx[task]], self.y_te[self.test_idx[task]])
        return float((self._masked(model(x), task).argmax(-1) == y).float().mean())


class ShakespeareGenres:
    name, metric, higher_is_better = "shakespeare_genres", "bpc", False
    slow_spec = {"blocks.*.mlp.*": 4}
    genres = ("comedies", "histories", "tragedies")

    def __init__(self, steps: int = 100):
        self.n_tasks, self.steps = len(self.genres), steps
        self.data = [genre_text(g) for g in self.genres]
        self.eval_windows = []
        for _, held_out in self.data:
            starts = torch.linspace(0, len(held_out) - CONTEXT - 2, 32).long()
            self.eval_windows.append(_windows(held_out, starts))

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return CharTransformer()

    def sample(self, task: int, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        train = self.data[task][0]
        return _windows(train, torch.randint(len(train) - CONTEXT - 1, (n,), generator=gen))

    def loss_on(self, model: nn.Module, task: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = _on(model, x, y)
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def train_loss(self, model: nn.Module, task: int, gen: torch.Generator) -> torch.Tensor:
        return self.loss_on(model, task, *self.sample(task, gen, TEXT_BATCH))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, task: int) -> float:
        x, y = _on(model, *self.eval_windows[task])
        return float(F.cross_entropy(model(x).flatten(0, 1), y.flatten())) / math.log(2.0)


SEQUENCES = {"permuted_digits": PermutedDigits, "split_digits": SplitDigits, "shakespeare_genres": ShakespeareGenres}

# learning-rate centres per family for each sequence's model (the quality suite's for the same models)
LR_CENTRES = {
    "permuted_digits": {"sgd": 0.1, "adam": 1e-2, "muon": 1e-2},
    "split_digits": {"sgd": 0.1, "adam": 1e-2, "muon": 1e-2},
    "shakespeare_genres": {"sgd": 0.3, "adam": 3e-3, "muon": 1e-2},
}


def data_generator(seed: int) -> torch.Generator:
    """The minibatch generator of one continual run."""
    return seeded_generator(seed, salt=777)
