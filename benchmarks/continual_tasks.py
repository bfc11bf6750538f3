"""Task sequences of the ``continual`` and ``continual_levels`` suites (each defined once here).

- ``permuted_digits``: task j shows the 64 digit pixels in the order
  :func:`benchmarks.data.digit_permutations` gives (task 0 = identity); one 10-way head; metric:
  held-out accuracy (360 images).
- ``split_digits``: 5 tasks, classes {0,1}, {2,3}, ..., {8,9}; task-incremental (the logits are
  masked to the task's two classes in training and evaluation); metric: held-out accuracy.
- ``shakespeare_genres``: a character LM trained on comedies, then histories, then tragedies;
  metric: bits per character on fixed windows of each genre's held-out last 10% (lower is better).
  ``text="clean"`` (the ``continual`` suite): :func:`benchmarks.data.genre_text`, the 36-symbol
  alphabet; ``text="raw"`` (``continual_levels``): the raw Markdown, one tokenizer over the genres.

A sequence gives the model for a seed, a training minibatch loss for task j, stored examples for the
replay buffer, the loss on stored examples, and the evaluation of task j. The defaults are the
``continual`` suite's (digits MLP 64-64-64-10, batch 64; ``nl_layers.TransformerLM`` d=64, context
32, batch 8); ``model``, ``batch`` and the sizes are arguments, so ``continual_levels`` builds its
larger models on the same data. ``slow_spec`` is the level specification (parameter-name glob ->
period) of the ``continual`` suite's deepopt methods: the lower layers (digits) or the Transformer
MLPs (text) update every 4 steps, the rest every step.

Example:
    >>> seq = SEQUENCES["split_digits"]()
    >>> model = seq.model(0)
    >>> 0.0 <= seq.evaluate(model, 0) <= 1.0
    True
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import digit_permutations, digits_split, genre_text, raw_genre_ids
from .tasks.base import seeded_generator
from .tasks.digits import DigitsMLP
from .tasks.text import BATCH as TEXT_BATCH
from .tasks.text import CONTEXT, EVAL_WINDOWS, char_transformer, xy_windows

DIGITS_BATCH = 64


def _on(model: nn.Module, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors moved to the model's device (a no-op when the data already lives there)."""
    device = next(model.parameters()).device
    return [t.to(device) for t in tensors]


class PermutedDigits:
    """Permuted digits; ``model()`` builds a fresh classifier (default: ``DigitsMLP(hidden=64)``);
    ``device`` keeps the data there (default: the CPU, moved per batch)."""

    name, metric, higher_is_better, nest_activation = "permuted_digits", "accuracy", True, "relu"
    slow_spec = {"body.*": 4}

    def __init__(self, n_tasks: int = 4, steps: int = 150, batch: int = DIGITS_BATCH,
                 model: Callable[[], nn.Module] | None = None, device: str | None = None):
        self.n_tasks, self.steps, self.batch, self._model = n_tasks, steps, batch, model
        x_tr, self.y_tr, x_te, self.y_te = (t.to(device or "cpu") for t in digits_split())
        self.permute(x_tr, x_te, digit_permutations(n_tasks))

    def permute(self, x_tr: torch.Tensor, x_te: torch.Tensor, perms: list[torch.Tensor]) -> None:
        """Set the tasks: task t's inputs are the columns of ``x_tr``/``x_te`` in the order ``perms[t]``."""
        self.perms = perms
        self.x_tr = [x_tr[:, perm.to(x_tr.device)] for perm in perms]
        self.x_te = [x_te[:, perm.to(x_te.device)] for perm in perms]

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return self._model() if self._model else DigitsMLP(hidden=64)

    def sample(self, task: int, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.y_tr), (n,), generator=gen).to(self.y_tr.device)
        return self.x_tr[task][idx], self.y_tr[idx]

    def loss_on(self, model: nn.Module, task: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = _on(model, x, y)
        return F.cross_entropy(model(x), y)

    def train_loss(self, model: nn.Module, task: int, gen: torch.Generator) -> torch.Tensor:
        return self.loss_on(model, task, *self.sample(task, gen, self.batch))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, task: int) -> float:
        x, y = _on(model, self.x_te[task], self.y_te)
        return float((model(x).argmax(-1) == y).float().mean())


