"""Continual learning on digits: tasks one after another, with and without slow levels.

Scenarios (scikit-learn's 8x8 digits, no download):
  * ``permuted``: task k = all ten digits with a fixed pixel permutation (task 0 = identity);
  * ``split``: task k = digits {2k, 2k+1}, label = parity (one shared 2-way head, domain-incremental).

Methods (same MLP, same learning rate): ``adamw``; ``adamw+multitimescale`` (the same AdamW with
``deepopt.lightning.MultiTimescale(slow_levels)``); ``deepopt`` (a deepopt optimizer, M3 by default,
whose param groups carry the same periods: a slow momentum level plus slow parameter levels; or
``DeepMomentum.pretrained``, the shipped memory at its own learning rate);
``adamw+recipe`` (the same AdamW with ``deepopt.lightning.ContinualRecipe``: the continual recipe's
slow level over ``net``, consolidated at every task end, knobs ``recipe`` over the recipe's defaults).

All tasks are trained in one ``Trainer.fit`` (task = epoch // epochs_per_task). After each task the
accuracy on every task is printed; at the end the accuracy matrices are saved as a PNG in the run
folder ``./runs/continual-<time>/`` (see :mod:`.run_dir`).

    python -m lightning_examples.continual --config lightning_examples/configs/continual.yaml
    python -m lightning_examples.continual --help
"""

from __future__ import annotations

import copy
import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deepopt
from deepopt.lightning import ContinualRecipe, LevelMonitor, MultiTimescale

from .run_dir import RunDirCLI, in_run_dir

METHODS = ("adamw", "adamw+multitimescale", "deepopt", "adamw+recipe")


