"""Task sequences for ``benchmarks.continual_recipe``: the ``continual`` suite's digits sequences,
their validation twins, and permuted MNIST-1D.

- ``permuted_digits`` / ``split_digits``: :mod:`benchmarks.continual_tasks` (4 permutations of the
  64 pixels, one 10-way head, domain-incremental; 5 class pairs {0,1}..{8,9}, logits masked to the
  task's pair, task-incremental); held-out accuracy.
- ``val_permuted_digits`` / ``val_split_digits``: the same with other permutations (seed 99) and
  other class pairs ({0,5}, {1,6}, ..., {4,9}): the validation sequences on which every method's
  hyperparameters (and the recipe's one setting) are chosen; never used for the reported numbers.
- ``permuted_mnist1d``: MNIST-1D (Greydanus 2020; 4,000 training and 1,000 held-out signals of
  length 40, generated offline by ``mnist1d.data.make_dataset``), 4 tasks, each a fixed permutation
  of the 40 positions (task 0 = identity); an MLP 40-128-128-10; only when ``mnist1d`` is installed.
- ``val_permuted_mnist1d``: its validation twin, as ``val_permuted_digits`` is permuted digits':
  the same data and model, other permutations (task 0 the identity, then seed 99 instead of 2024);
  kept out of ``VALIDATION_SEQUENCES`` (the methods' selection grids stay on the two digits
  sequences) and run by ``benchmarks.continual_text_validation --mnist1d-check``.

``class_groups(seq, task)`` gives the groups of logits the tasks before ``task`` are scored on (all
ten for the permuted sequences, each earlier pair for split), which LwF distils.

Example:
    >>> seq = SEQUENCES["val_split_digits"]()
    >>> [g.tolist() for g in class_groups(seq, 2)]
    [[0, 5], [1, 6]]
"""

from __future__ import annotations

import sys
import types
from functools import lru_cache

import torch
from torch import nn

from .continual_tasks import PermutedDigits, SplitDigits
from .data import digit_permutations, digits_split
from .tasks.digits import DigitsMLP

__all__ = ["SEQUENCES", "TEST_SEQUENCES", "VALIDATION_SEQUENCES", "VAL_MNIST1D_SEQUENCES", "class_groups",
           "mnist1d_available"]


def class_groups(seq, task: int) -> list:
    """Logit groups of the tasks before ``task`` (indices into the logits' last dimension): each
    earlier class set (split), all ten classes (permuted), or the whole vocabulary (a character LM,
    whose metric is bits per character)."""
    if hasattr(seq, "classes"):
        return [seq.classes[j] for j in range(task)]
    if getattr(seq, "metric", None) == "bpc":
        return [slice(None)] if task > 0 else []
    return [torch.arange(10)] if task > 0 else []


class ValPermutedDigits(PermutedDigits):
    name = "val_permuted_digits"

    def __init__(self, n_tasks: int = 4, steps: int = 150):
        super().__init__(n_tasks, steps)
        x_tr, _, x_te, _ = digits_split()
        self.permute(x_tr, x_te, digit_permutations(n_tasks, seed=99))


class ValSplitDigits(SplitDigits):
    name = "val_split_digits"

    def __init__(self, n_tasks: int = 5, steps: int = 60):
        super().__init__(n_tasks, steps)
        self.classes = [torch.tensor([j, j + 5]) for j in range(n_tasks)]
        self.train_idx = [torch.nonzero(torch.isin(self.y_tr, c)).flatten() for c in self.classes]
        self.test_idx = [torch.nonzero(torch.isin(self.y_te, c)).flatten() for c in self.classes]


def mnist1d_available() -> bool:
    try:
        import mnist1d  # noqa: F401
    except ModuleNotFoundError as err:
        return err.name == "requests"  # only its download needs requests; the data are generated here
    return True


@lru_cache(maxsize=1)
def mnist1d_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) of MNIST-1D's default arguments, generated (no download).

    ``mnist1d.data`` imports ``requests`` for its download path only; where ``requests`` is missing
    a placeholder module stands in during the import (nothing here downloads)."""
    stub = "requests" not in sys.modules
    if stub:
        try:
            import requests  # noqa: F401
            stub = False
        except ModuleNotFoundError:
            sys.modules["requests"] = types.ModuleType("requests")
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    finally:
        if stub:
            sys.modules.pop("requests", None)
    data = make_dataset(get_dataset_args())
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    i = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return f(data["x"]), i(data["y"]), f(data["x_test"]), i(data["y_test"])


class PermutedMNIST1D(PermutedDigits):
    name = "permuted_mnist1d"

    permutation_seed = 2024

    def __init__(self, n_tasks: int = 4, steps: int = 300):
        self.n_tasks, self.steps, self.batch, self._model = n_tasks, steps, 64, None
        gen = torch.Generator().manual_seed(self.permutation_seed)
        x_tr, self.y_tr, x_te, self.y_te = mnist1d_split()
        self.permute(x_tr, x_te, [torch.arange(40)] + [torch.randperm(40, generator=gen) for _ in range(n_tasks - 1)])

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return DigitsMLP(hidden=128, inputs=40)  # 40 -> 128 -> 128 -> 10


class ValPermutedMNIST1D(PermutedMNIST1D):
    """The validation twin of ``permuted_mnist1d``: other permutations (seed 99), the rest the same."""

    name = "val_permuted_mnist1d"
    permutation_seed = 99


VALIDATION_SEQUENCES = {"val_permuted_digits": ValPermutedDigits, "val_split_digits": ValSplitDigits}
TEST_SEQUENCES = {"permuted_digits": PermutedDigits, "split_digits": SplitDigits}
if mnist1d_available():
    TEST_SEQUENCES["permuted_mnist1d"] = PermutedMNIST1D
#: validation twin of permuted MNIST-1D (not in VALIDATION_SEQUENCES: no selection grid runs on it)
VAL_MNIST1D_SEQUENCES = {"val_permuted_mnist1d": ValPermutedMNIST1D} if mnist1d_available() else {}
SEQUENCES = {**VALIDATION_SEQUENCES, **VAL_MNIST1D_SEQUENCES, **TEST_SEQUENCES}