class SplitDigits(PermutedDigits):
    name = "split_digits"

    def __init__(self, n_tasks: int = 5, steps: int = 60, batch: int = DIGITS_BATCH):
        self.n_tasks, self.steps, self.batch, self._model = n_tasks, steps, batch, None
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
    """Genres in sequence (see the module doc); ``model(vocab)`` builds a fresh LM returning logits
    (default: the CPU suites' ``char_transformer``); ``genres``: another order of the three (default
    comedies, histories, tragedies)."""

    name, metric, higher_is_better, nest_activation = "shakespeare_genres", "bpc", False, "gelu"
    slow_spec = {"blocks.*.mlp.*": 4}
    genres = ("comedies", "histories", "tragedies")

    def __init__(self, steps: int = 100, context: int = CONTEXT, batch: int = TEXT_BATCH,
                 eval_windows: int = EVAL_WINDOWS, text: str = "clean", max_chars: int | None = None,
                 model: Callable[[int], nn.Module] | None = None, device: str | None = None,
                 genres: Sequence[str] | None = None):
        if genres is not None:  # another order (or subset) of the genres, e.g. a validation sequence's
            unknown = [g for g in genres if g not in type(self).genres]
            if unknown or not genres:
                raise ValueError(f"genres must be a non-empty selection of {type(self).genres}, got {genres!r}")
            self.genres = tuple(genres)
        self.n_tasks, self.steps, self.context, self.batch, self._model = len(self.genres), steps, context, batch, model
        if text == "clean":
            self.vocab = None
            splits = [genre_text(g) if max_chars is None else genre_text(g, max_chars) for g in self.genres]
        elif text == "raw":
            ids, self.vocab = raw_genre_ids(self.genres, max_chars)
            splits = [(x[: int(0.9 * len(x))], x[int(0.9 * len(x)):]) for x in ids]
        else:
            raise ValueError(f"text must be 'clean' or 'raw', got {text!r}")
        device = device or "cpu"
        self.train = [train.to(device) for train, _ in splits]
        self.eval_windows = []
        for _, held_out in splits:
            starts = torch.linspace(0, len(held_out) - context - 2, eval_windows).long()
            self.eval_windows.append(xy_windows(held_out.to(device), starts.to(device), context))

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return self._model(self.vocab) if self._model else char_transformer()

    def sample(self, task: int, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        train = self.train[task]
        starts = torch.randint(len(train) - self.context - 1, (n,), generator=gen)
        return xy_windows(train, starts.to(train.device), self.context)

    def loss_on(self, model: nn.Module, task: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = _on(model, x, y)
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def train_loss(self, model: nn.Module, task: int, gen: torch.Generator) -> torch.Tensor:
        return self.loss_on(model, task, *self.sample(task, gen, self.batch))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, task: int) -> float:
        """Bits per character over the task's held-out windows (in chunks of 32 windows)."""
        x, y = _on(model, *self.eval_windows[task])
        total = sum(float(F.cross_entropy(model(xb).flatten(0, 1), yb.flatten(), reduction="sum"))
                    for xb, yb in zip(x.split(32), y.split(32)))
        return total / y.numel() / math.log(2.0)


SEQUENCES = {"permuted_digits": PermutedDigits, "split_digits": SplitDigits, "shakespeare_genres": ShakespeareGenres}

# learning-rate centres per family for each sequence's model (the quality suite's for the same models; the char
# Transformer's muon centre 3e-2 puts Muon's best rate inside the sweep at 150 steps)
LR_CENTRES = {
    "permuted_digits": {"sgd": 0.1, "adam": 1e-2, "muon": 1e-2},
    "split_digits": {"sgd": 0.1, "adam": 1e-2, "muon": 1e-2},
    "shakespeare_genres": {"sgd": 0.3, "adam": 3e-3, "muon": 3e-2},
}


def data_generator(seed: int) -> torch.Generator:
    """The minibatch generator of one continual run."""
    return seeded_generator(seed, salt=777)