class ContinualDigits(pl.LightningDataModule):
    """A sequence of digit tasks; the current task follows the Trainer's epoch."""

    def __init__(self, scenario: str = "permuted", num_tasks: int = 5, epochs_per_task: int = 3,
                 batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        if scenario not in ("permuted", "split"):
            raise ValueError(f"scenario must be 'permuted' or 'split', got {scenario!r}")
        if not 1 <= num_tasks <= (5 if scenario == "split" else 100):
            raise ValueError(f"num_tasks must be in [1, {5 if scenario == 'split' else 100}] for {scenario!r}")
        self.scenario, self.num_tasks, self.epochs_per_task = scenario, num_tasks, epochs_per_task
        self.batch_size, self.seed = batch_size, seed
        self.num_classes = 10 if scenario == "permuted" else 2
        self.tasks: list[tuple[TensorDataset, TensorDataset]] = []

    def setup(self, stage: str) -> None:
        if self.tasks:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target)
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(y), generator=g)
        cut = int(0.75 * len(y))
        splits = (order[:cut], order[cut:])
        for k in range(self.num_tasks):
            if self.scenario == "permuted":
                perm = torch.arange(64) if k == 0 else torch.randperm(64, generator=g)
                self.tasks.append(tuple(TensorDataset(x[i][:, perm], y[i]) for i in splits))
            else:
                keep = [i[(y[i] // 2) == k] for i in splits]
                self.tasks.append(tuple(TensorDataset(x[i], y[i] % 2) for i in keep))

    def current_task(self) -> int:
        return min(self.trainer.current_epoch // self.epochs_per_task, self.num_tasks - 1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed + self.trainer.current_epoch)
        return DataLoader(self.tasks[self.current_task()][0], batch_size=self.batch_size, shuffle=True, generator=g)


class ContinualClassifier(pl.LightningModule):
    """An MLP trained by one of ``METHODS``; ``slow_levels`` are the periods of its slow parameters;
    ``recipe``: knobs of ``ContinualRecipe`` (``adamw+recipe``) over ``deepopt.continual.DEFAULTS``.

    Args:
        lr: every method's learning rate (not ``DeepMomentum.pretrained``'s: its memory's applies).
        deepopt_optimizer: the ``deepopt`` method's optimizer: a ``deepopt.OPTIMIZERS`` name or
            ``DeepMomentum.pretrained`` (the shipped meta-learned memory; ``DeepMomentum.pretrained(NAME)``
            another shipped one).
    """

    def __init__(self, method: str = "adamw", hidden: int = 256, lr: float = 1e-3, weight_decay: float = 0.0,
                 slow_levels: dict[str, int] | None = None, deepopt_optimizer: str = "M3",
                 num_classes: int = 10, recipe: dict[str, Any] | None = None) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if deepopt_optimizer not in deepopt.OPTIMIZERS and deepopt.pretrained.memory_of(deepopt_optimizer) is None:
            raise ValueError(f"deepopt_optimizer must be one of {sorted(deepopt.OPTIMIZERS)} or 'DeepMomentum.pretrained' "
                             f"or 'DeepMomentum.pretrained(NAME)' (only DeepMomentum has pretrained memories), got "
                             f"{deepopt_optimizer!r}")
        self.method, self.lr, self.weight_decay, self.deepopt_optimizer = method, lr, weight_decay, deepopt_optimizer
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))
        self.slow_levels = {"net.0.*": 4, "net.2.*": 16} if slow_levels is None else dict(slow_levels)
        self.recipe = dict(recipe or {})
        unknown = set(self.recipe) - set(deepopt.continual.DEFAULTS)
        if unknown:
            raise ValueError(f"recipe knobs must be among {sorted(deepopt.continual.DEFAULTS)}, got {sorted(unknown)}")

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        hp = dict(lr=self.lr, weight_decay=self.weight_decay)
        if self.method != "deepopt":
            return torch.optim.AdamW(self.parameters(), **hp)
        groups = deepopt.group_by_period(self, self.slow_levels)
        memory = deepopt.pretrained.memory_of(self.deepopt_optimizer)
        if memory is not None:  # the memory's recommended lr, not self.lr
            return deepopt.DeepMomentum.pretrained(groups, name=memory, weight_decay=self.weight_decay)
        return deepopt.OPTIMIZERS[self.deepopt_optimizer](groups, **hp)

    def configure_callbacks(self):
        callbacks = [TaskEvaluator(), LevelMonitor()]
        if self.method == "adamw+multitimescale":
            callbacks.insert(0, MultiTimescale(self.slow_levels))
        if self.method == "adamw+recipe":  # the pull's lr: the optimizer's; a task ends every epochs_per_task
            callbacks.insert(0, ContinualRecipe(epochs_per_task=self.trainer.datamodule.epochs_per_task, module="net",
                                                **self.recipe))
        return callbacks


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    device = next(model.parameters()).device
    return float((model(x.to(device)).argmax(-1).cpu() == y).float().mean())


class TaskEvaluator(pl.Callback):
    """After each task: accuracy on every task's test set -> row of ``matrix`` (stage x task)."""

    def __init__(self) -> None:
        self.matrix: list[list[float]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        dm = trainer.datamodule
        if (trainer.current_epoch + 1) % dm.epochs_per_task:
            return
        pl_module.eval()
        self.matrix.append([accuracy(pl_module.net, test) for _, test in dm.tasks])
        pl_module.train()
        print(f"\n{pl_module.method} ({dm.scenario}): after task {len(self.matrix)}\n"
              + format_table(self.matrix, dm.num_tasks))


def format_table(matrix: list[list[float]], num_tasks: int) -> str:
    head = "after \\ on | " + " | ".join(f"task {j + 1}" for j in range(num_tasks))
    rows = [f"task {i + 1:<5} | " + " | ".join(f"{a:6.3f}" for a in row) for i, row in enumerate(matrix)]
    return "\n".join([head, "-" * len(head), *rows])


def summary(matrix: list[list[float]]) -> tuple[float, float]:
    """Average final accuracy over tasks, and average forgetting (best earlier accuracy - final)."""
    final, n = matrix[-1], len(matrix)
    forgetting = [max(matrix[i][j] for i in range(j, n - 1)) - final[j] for j in range(n - 1)] or [0.0]
    return sum(final) / len(final), sum(forgetting) / len(forgetting)


def save_png(results: dict[tuple[str, str], list[list[float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({s for s, _ in results})
    methods = [m for m in METHODS if any(k[1] == m for k in results)]
    fig, axes = plt.subplots(len(scenarios), len(methods), figsize=(3.4 * len(methods), 3.1 * len(scenarios)),
                             squeeze=False)
    for r, scenario in enumerate(scenarios):
        for c, method in enumerate(methods):
            ax, m = axes[r][c], torch.tensor(results[(scenario, method)])
            ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis")
            for (i, j), a in zip(torch.cartesian_prod(torch.arange(m.shape[0]), torch.arange(m.shape[1])).tolist(),
                                 m.flatten().tolist()):
                ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=7, color="w" if a < 0.6 else "k")
            ax.set_title(f"{scenario}: {method}", fontsize=9)
            ax.set_xlabel("evaluated on task")
            ax.set_ylabel("after training task")
            ax.set_xticks(range(m.shape[1]), [str(j + 1) for j in range(m.shape[1])])
            ax.set_yticks(range(m.shape[0]), [str(i + 1) for i in range(m.shape[0])])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class ContinualCLI(RunDirCLI):
    example = "continual"

    def add_arguments_to_parser(self, parser):
        parser.add_argument("--methods", type=list[str], default=list(METHODS), help=f"subset of {METHODS}")
        parser.add_argument("--scenarios", type=list[str], default=["permuted", "split"],
                            help="task sequences to run, each overriding data.scenario")
        parser.add_argument("--png", type=str, default="continual_accuracy.png", help="where to save the matrices (relative: in the run folder)")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def main(args: list[str] | None = None) -> dict[tuple[str, str], list[list[float]]]:
    cli = ContinualCLI(ContinualClassifier, ContinualDigits, run=False, args=args, save_config_callback=None,
                       trainer_defaults={"reload_dataloaders_every_n_epochs": 1, "logger": False,
                                         "enable_checkpointing": False, "num_sanity_val_steps": 0})
    base = copy.deepcopy(cli.config)
    results = {}
    for scenario in cli.config.scenarios:
        for method in cli.config.methods:
            cli.config = copy.deepcopy(base)
            cli.config.data.scenario, cli.config.model.method = scenario, method
            pl.seed_everything(cli.config.seed_everything or 0, verbose=False)
            cli.instantiate_classes()
            cli.trainer.fit_loop.max_epochs = cli.datamodule.num_tasks * cli.datamodule.epochs_per_task
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            evaluator = next(cb for cb in cli.trainer.callbacks if isinstance(cb, TaskEvaluator))
            results[(scenario, method)] = evaluator.matrix
    print("\nscenario  | method                 | final avg acc | avg forgetting")
    for (scenario, method), matrix in results.items():
        acc, forget = summary(matrix)
        print(f"{scenario:<9} | {method:<22} | {acc:13.3f} | {forget:14.3f}")
    if cli.config.png:
        path = in_run_dir(cli.run_dir, cli.config.png)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save_png(results, path)
        print(f"accuracy matrices saved to {path}")
    cli.announce()
    return results


if __name__ == "__main__":
    main()
