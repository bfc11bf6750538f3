r"""Levels as parameter groups: an update period and a learning rate per level, and the optimizer
that steps them (any torch optimizer, or deepopt's, whose own levels then come along).

A level specification maps parameter names (or fnmatch patterns over them) to a period ``C`` and a
learning-rate scale ``s``. A parameter of level ``(C, s)`` accumulates its gradients over ``C``
steps and is stepped at every ``C``-th with their mean and learning rate ``s * lr`` (the CMS rule,
:math:`\theta \leftarrow \theta - s\,\eta\,u(\tfrac1C\sum_{\text{chunk}} g)`). Where they exist,
the existing mechanisms are reused, not rewritten:

* deepopt optimizers take the period as a param-group key (``"period"``); for torch optimizers
  :class:`deepopt.lightning.PeriodicGradients` holds the slow gradients;
* ``nl_layers.CMS`` blocks in the model bring their own periods (:func:`cms_levels`, from
  ``CMS.level_spec``); a CMS in in-context mode steps its fast weights inside its forward pass,
  so the optimizer only sees the outer (training-mode) periods;
* ``optimizer="M3"`` gives every level M3's slow momentum (its ``frequency``/``momenta``);
  ``optimizer="DGD"`` gives linear layers DGD's input-directed forgetting (it gets the model).

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> groups = level_groups(model, lr=1e-2, periods={"0.*": 4}, lr_scales={"0.*": 0.5})
    >>> [(g["period"], g["lr"], len(g["params"])) for g in groups]
    [(1, 0.01, 2), (4, 0.005, 2)]
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..periods import match_periods

__all__ = ["TORCH_OPTIMIZERS", "cms_levels", "level_groups", "build_optimizer"]

TORCH_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def cms_levels(model: nn.Module) -> dict[str, int]:
    """The periods of every ``nl_layers.CMS`` inside ``model`` (``{}`` when there is none).

    Example:
        >>> from nl_layers import CMS
        >>> model = torch.nn.Sequential(CMS(dim=4, hidden=8, periods=(1, 4)))
        >>> sorted(set(cms_levels(model).values()))
        [1, 4]
    """
    try:
        from nl_layers.cms import CMS
    except ImportError:
        return {}
    spec: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, CMS):
            spec.update(module.level_spec(prefix=f"{name}." if name else ""))
    return spec


def _scales(names: list[str], lr_scales: Mapping[str, float]) -> dict[str, float]:
    from fnmatch import fnmatchcase

    out = {n: 1.0 for n in names}
    for pattern, scale in lr_scales.items():
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
            raise ValueError(f"lr_scales[{pattern!r}] = {scale!r}: a learning-rate scale is a number >= 0")
        hits = [n for n in names if n == pattern or fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"lr_scales pattern {pattern!r} matches no parameter; names look like: "
                             + ", ".join(names[:6]))
        for n in hits:
            out[n] = float(scale)
    return out


def level_groups(model: nn.Module, lr: float, periods: Mapping[str, int] | None = None,
                 lr_scales: Mapping[str, float] | None = None, **group_kwargs: Any) -> list[dict[str, Any]]:
    """Param groups, one per (period, lr scale): ``{"params", "period", "lr", **group_kwargs}``.

    Periods come from ``periods`` and the model's CMS blocks (``periods`` wins where both name a
    parameter); unmatched parameters have period 1 and scale 1.
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameter that requires grad; nothing to optimize")
    names = [n for n, _ in named]
    spec = {**cms_levels(model), **dict(periods or {})}
    period_of = match_periods(names, spec)
    scale_of = _scales(names, lr_scales or {})
    groups: dict[tuple[int, float], list] = {}
    for n, p in named:
        groups.setdefault((period_of[n], scale_of[n]), []).append(p)
    return [{"params": ps, "period": c, "lr": lr * s, **group_kwargs} for (c, s), ps in sorted(groups.items())]


def build_optimizer(model: nn.Module, lr: float, optimizer: str = "adamw", periods: Mapping[str, int] | None = None,
                    lr_scales: Mapping[str, float] | None = None, **kwargs: Any):
    """``(optimizer, periodic)``: the optimizer over :func:`level_groups`, and the
    :class:`~deepopt.lightning.PeriodicGradients` to call before each step (None when not needed:
    no slow level, or a deepopt optimizer, which honours ``"period"`` itself).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt, periodic = build_optimizer(model, lr=1e-3, optimizer="M3")
        >>> type(opt).__name__, periodic
        ('M3', None)
    """
    import deepopt
    from ..lightning._periods import PeriodicGradients

    groups = level_groups(model, lr, periods, lr_scales)
    if optimizer in deepopt.OPTIMIZERS:
        cls = deepopt.OPTIMIZERS[optimizer]
        if getattr(cls, "requires_model", False):
            kwargs.setdefault("model", model)
        return cls(groups, lr=lr, **kwargs), None
    if optimizer not in TORCH_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(TORCH_OPTIMIZERS)} or a deepopt optimizer "
                         f"{sorted(deepopt.OPTIMIZERS)}, got {optimizer!r}")
    slow = {}
    name_of = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        period = g.pop("period")
        if period > 1:
            slow.update({name_of[id(p)]: period for p in g["params"]})
    opt = TORCH_OPTIMIZERS[optimizer](groups, lr=lr, **kwargs)
    periodic = None
    if slow:
        periodic = PeriodicGradients([(n, p) for n, p in model.named_parameters() if n in slow], slow)
    return opt, periodic
