"""The two small tasks of the learning-rate sweep: a teacher-student MLP and the digits MLP.

- ``mlp_teacher``: an MLP 16-64-64-1 (ReLU, last layer ``head``) regresses a fixed random tanh
  teacher 16-32-1, targets scaled to unit variance; minibatches of 64 from 2,048 training inputs,
  ``eval_loss`` the mean squared error on 1,024 held-out inputs (about 1 at initialization).
- ``digits_mlp``: the benchmark task of that name (MLP 64-64-64-10 on 8x8 digits, held-out
  cross-entropy).

Both run ``STEPS`` steps; each seed draws its own initialization and minibatch order.

Example:
    >>> p = TASKS["mlp_teacher"].build(0, "cpu")
    >>> 0.5 < p.eval_loss() < 2.0
    True
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..tasks import FAMILIES, Task, get_task
from ..tasks.base import seeded_generator

STEPS = 200
EVAL_EVERY = 50
IN, HIDDEN, TEACHER, BATCH, N_TRAIN, N_TEST = 16, 64, 32, 64, 2048, 1024


@lru_cache(maxsize=1)
def teacher_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) from the fixed teacher (its own generator, seed 0)."""
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(IN, TEACHER, generator=gen) * (2.0 / IN ** 0.5)
    w2 = torch.randn(TEACHER, 1, generator=gen) / TEACHER ** 0.5
    x = torch.randn(N_TRAIN + N_TEST, IN, generator=gen)
    y = torch.tanh(x @ w1) @ w2
    y = y / y.std()
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


class StudentMLP(nn.Module):
    """16 -> 64 -> 64 -> 1 with ReLU."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TeacherProblem:
    """Minibatch mean squared error against the teacher (see module docstring)."""

    def __init__(self, seed: int, device: torch.device):
        self.model = StudentMLP().to(device)
        self.x_tr, self.y_tr, self.x_te, self.y_te = (t.to(device) for t in teacher_data())
        self.gen = seeded_generator(seed, salt=16)

    def train_loss(self, step: int) -> torch.Tensor:
        idx = torch.randint(N_TRAIN, (BATCH,), generator=self.gen).to(self.x_tr.device)
        return F.mse_loss(self.model(self.x_tr[idx]), self.y_tr[idx])

    @torch.no_grad()
    def eval_loss(self) -> float:
        return float(F.mse_loss(self.model(self.x_te), self.y_te))


UNIT = {family: 1.0 for family in FAMILIES}  # the sweep gives absolute rates: every family's centre is 1

TASKS = {
    "mlp_teacher": Task("mlp_teacher", "MLP 16-64-64-1 regressing a random tanh teacher; held-out MSE",
                        lambda seed, dev: TeacherProblem(seed, dev), steps=STEPS, eval_every=EVAL_EVERY,
                        lr_centres=UNIT, tags=("synthetic",)),
    "digits_mlp": replace(get_task("digits_mlp").with_steps(STEPS, EVAL_EVERY), lr_centres=UNIT),
}
