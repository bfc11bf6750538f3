"""Task families for meta-training an optimizer (``META``) and for testing it untuned (``HELD_OUT``).

A family is a frozen dataclass (``name``, ``split``, ``description``, ``steps`` and its size ranges);
``family.sample(generator, steps=None, device="cpu")`` draws one :class:`PretrainTask`: sizes,
activation, class subset, initial parameters and the mini-batch order all come from ``generator``
(same generator state -> identical task). Data are offline and loaded once per process.

META (seen in meta-training; 40-100 steps, well under a second per run on one CPU thread):
``digits_mlp``, ``digits_cnn``, ``char_transformer``, ``recall``. HELD_OUT (never seen; other
modality, architecture, objective or horizon; 150-500 steps, a few seconds at most):
``mnist1d_mlp``, ``shakespeare_gru``, ``hope_lm``, ``digits_autoencoder``, ``digits_mlp_long``.

A task's ``loss(params, step)`` is pure (``torch.func.functional_call`` on ``task.module``; batch
``step`` is a fixed slice of a per-task permutation of the training data, or for ``recall`` MQAR
sequences from a generator seeded by the task and ``step``) and twice differentiable (attention runs
on SDPA's math backend: the fused CPU kernel has no double backward), so ``deepopt.meta`` can
differentiate through inner steps. ``eval_loss(params)`` is the loss on fixed held-out data.

Any ``torch.optim`` optimizer trains a task through ``nn.Parameter`` copies:

    ps = task.parameters()                      # fresh nn.Parameter clones, in task.names order
    opt = torch.optim.AdamW(ps, lr=1e-3)
    for t in range(task.steps):
        opt.zero_grad(); task.loss(task.named(ps), t).backward(); opt.step()
    task.eval_loss(task.named(ps))

Example:
    >>> task = FAMILIES["digits_mlp"].sample(torch.Generator().manual_seed(0))
    >>> task.family, task.steps, sorted(task.config)[:2]
    ('digits_mlp', 50, ['activation', 'batch'])
    >>> float(task.loss(task.params, 0)) == float(task.loss(task.params, 0))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..data import ALPHABET, digits_split, genre_text, mqar_batch, windows

__all__ = ["FAMILIES", "HELD_OUT_FAMILIES", "META_FAMILIES", "Family", "PretrainTask", "mnist1d_data"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
EVAL_WINDOWS = 64  # held-out text windows of every language-model task
EVAL_RECALL = 128  # held-out MQAR sequences of every recall task


# ------------------------------------------------------------------ the task
class PretrainTask:
    """One training run: initial ``params``, a pure ``loss(params, step)``, ``eval_loss(params)``.

    Attributes: ``family`` (name), ``steps`` (horizon), ``module`` (its ``named_parameters`` are
    what ``params`` mirror; never trained in place), ``names`` (params' order), ``config`` (the
    sampled sizes). ``batch(step)`` gives ``(inputs, target)``; the loss is
    ``objective(module(*inputs), target)``.
    """

    def __init__(self, family: str, module: nn.Module, steps: int, config: dict[str, Any],
                 batch: Callable[[int], tuple[tuple, Any]], objective: Callable[[Tensor, Any], Tensor],
                 eval_batch: tuple[tuple, Any]) -> None:
        self.family, self.module, self.steps, self.config = family, module, steps, config
        self.batch, self.objective, self.eval_batch = batch, objective, eval_batch
        self.params: dict[str, Tensor] = {n: p.detach().clone() for n, p in module.named_parameters()}
        self.names: tuple[str, ...] = tuple(self.params)

    def _loss(self, params: Mapping[str, Tensor], inputs: tuple, target: Any) -> Tensor:
        with sdpa_kernel(SDPBackend.MATH):  # differentiable twice, unlike the fused CPU kernel
            return self.objective(functional_call(self.module, dict(params), inputs), target)

    def loss(self, params: Mapping[str, Tensor], step: int) -> Tensor:
        """Training loss of mini-batch ``step`` (pure: a function of ``params`` and ``step`` only)."""
        return self._loss(params, *self.batch(step))

    @torch.no_grad()
    def eval_loss(self, params: Mapping[str, Tensor]) -> float:
        """Loss on the fixed held-out data (never used by ``loss``)."""
        return float(self._loss(params, *self.eval_batch))

    def parameters(self) -> list[nn.Parameter]:
        """Fresh ``nn.Parameter`` clones of ``params`` in ``names`` order, for a ``torch.optim`` optimizer."""
        return [nn.Parameter(self.params[n].clone()) for n in self.names]

    def named(self, tensors: Sequence[Tensor]) -> dict[str, Tensor]:
        """``dict(zip(self.names, tensors))``: the mapping ``loss`` and ``eval_loss`` take."""
        if len(tensors) != len(self.names):
            raise ValueError(f"expected {len(self.names)} tensors (task.names), got {len(tensors)}")
        return dict(zip(self.names, tensors))

    def __repr__(self) -> str:
        return f"PretrainTask({self.family!r}, steps={self.steps}, {self.config})"


# ------------------------------------------------------------------ sampling helpers
def _int(g: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _choice(g: torch.Generator, options: Sequence):
    return options[int(torch.randint(len(options), (1,), generator=g))]


def _build(g: torch.Generator, make: Callable[[], nn.Module], device) -> nn.Module:
    """``make()`` with PyTorch's default initialization drawn from a seed taken from ``g`` (the
    global generator is left as it was)."""
    seed = int(torch.randint(2**62, (1,), generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
    return module.to(device=device, dtype=torch.float32)


def _permuted_batches(n: int, batch: int, g: torch.Generator, device) -> Callable[[int], Tensor]:
    """Indices of mini-batch ``step``: consecutive slices (wrapping) of one permutation of range(n)."""
    order = torch.randperm(n, generator=g).to(device)
    offsets = torch.arange(batch, device=device)
    return lambda step: order[(step * batch + offsets) % n]


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([ACTIVATIONS[activation]()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


# ------------------------------------------------------------------ data (once per process, float32)
def _digits(classes: Tensor | None, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test) of the 8x8 digits restricted to ``classes`` (labels
    renumbered 0..len-1; None: all ten)."""
    x_tr, y_tr, x_te, y_te = digits_split()
    if classes is not None:
        keep_tr, keep_te = torch.isin(y_tr, classes), torch.isin(y_te, classes)
        x_tr, x_te = x_tr[keep_tr], x_te[keep_te]
        y_tr, y_te = (torch.searchsorted(classes, y) for y in (y_tr[keep_tr], y_te[keep_te]))
    return tuple(t.to(device) for t in (x_tr, y_tr, x_te, y_te))


