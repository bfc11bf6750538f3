"""The optimizer registry: torch baselines, deepopt's optimizers (read lazily) and optional extras.

Every entry is an :class:`OptimizerSpec` with a *family* ("sgd", "adam" or "muon"): the family
picks which of a task's learning-rate centres the sweep multiplies, so every optimizer gets the
same number of trials around a sensible scale. No weight decay anywhere (the synthetic tasks
have exact minima that decay would move).

Baselines: ``AdamW`` (torch, fused where the device supports it),
``SGD`` (momentum 0.9), ``Muon`` (torch.optim.Muon on 2-D weights, AdamW at the task's Adam rate
on everything else: vectors, convolutions, embeddings and heads). Optional columns when the
packages are installed: heavyball's AdamW and schedulefree's AdamWScheduleFree.
deepopt's optimizers come from ``deepopt.OPTIMIZERS`` at call time, so the suite includes
whatever the registry holds when it runs. A deepopt name may carry constructor knobs as a call,
``"M3(frequency=25, alpha=0.25)"`` (literal values only): the same optimizer with those arguments,
reported under that name.

Example:
    >>> from benchmarks.optimizers import available_optimizers
    >>> specs = available_optimizers()
    >>> {"AdamW", "SGD", "Muon"} <= set(specs)
    True
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

NamedParams = list[tuple[str, nn.Parameter]]

# deepopt names -> family (the scale of their learning rate); unknown names default to "adam".
DEEPOPT_FAMILIES = {
    "MomentumMemory": "sgd", "DeltaMomentum": "sgd", "DeepMomentum": "sgd", "DGD": "sgd",
    "AdamMemory": "adam", "PreconditionedMomentum": "adam", "M3": "adam",  # M3's stable form: AdamW's rate
    "MuonMemory": "muon",
}
# deepopt optimizers that orthogonalize matrices: embeddings and heads go to their element-wise
# fallback (param-group key ``orthogonalize=False``), as the Muon baseline hands them to AdamW.
ORTHOGONALIZING = ("MuonMemory", "M3")
BASELINES = ("AdamW", "SGD", "Muon")


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer. ``build(model, named_params, lrs, muon_exclude)`` -> optimizer,
    where ``lrs`` maps each family to this trial's rate; the spec uses ``lrs[family]`` (Muon also
    uses ``lrs["adam"]`` for its AdamW half). ``model`` is there for optimizers that need the layers
    themselves (deepopt's DGD reads the layer inputs through forward hooks)."""

    name: str
    family: str
    source: str
    build: Callable[[nn.Module, NamedParams, dict[str, float], tuple[str, ...]], torch.optim.Optimizer]


class Combined:
    """Several optimizers stepped as one (Muon for matrices + AdamW for the rest).

    ``param_groups`` and ``state`` are the union of the parts', so code that reads them (EWC,
    the speed suite's state-byte count) works unchanged.
    """

    def __init__(self, parts: Iterable[torch.optim.Optimizer]):
        self.parts = [p for p in parts if p is not None]
        if not self.parts:
            raise ValueError("Combined needs at least one optimizer")
        self.param_groups = [g for part in self.parts for g in part.param_groups]

    @property
    def state(self) -> dict:
        merged = {}
        for part in self.parts:
            merged.update(part.state)
        return merged

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict):
        for part, sd in zip(self.parts, state_dict["parts"]):
            part.load_state_dict(sd)


def _fused_ok(params: NamedParams) -> bool:
    return bool(params) and all(p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                for _, p in params)


def _adamw(params: NamedParams, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=0.0,
                             fused=True if _fused_ok(params) else None)


def _sgd(params: NamedParams, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for _, p in params], lr=lr, momentum=0.9,
                           fused=True if _fused_ok(params) else None)


def muon_split(params: NamedParams, exclude: tuple[str, ...]) -> tuple[NamedParams, NamedParams]:
    """(matrices for Muon, the rest for AdamW): 2-D weights whose name contains none of ``exclude``."""
    muon, rest = [], []
    for name, p in params:
        (muon if p.ndim == 2 and not any(e in name for e in exclude) else rest).append((name, p))
    return muon, rest


def _muon(model: nn.Module, params: NamedParams, lrs: dict[str, float], exclude: tuple[str, ...]) -> torch.optim.Optimizer:
    matrices, rest = muon_split(params, exclude)
    muon = torch.optim.Muon([p for _, p in matrices], lr=lrs["muon"], weight_decay=0.0) if matrices else None
    adamw = _adamw(rest, lrs["adam"]) if rest else None
    return Combined([muon, adamw])


def baseline_specs() -> dict[str, OptimizerSpec]:
    return {
        "AdamW": OptimizerSpec("AdamW", "adam", "torch", lambda model, ps, lrs, ex: _adamw(ps, lrs["adam"])),
        "SGD": OptimizerSpec("SGD", "sgd", "torch", lambda model, ps, lrs, ex: _sgd(ps, lrs["sgd"])),
        "Muon": OptimizerSpec("Muon", "muon", "torch", _muon),
    }


def deepopt_registry() -> dict[str, type]:
    """``deepopt.OPTIMIZERS`` as it is now (empty if deepopt has none yet)."""
    try:
        deepopt = importlib.import_module("deepopt")
    except ImportError:
        return {}
    return dict(getattr(deepopt, "OPTIMIZERS", {}) or {})


def deepopt_kwargs(name: str, lrs: dict[str, float]) -> dict:
    """Extra constructor arguments that mirror the baselines: MuonMemory's element-wise fallback
    runs at the task's Adam rate (``fallback_lr_ratio``), as the Muon baseline's AdamW half does."""
    if name == "MuonMemory":
        return {"fallback_lr_ratio": lrs["adam"] / lrs["muon"]}
    return {}


