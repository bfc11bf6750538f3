"""``ContinualRecipe``: :class:`deepopt.continual.Recipe`'s slow level as a Lightning callback.

The LightningModule keeps its own optimizer (``configure_optimizers``; for the recipe's optimizer
with per-level learning rates return ``deepopt.continual.build_optimizer(self, lr)[0]``, and give
slow parameter periods with :class:`MultiTimescale`). The callback adds the slow level:

* ``on_before_optimizer_step``: record the task gradient (importance), add the distillation
  gradient from the slow level (the training forward's input is captured by a hook on ``module``)
  and, with ``coupling="gradient"``, the pull's gradient;
* ``on_train_batch_end`` after a step: the importance-damped step (``damping``), the importance
  update, the decoupled pull (if chosen), the clock;
* at a task boundary: every ``epochs_per_task`` epochs, or whenever ``callback.end_task()`` is
  called (e.g. from the DataModule when it switches tasks).

Checkpoints hold the slow copy, its importance and the clock (``state_dict``), so
``Trainer.fit(ckpt_path=...)`` resumes with them.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from deepopt.lightning import ContinualRecipe
    >>> trainer = Trainer(callbacks=[ContinualRecipe(lr=1e-2, epochs_per_task=2)], max_epochs=4,
    ...                   logger=False, enable_checkpointing=False)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ..continual.recipe import DEFAULTS, ContinualEngine

__all__ = ["ContinualRecipe"]


class ContinualRecipe(Callback):
    """The recipe's slow level for any LightningModule (see the module docstring).

    Args:
        lr: the learning rate of the pull (default: the first param group's ``lr`` at fit start).
        epochs_per_task: end a task every this many epochs (None: only ``end_task()`` calls).
        module: dotted path of the submodule to consolidate (``""`` = the LightningModule).
        strength, rate, decay, importance, importance_beta, coupling, distill, temperature, clock,
            output, damping, share, share_damping: as for :class:`deepopt.continual.Recipe`.
    """

    def __init__(self, lr: float | None = None, epochs_per_task: int | None = None, module: str = "", *,
                 strength: float = DEFAULTS["strength"], rate: float = DEFAULTS["rate"],
                 decay: float = DEFAULTS["decay"], importance: str = DEFAULTS["importance"],
                 importance_beta: float = DEFAULTS["importance_beta"], coupling: str = DEFAULTS["coupling"],
                 distill: float = DEFAULTS["distill"], temperature: float = DEFAULTS["temperature"],
                 clock: str | int | None = "task", output: Callable[[Any], torch.Tensor] | None = None,
                 damping: float = DEFAULTS["damping"], share: float = DEFAULTS["share"], share_damping: bool = False) -> None:
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be > 0 or None (take the optimizer's), got {lr!r}")
        if epochs_per_task is not None and (isinstance(epochs_per_task, bool) or not isinstance(epochs_per_task, int)
                                            or epochs_per_task < 1):
            raise ValueError(f"epochs_per_task must be an int >= 1 or None (call end_task()), got {epochs_per_task!r}")
        if not isinstance(module, str):
            raise TypeError(f"module must be a dotted submodule path (str), got {type(module).__name__}")
        self.lr, self.epochs_per_task, self.module = lr, epochs_per_task, module
        self.knobs = dict(strength=strength, rate=rate, decay=decay, importance=importance,
                          importance_beta=importance_beta, coupling=coupling, distill=distill,
                          temperature=temperature, clock=clock, output=output, damping=damping, share=share,
                          share_damping=bool(share_damping))
        self.engine: ContinualEngine | None = None
        self._stepped = False
        self._pending: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        target = pl_module.get_submodule(self.module) if self.module else pl_module
        lr = self.lr
        if lr is None:
            if not trainer.optimizers:
                raise ValueError("ContinualRecipe(lr=None) takes the optimizer's lr, but the Trainer has no optimizer; "
                                 "pass lr=")
            lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.engine = ContinualEngine(target, lr, **self.knobs)
        if self._pending is not None:
            self.engine.load_state_dict(self._pending)
            self._pending = None

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._check()
        self.engine.before_step()
        self._stepped = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._stepped:
            return  # gradient accumulation: no optimizer step on this batch
        self._stepped = False
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.engine.after_step(loss.detach() if isinstance(loss, torch.Tensor) else None)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.epochs_per_task and (trainer.current_epoch + 1) % self.epochs_per_task == 0:
            self.end_task()

    def end_task(self) -> None:
        """A task ended: write the slow level now."""
        self._check()
        self.engine.end_task()

    @property
    def consolidations(self) -> int:
        return 0 if self.engine is None else self.engine.consolidations

    def _check(self) -> None:
        if self.engine is None:
            raise RuntimeError("ContinualRecipe is bound to the model in on_fit_start; call end_task() during fit")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.engine is not None:
            self.engine.remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            return dict(self._pending or {})
        return self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.engine is None:
            self._pending = dict(state_dict)
        else:
            self.engine.load_state_dict(state_dict)