@lru_cache(maxsize=1)
def mnist1d_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST-1D (4,000 training, 1,000 held-out signals of length 40, 10 classes), generated offline
    by ``mnist1d.data.make_dataset`` with its default arguments (no download)."""
    from ..continual_sequences import mnist1d_available, mnist1d_split

    if not mnist1d_available():
        raise ModuleNotFoundError("the mnist1d_mlp family needs the mnist1d package: pip install mnist1d "
                                  "(or pip install -e '.[bench]')", name="mnist1d")
    return mnist1d_split()


def _text_task(family: str, module: nn.Module, steps: int, config: dict, genre: str, seq: int, batch: int,
               g: torch.Generator, device) -> PretrainTask:
    """Next-character cross-entropy on ``genre``: batch ``step`` = windows of ``seq + 1`` characters
    from a per-task permutation of the non-overlapping windows (at a random offset) of the training
    text; held out: ``EVAL_WINDOWS`` fixed windows of the genre's held-out 10%."""
    train, held_out = genre_text(genre)
    offset = _int(g, 0, seq)
    count = (len(train) - offset) // (seq + 1)
    pick = _permuted_batches(count, batch, g, "cpu")
    train, held_out = train.to(device), held_out.to(device)

    def xy(ids: Tensor, starts: Tensor) -> tuple[tuple, Tensor]:
        chunk = windows(ids, starts.to(device), seq + 1)
        return (chunk[:, :-1],), chunk[:, 1:]

    eval_starts = torch.linspace(0, len(held_out) - seq - 2, EVAL_WINDOWS).long()
    return PretrainTask(family, module, steps, {**config, "genre": genre, "seq": seq, "batch": batch},
                        lambda step: xy(train, offset + (seq + 1) * pick(step)), _cross_entropy,
                        xy(held_out, eval_starts))


