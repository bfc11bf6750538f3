"""Slow parameter groups from a level specification (``{name pattern: period}``).

The level specification is the contract shared by ``nl_layers.nest``/``CMS.level_spec``, the
optimizers and ``deepopt.lightning.MultiTimescale``: a dict mapping a parameter name of
``model.named_parameters()`` (or an fnmatch pattern over such names) to its update period C.

Example:
    >>> import torch, deepopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    >>> groups = deepopt.group_by_period(model, {"1.*": 4}, weight_decay=0.0)
    >>> [(g["period"], len(g["params"])) for g in groups]
    [(1, 2), (4, 2)]
    >>> opt = deepopt.AdamMemory(groups, lr=1e-3)
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Iterable, Mapping

from torch import Tensor, nn

__all__ = ["group_by_period", "match_periods"]


def match_periods(names: Iterable[str], spec: Mapping[str, int]) -> dict[str, int]:
    """Period of every name (1 where no pattern matches).

    Raises:
        ValueError: a pattern matches no name, a period is not an int >= 1, or a name matches
            patterns with different periods.
    """
    names = list(names)
    out = {n: 1 for n in names}
    matched_by: dict[str, str] = {}
    for pattern, period in spec.items():
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise ValueError(f"invalid period {period!r} for {pattern!r}; periods are ints >= 1")
        hits = [n for n in names if n == pattern or fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ValueError(f"level pattern {pattern!r} matches no parameter; names look like: {sample}")
        for n in hits:
            if n in matched_by and out[n] != period:
                raise ValueError(f"parameter {n!r} matches {matched_by[n]!r} (period {out[n]}) and {pattern!r} "
                                 f"(period {period}); make the patterns disjoint")
            out[n], matched_by[n] = period, pattern
    return out


def group_by_period(model: nn.Module | Iterable[tuple[str, Tensor]], spec: Mapping[str, int],
                    **group_kwargs: Any) -> list[dict[str, Any]]:
    """Param groups, one per period (ascending), each ``{"params": [...], "period": C, **group_kwargs}``."""
    named = list(model.named_parameters() if isinstance(model, nn.Module) else model)
    periods = match_periods([n for n, _ in named], spec)
    groups: dict[int, list[Tensor]] = {}
    for n, p in named:
        if p.requires_grad:
            groups.setdefault(periods[n], []).append(p)
    return [{"params": ps, "period": c, **group_kwargs} for c, ps in sorted(groups.items())]
