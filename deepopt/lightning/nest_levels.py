"""``NestLevels``: put Continuum Memory System levels into an existing LightningModule from a callback.

In ``setup`` (before ``configure_optimizers`` builds the optimizer, and before a checkpoint is
restored) the callback calls ``nl_layers.nest`` on the module (or on one of its submodules), which
replaces the feed-forward blocks by CMS blocks initialized from them and returns the level
specification ``{parameter name: period}``. A :class:`MultiTimescale` callback created with
``levels=None`` and a :class:`LevelMonitor` pick that specification up, so the user's module gains
slow and fast levels without a line of its code changing.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from deepopt.lightning import LevelMonitor, MultiTimescale, NestLevels
    >>> callbacks = [NestLevels(module="model", nest_kwargs={"levels": (8, 1)}),
    ...              MultiTimescale(), LevelMonitor()]
    >>> trainer = Trainer(callbacks=callbacks, max_steps=10, logger=False)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from ._periods import validate_levels

__all__ = ["NestLevels"]


def _submodule(root: nn.Module, path: str) -> nn.Module:
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        names = [n for n, _ in root.named_children()]
        raise ValueError(f"NestLevels(module={path!r}): the LightningModule has no such submodule; "
                         f"its children are {names}") from err


class NestLevels(Callback):
    """Nest an existing module (CMS levels in place of its FFN blocks) before the optimizer exists.

    Args:
        module: dotted path of the submodule to nest (``""`` = the LightningModule itself).
        nest_kwargs: keyword arguments of ``nl_layers.nest`` (e.g. the periods of the levels).
        nest_fn: the function that nests, ``fn(module, **nest_kwargs) -> {name: period}``
            (default ``nl_layers.nest``).

    Attributes:
        nested_levels: the level specification over the LightningModule's parameter names, set in
            ``setup`` (``None`` before).
    """

    def __init__(self, module: str = "", nest_kwargs: Mapping[str, Any] | None = None,
                 nest_fn: Callable[..., Mapping[str, int]] | None = None) -> None:
        if not isinstance(module, str):
            raise TypeError(f"module must be a dotted submodule path (str), got {type(module).__name__}")
        self.module = module
        self.nest_kwargs = dict(nest_kwargs or {})
        self.nest_fn = nest_fn
        self.nested_levels: dict[str, int] | None = None
        self._nested_ids: set[int] = set()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        target = _submodule(pl_module, self.module)
        if id(target) in self._nested_ids:
            return
        fn = self.nest_fn
        if fn is None:
            import nl_layers

            fn = nl_layers.nest
        spec = validate_levels(fn(target, **self.nest_kwargs), name="nest(...) result")
        prefix = f"{self.module}." if self.module else ""
        self.nested_levels = {prefix + name: period for name, period in spec.items()}
        self._nested_ids.add(id(target))

    def __repr__(self) -> str:
        return f"NestLevels(module={self.module!r}, nest_kwargs={self.nest_kwargs!r})"