# ------------------------------------------------------------------ families
@dataclass(frozen=True)
class Family:
    """A distribution over training runs; ``sample(generator, steps=None, device="cpu")`` draws one."""

    name: str
    split: str  # "meta" or "held_out"
    description: str
    steps: int

    def sample(self, generator: torch.Generator, *, steps: int | None = None, device="cpu") -> PretrainTask:
        steps = self.steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return self._sample(generator, steps, torch.device(device))

    def _sample(self, g: torch.Generator, steps: int, device: torch.device) -> PretrainTask:
        raise NotImplementedError

    def __call__(self, generator: torch.Generator) -> PretrainTask:
        """``sample`` at the default horizon: the family is itself a ``MetaTrainer`` task sampler."""
        return self.sample(generator)


@dataclass(frozen=True)
class DigitsMLPFamily(Family):
    """MLP on 8x8 digits: 10-way, or (half the time) a random 5-way subset of the classes."""

    widths: tuple[int, int] = (16, 64)
    depths: tuple[int, int] = (1, 3)
    batches: tuple[int, int] = (16, 64)

    def _sample(self, g, steps, device):
        width, depth, batch = _int(g, *self.widths), _int(g, *self.depths), _int(g, *self.batches)
        activation = _choice(g, tuple(ACTIVATIONS))
        classes = None if _int(g, 0, 1) else torch.randperm(10, generator=g)[:5].sort().values
        x_tr, y_tr, x_te, y_te = _digits(classes, device)
        n_out = 10 if classes is None else 5
        module = _build(g, lambda: _mlp([64] + [width] * depth + [n_out], activation), device)
        pick = _permuted_batches(len(y_tr), batch, g, device)
        config = {"width": width, "depth": depth, "batch": batch, "activation": activation,
                  "classes": list(range(10)) if classes is None else classes.tolist()}
        return PretrainTask(self.name, module, steps, config, lambda s: ((x_tr[pick(s)],), y_tr[pick(s)]),
                            F.cross_entropy, ((x_te,), y_te))


class _DigitsCNN(nn.Module):
    def __init__(self, c1: int, c2: int, activation: str):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, c1, 3, padding=1), nn.Conv2d(c1, c2, 3, padding=1)
        self.act, self.head = ACTIVATIONS[activation](), nn.Linear(c2 * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.conv1(x.view(-1, 1, 8, 8)))
        return self.head(F.max_pool2d(self.act(self.conv2(h)), 2).flatten(1))


@dataclass(frozen=True)
class DigitsCNNFamily(Family):
    channels1: tuple[int, int] = (4, 8)
    channels2: tuple[int, int] = (8, 16)
    batches: tuple[int, int] = (16, 64)

    def _sample(self, g, steps, device):
        c1, c2, batch = _int(g, *self.channels1), _int(g, *self.channels2), _int(g, *self.batches)
        activation = _choice(g, tuple(ACTIVATIONS))
        x_tr, y_tr, x_te, y_te = _digits(None, device)
        module = _build(g, lambda: _DigitsCNN(c1, c2, activation), device)
        pick = _permuted_batches(len(y_tr), batch, g, device)
        config = {"channels": (c1, c2), "batch": batch, "activation": activation}
        return PretrainTask(self.name, module, steps, config, lambda s: ((x_tr[pick(s)],), y_tr[pick(s)]),
                            F.cross_entropy, ((x_te,), y_te))


@dataclass(frozen=True)
class CharTransformerFamily(Family):
    dims: tuple[int, ...] = (16, 24, 32)  # 2 heads with RoPE: an even head dimension
    depths: tuple[int, int] = (1, 2)
    seqs: tuple[int, int] = (16, 32)
    batches: tuple[int, int] = (4, 8)
    genres: tuple[str, ...] = ("comedies", "histories")

    def _sample(self, g, steps, device):
        import nl_layers

        dim, depth = _choice(g, self.dims), _int(g, *self.depths)
        seq, batch, genre = _int(g, *self.seqs), _int(g, *self.batches), _choice(g, self.genres)
        module = _build(g, lambda: nl_layers.TransformerLM(len(ALPHABET), dim, depth, heads=2), device)
        return _text_task(self.name, module, steps, {"dim": dim, "depth": depth}, genre, seq, batch, g, device)


