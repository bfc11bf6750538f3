"""Synthetic tasks: seconds each, known minima, chosen to expose one property of an optimizer.

- Rosenbrock, f(x) = sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2, min 0 at x = 1: a curved valley
  (2-D and 100-D; start near the classic (-1.2, 1) with a seeded jitter).
- Ill-conditioned quadratic over a matrix W (16 x 32), f(W) = 1/(2 rows) sum_r (W - W*)_r H (W - W*)_r^T
  with H = Q diag(lambda) Q^T, lambda log-spaced over [1e-4, 1] (condition 1e4), Q a random rotation.
- Noisy quadratic: the same with condition 1e2 and a gradient noise xi = sigma Q diag(sqrt(lambda)) z
  (the noisy quadratic model of Zhang et al., 2019); ``eval_loss`` is the noiseless f.
- Moving target: the quadratic's minimum W* takes a Gaussian random-walk step every step;
  ``eval_loss`` is the loss against the current target (tracking error).
- Saddle: f(u, v) = 1/2 sum a_i u_i^2 + sum (v_j^4 / 4 - v_j^2 / 2) + m/4, started at v ~ 1e-3, next to the
  saddle at the origin; min 0 at u = 0, v = +-1 (escaping the saddle is the task).

Example:
    >>> from benchmarks.tasks.synthetic import TASKS
    >>> p = TASKS["saddle"].build(0, "cpu")
    >>> round(p.eval_loss(), 3) > 0
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Task, seeded_generator


class _Params(nn.Module):
    """A module that holds one parameter tensor named ``x`` (for the optimizer's param list)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.x = nn.Parameter(init)


def _rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


class Rosenbrock:
    """Rosenbrock in ``dim`` dimensions, deterministic gradients."""

    def __init__(self, dim: int, seed: int, device: torch.device):
        gen = seeded_generator(seed, salt=dim)
        start = torch.tensor([-1.2, 1.0] * (dim // 2) + [-1.2] * (dim % 2), dtype=torch.float32)
        start = start + 0.1 * torch.randn(dim, generator=gen)
        self.model = _Params(start.to(device))

    def train_loss(self, step: int) -> torch.Tensor:
        return _rosenbrock(self.model.x)

    @torch.no_grad()
    def eval_loss(self) -> float:
        return float(_rosenbrock(self.model.x))


class Quadratic:
    """f(W) = 1/(2 rows) sum_r (W - W*)_r H (W - W*)_r^T with a rotated spectrum (see module doc).

    ``noise`` scales a curvature-shaped gradient noise; ``drift`` is the std of the per-step
    random-walk move of W* (both 0 for the plain ill-conditioned quadratic).
    """

    def __init__(self, seed: int, device: torch.device, condition: float, noise: float = 0.0,
                 drift: float = 0.0, shape: tuple[int, int] = (16, 32)):
        rows, cols = shape
        gen = seeded_generator(seed, salt=int(math.log10(condition)) + 7)
        q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen))
        lam = torch.logspace(-math.log10(condition), 0.0, cols)
        self.h = (q * lam) @ q.T
        self.noise_map = q * lam.sqrt()  # xi = noise_map @ z has covariance H
        self.target = torch.randn(rows, cols, generator=gen)
        self.noise, self.drift, self.gen = noise, drift, gen
        self.model = _Params(torch.zeros(rows, cols, device=device))
        self.h, self.noise_map, self.target = (t.to(device) for t in (self.h, self.noise_map, self.target))

    def _f(self, w: torch.Tensor) -> torch.Tensor:
        diff = w - self.target
        return 0.5 * ((diff @ self.h) * diff).sum() / w.shape[0]

    def train_loss(self, step: int) -> torch.Tensor:
        if self.drift > 0.0:
            move = torch.randn(self.target.shape, generator=self.gen).to(self.target.device)
            self.target = self.target + self.drift * move
        loss = self._f(self.model.x)
        if self.noise > 0.0:
            z = torch.randn(self.target.shape, generator=self.gen).to(self.target.device)
            xi = self.noise * z @ self.noise_map.T
            loss = loss + (xi * self.model.x).sum() / self.model.x.shape[0]
        return loss

    @torch.no_grad()
    def eval_loss(self) -> float:
        return float(self._f(self.model.x))


class Saddle:
    """Escape from the saddle at the origin (see module doc); ``dim`` u's and ``dim`` v's."""

    def __init__(self, seed: int, device: torch.device, dim: int = 10):
        gen = seeded_generator(seed, salt=3)
        self.a = torch.logspace(-1.0, 0.0, dim).to(device)
        u = torch.randn(dim, generator=gen)
        v = 1e-3 * torch.randn(dim, generator=gen)
        self.model = _Params(torch.cat([u, v]).to(device))
        self.dim = dim

    def _f(self, x: torch.Tensor) -> torch.Tensor:
        u, v = x[: self.dim], x[self.dim:]
        return 0.5 * (self.a * u * u).sum() + (v**4 / 4 - v**2 / 2).sum() + self.dim / 4

    def train_loss(self, step: int) -> torch.Tensor:
        return self._f(self.model.x)

    @torch.no_grad()
    def eval_loss(self) -> float:
        return float(self._f(self.model.x))


TASKS = {
    "rosenbrock_2d": Task(
        "rosenbrock_2d", "Rosenbrock valley, 2-D, from (-1.2, 1) + jitter; loss min 0",
        lambda seed, dev: Rosenbrock(2, seed, dev), steps=500, eval_every=10,
        lr_centres={"sgd": 1e-3, "adam": 0.1, "muon": 0.1}, tags=("synthetic",)),
    "rosenbrock_100d": Task(
        "rosenbrock_100d", "Rosenbrock valley, 100-D (sum over consecutive pairs); loss min 0",
        lambda seed, dev: Rosenbrock(100, seed, dev), steps=500, eval_every=10,
        lr_centres={"sgd": 1e-3, "adam": 0.1, "muon": 0.1}, tags=("synthetic",)),
    "quadratic_illcond": Task(
        "quadratic_illcond", "quadratic over a 16x32 matrix, rotated spectrum, condition 1e4",
        lambda seed, dev: Quadratic(seed, dev, condition=1e4), steps=300, eval_every=10,
        lr_centres={"sgd": 30.0, "adam": 0.3, "muon": 0.1}, tags=("synthetic",)),
    "quadratic_noisy": Task(
        "quadratic_noisy", "quadratic (condition 1e2) with curvature-shaped gradient noise",
        lambda seed, dev: Quadratic(seed, dev, condition=1e2, noise=1.0), steps=300, eval_every=10,
        lr_centres={"sgd": 0.1, "adam": 3e-2, "muon": 3e-2}, tags=("synthetic",)),
    "moving_target": Task(
        "moving_target", "quadratic (condition 1e2) whose minimum random-walks; tracking error",
        lambda seed, dev: Quadratic(seed, dev, condition=1e2, drift=0.01), steps=300, eval_every=10,
        lr_centres={"sgd": 10.0, "adam": 0.1, "muon": 0.1}, tags=("synthetic",)),
    "saddle": Task(
        "saddle", "escape a strict saddle (10 positive, 10 quartic negative directions); min 0",
        lambda seed, dev: Saddle(seed, dev), steps=300, eval_every=10,
        lr_centres={"sgd": 0.03, "adam": 3e-2, "muon": 3e-2}, tags=("synthetic",)),
}