def _deepopt_spec(name: str, cls: type, knobs: dict | None = None, label: str | None = None) -> OptimizerSpec:
    family = DEEPOPT_FAMILIES.get(name, "adam")
    knobs = dict(knobs or {})

    def build(model: nn.Module, params, lrs: dict[str, float], exclude: tuple[str, ...]) -> torch.optim.Optimizer:
        groups: list = [p for _, p in params]
        if name in ORTHOGONALIZING:
            kept, excluded = [], []
            for n, p in params:
                (excluded if p.ndim >= 2 and any(e in n for e in exclude) else kept).append(p)
            groups = [{"params": kept}] + ([{"params": excluded, "orthogonalize": False}] if excluded else [])
            groups = [g for g in groups if g["params"]]
        return make_deepopt(cls, groups, model, lrs[family], **deepopt_kwargs(name, lrs), **knobs)

    return OptimizerSpec(label or name, family, "deepopt", build)


def parse_name(name: str) -> tuple[str, dict]:
    """``"M3(frequency=25, alpha=0.25)"`` -> ``("M3", {"frequency": 25, "alpha": 0.25})``; a plain
    name -> ``(name, {})``. Keyword arguments with literal values only.

    Example:
        >>> parse_name("M3(betas=(0.9, 0.999, 0.9))")
        ('M3', {'betas': (0.9, 0.999, 0.9)})
    """
    if "(" not in name:
        return name, {}
    import ast

    try:
        call = ast.parse(name.strip(), mode="eval").body
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
            raise ValueError
        return call.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as err:
        raise ValueError(f"optimizer name {name!r}: use NAME or NAME(knob=value, ...) with literal values, "
                         "e.g. 'M3(frequency=25, alpha=0.25)'") from err


def _with_knobs(name: str, specs: dict[str, OptimizerSpec]) -> OptimizerSpec | None:
    """The spec of a knob name (``M3(frequency=25)``), or None when its base is unknown."""
    base, knobs = parse_name(name)
    cls = deepopt_registry().get(base)
    if cls is None:
        if base in specs:
            raise ValueError(f"optimizer {name!r}: knobs are for deepopt's optimizers, {base!r} takes none here")
        return None
    unknown = [k for k in knobs if k not in inspect.signature(cls).parameters or k in ("params", "lr")]
    if unknown:
        raise ValueError(f"optimizer {name!r}: {base} has no knob {unknown[0]!r} (its arguments: "
                         f"{[k for k in inspect.signature(cls).parameters if k not in ('self', 'params', 'lr')]})")
    return _deepopt_spec(base, cls, knobs, label=name)


def make_deepopt(cls: type, params, model: nn.Module | None, lr: float, **kwargs) -> torch.optim.Optimizer:
    """``cls(params, lr=lr, weight_decay=0, **kwargs)``, plus ``model=model`` for optimizers that
    declare ``requires_model`` (DGD reads layer inputs)."""
    if "weight_decay" in inspect.signature(cls).parameters:
        kwargs.setdefault("weight_decay", 0.0)
    if getattr(cls, "requires_model", False):
        kwargs["model"] = model
    return cls(params, lr=lr, **kwargs)


def extra_specs() -> dict[str, OptimizerSpec]:
    """heavyball / schedulefree columns, only when those packages are installed."""
    specs: dict[str, OptimizerSpec] = {}
    try:
        heavyball = importlib.import_module("heavyball")
        cls = getattr(heavyball, "ForeachAdamW", None) or getattr(heavyball, "AdamW", None)
        if cls is not None:
            specs["heavyball.AdamW"] = OptimizerSpec(
                "heavyball.AdamW", "adam", "heavyball", lambda model, ps, lrs, ex: cls([p for _, p in ps], lr=lrs["adam"]))
    except ImportError:
        pass
    try:
        sf = importlib.import_module("schedulefree")
        specs["schedulefree.AdamW"] = OptimizerSpec(
            "schedulefree.AdamW", "adam", "schedulefree", lambda model, ps, lrs, ex: _train_mode(
                sf.AdamWScheduleFree([p for _, p in ps], lr=lrs["adam"], warmup_steps=0)))
    except ImportError:
        pass
    return specs


def _train_mode(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    opt.train()  # schedule-free optimizers must be put in train mode before stepping
    return opt


def available_optimizers() -> dict[str, OptimizerSpec]:
    """Baselines, then deepopt's (sorted), then the optional extras, by name."""
    specs = baseline_specs()
    for name, cls in sorted(deepopt_registry().items()):
        specs[name] = _deepopt_spec(name, cls)
    specs.update(extra_specs())
    return specs


def select_optimizers(names: Iterable[str] | None) -> dict[str, OptimizerSpec]:
    """The named optimizers (all available ones if ``names`` is None); ValueError on unknown names."""
    specs = available_optimizers()
    if names is None:
        return specs
    names = list(names)
    for n in names:
        if n not in specs and "(" in n:
            spec = _with_knobs(n, specs)
            if spec is not None:
                specs[n] = spec
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"unknown optimizers {unknown}; available now: {sorted(specs)}")
    return {n: specs[n] for n in names}


def build_optimizer(spec: OptimizerSpec, model: nn.Module, lrs: dict[str, float],
                    muon_exclude: tuple[str, ...] = ("embed", "head")) -> torch.optim.Optimizer:
    """``spec`` built over ``model.named_parameters()`` (trainable ones only)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return spec.build(model, params, lrs, muon_exclude)