@dataclass(frozen=True)
class RecallFamily(Family):
    """MQAR (``benchmarks.data.mqar_batch``) with ``benchmarks.tasks.recall.RecallModel("attention")``."""

    dims: tuple[int, ...] = (16, 24, 32)
    pairs: tuple[int, int] = (2, 4)
    vocabs: tuple[int, int] = (16, 32)
    batches: tuple[int, int] = (8, 16)

    def _sample(self, g, steps, device):
        from ..tasks.recall import RecallModel

        dim, pairs = _choice(g, self.dims), _int(g, *self.pairs)
        vocab, batch = _int(g, *self.vocabs), _int(g, *self.batches)
        seq = 4 * pairs + 2 * _int(g, 0, 4)
        keys, values = (vocab - 1) // 2, vocab - 1 - (vocab - 1) // 2
        module = _build(g, lambda: RecallModel("attention", dim, vocab, depth=1, heads=2), device)
        seed = int(torch.randint(2**62, (1,), generator=g))

        def data(n: int, gen_seed: int) -> tuple[tuple, Tensor]:
            tokens, targets, mask = (t.to(device) for t in
                                     mqar_batch(n, seq, pairs, keys, values, torch.Generator().manual_seed(gen_seed)))
            return (tokens, mask), targets[mask]

        config = {"dim": dim, "pairs": pairs, "vocab": vocab, "seq": seq, "batch": batch}
        eval_data = data(EVAL_RECALL, 12345 + 1000 * pairs + seq)  # one fixed set per (pairs, seq, vocab)
        return PretrainTask(self.name, module, steps, config, lambda s: data(batch, (seed + 7919 * s) % 2**62),
                            F.cross_entropy, eval_data)


@dataclass(frozen=True)
class MNIST1DMLPFamily(Family):
    widths: tuple[int, int] = (32, 128)
    depths: tuple[int, int] = (1, 3)
    batches: tuple[int, int] = (32, 128)

    def _sample(self, g, steps, device):
        x_tr, y_tr, x_te, y_te = (t.to(device) for t in mnist1d_data())
        width, depth, batch = _int(g, *self.widths), _int(g, *self.depths), _int(g, *self.batches)
        activation = _choice(g, tuple(ACTIVATIONS))
        module = _build(g, lambda: _mlp([40] + [width] * depth + [10], activation), device)
        pick = _permuted_batches(len(y_tr), batch, g, device)
        config = {"width": width, "depth": depth, "batch": batch, "activation": activation}
        return PretrainTask(self.name, module, steps, config, lambda s: ((x_tr[pick(s)],), y_tr[pick(s)]),
                            F.cross_entropy, ((x_te,), y_te))


class _GRULM(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, embed), nn.Linear(hidden, vocab)
        self.gru = nn.GRU(embed, hidden, batch_first=True)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.gru(self.embed(ids))[0])


@dataclass(frozen=True)
class GRULMFamily(Family):
    embeds: tuple[int, int] = (16, 32)
    hiddens: tuple[int, int] = (32, 64)
    seqs: tuple[int, int] = (16, 32)
    batches: tuple[int, int] = (8, 16)
    genre: str = "tragedies"

    def _sample(self, g, steps, device):
        embed, hidden = _int(g, *self.embeds), _int(g, *self.hiddens)
        seq, batch = _int(g, *self.seqs), _int(g, *self.batches)
        module = _build(g, lambda: _GRULM(len(ALPHABET), embed, hidden), device)
        config = {"embed": embed, "hidden": hidden}
        return _text_task(self.name, module, steps, config, self.genre, seq, batch, g, device)


@dataclass(frozen=True)
class HopeLMFamily(Family):
    """``nl_layers.HopeLM(block="attention")``: softmax attention + a CMS of 1-2 MLP levels."""

    dims: tuple[int, ...] = (16, 24, 32)
    cms_periods: tuple[tuple[int, ...], ...] = ((1,), (1, 2), (1, 4))
    seqs: tuple[int, int] = (16, 32)
    batches: tuple[int, int] = (4, 8)
    genre: str = "tragedies"

    def _sample(self, g, steps, device):
        import nl_layers

        dim, periods = _choice(g, self.dims), _choice(g, self.cms_periods)
        seq, batch = _int(g, *self.seqs), _int(g, *self.batches)
        module = _build(g, lambda: nl_layers.HopeLM(len(ALPHABET), dim, 1, heads=2, block="attention",
                                                    cms_periods=periods), device)
        return _text_task(self.name, module, steps, {"dim": dim, "cms_periods": periods}, self.genre, seq, batch,
                          g, device)


@dataclass(frozen=True)
class DigitsAutoencoderFamily(Family):
    hiddens: tuple[int, int] = (32, 64)
    code: int = 16
    batches: tuple[int, int] = (16, 64)

    def _sample(self, g, steps, device):
        hidden, batch, activation = _int(g, *self.hiddens), _int(g, *self.batches), _choice(g, tuple(ACTIVATIONS))
        x_tr, _, x_te, _ = _digits(None, device)
        act = ACTIVATIONS[activation]
        module = _build(g, lambda: nn.Sequential(nn.Linear(64, hidden), act(), nn.Linear(hidden, self.code), act(),
                                                 nn.Linear(self.code, hidden), act(), nn.Linear(hidden, 64)), device)
        pick = _permuted_batches(len(x_tr), batch, g, device)
        config = {"hidden": hidden, "code": self.code, "batch": batch, "activation": activation}
        return PretrainTask(self.name, module, steps, config, lambda s: ((x_tr[pick(s)],), x_tr[pick(s)]),
                            F.mse_loss, ((x_te,), x_te))


META_FAMILIES: tuple[Family, ...] = (
    DigitsMLPFamily("digits_mlp", "meta", "MLP 64-(16..64)x(1..3)-10 (or a random 5-way subset), tanh/relu/gelu, "
                    "on 8x8 digits, batch 16-64", steps=50),
    DigitsCNNFamily("digits_cnn", "meta", "CNN conv3(4..8)-conv3(8..16)-maxpool-linear, tanh/relu/gelu, on 8x8 "
                    "digits, batch 16-64", steps=50),
    CharTransformerFamily("char_transformer", "meta", "nl_layers.TransformerLM dim 16/24/32, 1-2 blocks, 2 heads, "
                          "on Shakespeare comedies/histories characters, seq 16-32, batch 4-8", steps=60),
    RecallFamily("recall", "meta", "RecallModel (1 attention block, dim 16/24/32, 2 heads) on MQAR, 2-4 pairs, "
                 "vocab 16-32, seq 4*pairs+0..8, batch 8-16", steps=60),
)
HELD_OUT_FAMILIES: tuple[Family, ...] = (
    MNIST1DMLPFamily("mnist1d_mlp", "held_out", "MLP 40-(32..128)x(1..3)-10, tanh/relu/gelu, on MNIST-1D "
                     "(4,000 generated signals), batch 32-128", steps=150),
    GRULMFamily("shakespeare_gru", "held_out", "embedding(16..32)-GRU(32..64)-linear character LM on Shakespeare "
                "tragedies, seq 16-32, batch 8-16", steps=150),
    HopeLMFamily("hope_lm", "held_out", "nl_layers.HopeLM block=attention, dim 16/24/32, depth 1, CMS periods "
                 "(1,)/(1,2)/(1,4), on tragedies characters, seq 16-32, batch 4-8", steps=150),
    DigitsAutoencoderFamily("digits_autoencoder", "held_out", "MLP autoencoder 64-(32..64)-16-(32..64)-64, "
                            "tanh/relu/gelu, MSE on 8x8 digits, batch 16-64", steps=150),
    DigitsMLPFamily("digits_mlp_long", "held_out", "digits_mlp at 10x its horizon (500 steps), width 64-128",
                    steps=500, widths=(64, 128)),
)
FAMILIES: dict[str, Family] = {f.name: f for f in META_FAMILIES + HELD_OUT_FAMILIES}
