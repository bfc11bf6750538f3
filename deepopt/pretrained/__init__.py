"""Pretrained deep-momentum memories: find, read, validate and write memory files.

A pretrained memory is what :mod:`deepopt.meta` learns for :class:`deepopt.DeepMomentum`, kept in
a small JSON file: the hyperparameters (with the recommended learning rate), the memory MLP's
initial weights ``memory_init`` and a model card. The package ships some as
``deepopt/pretrained/<name>.json`` (:func:`available` lists them);
``deepopt.DeepMomentum.pretrained(params, name)`` and
``deepopt.functional.deep_momentum_pretrained(name)`` build the optimizer from one. Format 1::

    {"format": 1, "name": "default", "optimizer": "DeepMomentum",
     "hyperparameters": {"lr": float, "momentum": float, "inner_lr": float,
                         "sigma": "identity" | "sign" | "rms" | "ns", "hidden": int, "weight_decay": float,
                         optional: "precondition": bool | "factored", "beta2": float, "eps": float,
                         "normalize": bool},
     "memory_init": {"w1": [hidden floats], "b1": [hidden floats], "w2": [hidden floats]},
     "card": {"summary": str, "training_distribution": str, "meta_objective": str, "horizon": str,
              "compute": str, "command": str, "evaluation": str}}

The optional keys (:data:`OPTIONAL`, with their defaults) are written only where they differ from
a plain memory: ``precondition`` (``true`` or ``"factored"``, ``DeepMomentum(precondition=...)``) with
``beta2`` and ``eps``, and ``normalize: false``. Numbers are written exactly
(a float32 ``memory_init`` entry or a float hyperparameter comes back bit for bit); reading a file
parses JSON only, nothing in it is executed.

Example:
    >>> import os, tempfile, torch
    >>> from deepopt import pretrained
    >>> hp = {"lr": 0.02, "momentum": 0.9, "inner_lr": 0.1, "sigma": "identity",
    ...       "memory_init": {"w1": torch.ones(4), "b1": torch.zeros(4), "w2": torch.full((4,), 0.1)}}
    >>> card = dict.fromkeys(pretrained.CARD_KEYS, "n/a")
    >>> path = pretrained.save(os.path.join(tempfile.mkdtemp(), "mine.json"), hp, name="mine", card=card)
    >>> memory = pretrained.load(path)
    >>> memory.hyperparameters["hidden"], memory.kwargs(lr=0.01)["lr"]
    (4, 0.01)
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..levels.deep.level import SIGMAS
from ..optim.registry import OPTIMIZERS

__all__ = ["CARD_KEYS", "FORMAT", "HYPERPARAMETERS", "OPTIONAL", "PretrainedMemory", "available", "load", "memory_of",
           "save"]

#: the file format this version reads and writes
FORMAT = 1
#: the optimizer every memory of format 1 is for
OPTIMIZER = "DeepMomentum"
#: the keys of ``"hyperparameters"`` (``memory_init`` has its own entry)
HYPERPARAMETERS = ("lr", "momentum", "inner_lr", "sigma", "hidden", "weight_decay")
#: optional keys of ``"hyperparameters"`` and their values when absent (the preconditioned memory's)
OPTIONAL = {"precondition": False, "beta2": 0.999, "eps": 1e-8, "normalize": True}
#: the model card's keys (free text each; a card may hold more)
CARD_KEYS = ("summary", "training_distribution", "meta_objective", "horizon", "compute", "command", "evaluation")
_TOP_KEYS = ("format", "name", "optimizer", "hyperparameters", "memory_init", "card")
_MLP_KEYS = ("w1", "b1", "w2")
_FLOATS = ("lr", "momentum", "inner_lr", "weight_decay")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_HOW = "write memory files with deepopt.pretrained.save (the format is in deepopt.pretrained's docstring)"


def _shipped() -> Any:
    """The folder of the shipped memory files (a ``Traversable``)."""
    return resources.files(__name__)


def available() -> list[str]:
    """The names of the shipped memories, sorted (each ``deepopt/pretrained/<name>.json``)."""
    return sorted(f.name[:-len(".json")] for f in _shipped().iterdir() if f.is_file() and f.name.endswith(".json"))


_SPEC = re.compile(r"DeepMomentum\.pretrained(?:\((.*)\))?")


def memory_of(spec: str) -> str | None:
    """The memory an optimizer name asks for: ``"DeepMomentum.pretrained"`` the ``default`` one,
    ``"DeepMomentum.pretrained(NAME)"`` the shipped ``NAME``; ``None`` for any other name (another
    optimizer). An unknown ``NAME`` is a ``ValueError`` listing the shipped ones.

    Example:
        >>> memory_of("DeepMomentum.pretrained"), memory_of("DeepMomentum.pretrained(elementwise)"), memory_of("AdamW")
        ('default', 'elementwise', None)
    """
    match = _SPEC.fullmatch(spec)
    if match is None:
        return None
    name = match.group(1) or "default"
    if name not in available():
        raise ValueError(f"unknown pretrained memory {name!r} in {spec!r}; the shipped ones are {available()}: "
                         f"use 'DeepMomentum.pretrained' (default) or 'DeepMomentum.pretrained(NAME)'")
    return name


@dataclass(frozen=True, eq=False, repr=False)
class PretrainedMemory:
    """One memory file, read and validated.

    ``hyperparameters`` holds ``lr`` (the recommended learning rate), ``momentum``, ``inner_lr``,
    ``sigma``, ``hidden``, ``weight_decay``, ``precondition``, ``beta2``, ``eps``, ``normalize`` and ``memory_init``
    (float32 tensors of shape ``(hidden,)``); ``card`` the model card (what it was trained on, how,
    how it was evaluated).
    """

    name: str
    optimizer: str
    hyperparameters: dict[str, Any]
    card: dict[str, str]

    def kwargs(self, **overrides: Any) -> dict[str, Any]:
        """The optimizer's constructor keyword arguments, ``overrides`` winning (fresh tensors).

        ``overrides`` are the constructor's own (``lr``, ``weight_decay``, ``impl``...); a
        ``hidden`` other than the memory's needs a ``memory_init`` of that width too.
        """
        cls = OPTIMIZERS[self.optimizer]
        names = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params")]
        for key in overrides:
            if key not in names:
                raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {key!r} (it takes {names})")
        hidden = self.hyperparameters["hidden"]
        if "hidden" in overrides and overrides["hidden"] != hidden and "memory_init" not in overrides:
            raise ValueError(f"hidden={overrides['hidden']!r} does not fit the pretrained memory {self.name!r}: its "
                             f"memory_init (the learned initial MLP weights) has width {hidden}; pass a memory_init "
                             f"of the new width too, or keep hidden={hidden}")
        out = {k: v for k, v in self.hyperparameters.items() if k != "memory_init"}
        out["memory_init"] = {k: v.clone() for k, v in self.hyperparameters["memory_init"].items()}
        out.update(overrides)
        return out

    def __repr__(self) -> str:
        shown = HYPERPARAMETERS + tuple(k for k in OPTIONAL if self.hyperparameters["precondition"] or (
            k == "normalize" and not self.hyperparameters["normalize"]))
        hp = ", ".join(f"{k}={self.hyperparameters[k]!r}" for k in shown)
        return f"PretrainedMemory(name={self.name!r}, optimizer={self.optimizer!r}, {hp})"


def load(name_or_path: str | os.PathLike = "default") -> PretrainedMemory:
    """A memory by shipped name (see :func:`available`) or by path to a ``.json`` file.

    A string ending in ``.json`` or holding a path separator, or any ``os.PathLike``, is a path.
    Raises ``ValueError`` (naming the file, the problem and the fix) for an unknown name or a file
    that is not a valid memory, ``FileNotFoundError`` for a path that does not exist.
    """
    if isinstance(name_or_path, os.PathLike) or (
            isinstance(name_or_path, str) and (name_or_path.endswith(".json") or "/" in name_or_path
                                               or os.sep in name_or_path)):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"no memory file {str(path)!r}; pass an existing .json file or a shipped "
                                    f"name ({available()})")
        text, source, stem = path.read_text(encoding="utf-8"), str(path), None
    elif isinstance(name_or_path, str):
        names = available()
        if name_or_path not in names:
            raise ValueError(f"unknown pretrained memory {name_or_path!r}; the shipped ones are {names}, or pass "
                             f"the path of a .json memory file (deepopt.pretrained.save writes one)")
        text = (_shipped() / f"{name_or_path}.json").read_text(encoding="utf-8")
        source, stem = f"deepopt/pretrained/{name_or_path}.json", name_or_path
    else:
        raise TypeError(f"name_or_path must be a name or a path, got {type(name_or_path).__name__}")
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{source} is not valid JSON ({err}); {_HOW}") from None
    memory = _validate(doc, source)
    if stem is not None and memory.name != stem:
        raise ValueError(f"{source} says its name is {memory.name!r}; a shipped file is named after its memory: "
                         f"rename the file to {memory.name}.json or set its name to {stem!r}")
    return memory


def _number(value: Any, where: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{source}: {where} must be a number, got {value!r}; {_HOW}")
    if not math.isfinite(value):
        raise ValueError(f"{source}: {where} is not finite ({value!r}); a memory holds finite numbers only: "
                         f"re-learn or re-save it from finite values")
    return float(value)


def _keys(obj: Any, required: tuple[str, ...], where: str, source: str, extra: bool = False,
          optional: tuple[str, ...] = ()) -> None:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: {where} must be a JSON object, got {type(obj).__name__}; {_HOW}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ValueError(f"{source}: {where} is missing the keys {missing}; {_HOW}")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown and not extra:
        also = f" and optionally {list(optional)}" if optional else ""
        raise ValueError(f"{source}: {where} has unknown keys {unknown} (it takes {list(required)}{also}); {_HOW}")


def _validate(doc: Any, source: str) -> PretrainedMemory:
    """The memory of a parsed document, or a ``ValueError`` naming what is wrong and the fix."""
    if not isinstance(doc, Mapping):
        raise ValueError(f"{source}: a memory file holds a JSON object, got {type(doc).__name__}; {_HOW}")
    if "format" in doc and (isinstance(doc["format"], bool) or doc["format"] != FORMAT):
        raise ValueError(f"{source}: format {doc['format']!r} is not readable here: this deepopt reads format "
                         f"{FORMAT}; use the deepopt release that wrote it, or re-save it in format {FORMAT}")
    if "optimizer" in doc and doc["optimizer"] != OPTIMIZER:
        raise ValueError(f"{source}: optimizer {doc['optimizer']!r}: pretrained memories are {OPTIMIZER} memories "
                         f"(format {FORMAT}); save one from a {OPTIMIZER} MetaLearner")
    _keys(doc, _TOP_KEYS, "the file", source)
    if not isinstance(doc["name"], str) or not _NAME.fullmatch(doc["name"]):
        raise ValueError(f"{source}: name {doc['name']!r} must be letters, digits, '_' or '-'; {_HOW}")
    hp_doc, init_doc, card_doc = doc["hyperparameters"], doc["memory_init"], doc["card"]
    _keys(hp_doc, HYPERPARAMETERS, "'hyperparameters'", source, optional=tuple(OPTIONAL))
    hp: dict[str, Any] = {k: _number(hp_doc[k], f"hyperparameters.{k}", source) for k in _FLOATS}
    precondition = hp_doc.get("precondition", OPTIONAL["precondition"])
    if not (isinstance(precondition, bool) or precondition == "factored"):
        raise ValueError(f"{source}: hyperparameters.precondition must be true, false or \"factored\", got "
                         f"{precondition!r}; {_HOW}")
    hp["precondition"] = precondition
    normalize = hp_doc.get("normalize", OPTIONAL["normalize"])
    if not isinstance(normalize, bool):
        raise ValueError(f"{source}: hyperparameters.normalize must be true or false, got {normalize!r}; {_HOW}")
    hp["normalize"] = normalize
    for k in ("beta2", "eps"):
        hp[k] = _number(hp_doc[k], f"hyperparameters.{k}", source) if k in hp_doc else OPTIONAL[k]
    hidden = hp_doc["hidden"]
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"{source}: hyperparameters.hidden must be an int >= 1 (the memory MLP's width), got "
                         f"{hidden!r}; {_HOW}")
    if hp_doc["sigma"] not in SIGMAS:
        raise ValueError(f"{source}: hyperparameters.sigma {hp_doc['sigma']!r} must be one of {SIGMAS}; {_HOW}")
    hp.update(sigma=hp_doc["sigma"], hidden=hidden)
    _keys(init_doc, _MLP_KEYS, "'memory_init'", source)
    init = {}
    for k in _MLP_KEYS:
        values = init_doc[k]
        if not isinstance(values, list) or len(values) != hidden:
            n = len(values) if isinstance(values, list) else type(values).__name__
            raise ValueError(f"{source}: memory_init.{k} must be a list of hidden={hidden} numbers, got {n}; the "
                             f"three memory_init lists and hyperparameters.hidden must agree")
        init[k] = torch.tensor([_number(v, f"memory_init.{k}[{i}]", source) for i, v in enumerate(values)],
                               dtype=torch.float32)
    hp["memory_init"] = init
    _keys(card_doc, CARD_KEYS, "'card'", source, extra=True)
    bad = [k for k, v in card_doc.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{source}: the card's entries are text; {bad} are not strings")
    try:  # the constructor's own checks (ranges, sigma, memory_init), on a stand-in parameter
        OPTIMIZERS[OPTIMIZER]([torch.nn.Parameter(torch.zeros(1))], **hp)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {OPTIMIZER} refuses these hyperparameters: {err}") from None
    return PretrainedMemory(doc["name"], OPTIMIZER, hp, dict(card_doc))


def _plain_float(value: Any, key: str) -> Any:
    """A float from a float, an int or a one-element tensor; anything else as is (for the checks)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"hyperparameter {key} must be one number, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().item()
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def save(path: str | os.PathLike, hyperparameters: Mapping[str, Any], *, name: str,
         card: Mapping[str, str]) -> Path:
    """Write a memory file from ``hyperparameters`` (as :meth:`deepopt.meta.MetaLearner.learned`
    returns them: floats or one-element tensors, ``memory_init`` a dict of tensors); the path.

    ``memory_init`` is required and stored in float32; ``hidden`` defaults to its length,
    ``weight_decay`` to 0, and ``lr``, ``momentum``, ``inner_lr``, ``sigma`` to DeepMomentum's
    defaults (what a ``MetaLearner`` not given them ran with). ``card`` holds :data:`CARD_KEYS`.
    The file is checked as :func:`load` checks it before it is written.
    """
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"a memory file ends in .json, got {str(path)!r}")
    unknown = sorted(set(hyperparameters) - set(HYPERPARAMETERS) - set(OPTIONAL) - {"memory_init"})
    if unknown:
        raise ValueError(f"a memory file holds {list(HYPERPARAMETERS) + list(OPTIONAL) + ['memory_init']}; "
                         f"drop {unknown}")
    if "memory_init" not in hyperparameters:
        raise ValueError("hyperparameters has no memory_init (the learned initial MLP weights): a memory file "
                         "ships them; learn them with deepopt.meta.MetaLearner('DeepMomentum')")
    init_in = hyperparameters["memory_init"]
    if not isinstance(init_in, Mapping) or any(k not in init_in for k in _MLP_KEYS):
        raise ValueError(f"memory_init must be a dict with {_MLP_KEYS}")
    init = {k: torch.as_tensor(init_in[k]).detach().to("cpu", torch.float32) for k in _MLP_KEYS}
    bad = [k for k, v in init.items() if v.ndim != 1]
    if bad:
        raise ValueError(f"memory_init entries must be 1-d of shape (hidden,); {bad} are not")
    defaults = inspect.signature(OPTIMIZERS[OPTIMIZER].__init__).parameters
    hp: dict[str, Any] = {k: defaults[k].default for k in ("lr", "momentum", "inner_lr", "sigma")}
    hp.update(hidden=len(init["w1"]), weight_decay=0.0)
    for k, v in hyperparameters.items():
        if k in _FLOATS:
            hp[k] = _plain_float(v, k)
        elif k in ("hidden", "sigma"):
            hp[k] = v.item() if isinstance(v, Tensor) and v.numel() == 1 else v
    if hyperparameters.get("precondition", False):  # written only where it matters: plain files stay as they were
        hp["precondition"] = hyperparameters["precondition"]
        hp.update({k: _plain_float(hyperparameters.get(k, OPTIONAL[k]), k) for k in ("beta2", "eps")})
    if hyperparameters.get("normalize", True) is not True:
        hp["normalize"] = hyperparameters["normalize"]
    doc = {"format": FORMAT, "name": name, "optimizer": OPTIMIZER, "hyperparameters": hp,
           "memory_init": {k: v.tolist() for k, v in init.items()}, "card": dict(card) if isinstance(card, Mapping) else card}
    _validate(doc, str(path))
    # each memory_init list on one line, the rest indented
    marks = {k: f"@memory_init.{k}@" for k in _MLP_KEYS}
    text = json.dumps({**doc, "memory_init": marks}, indent=2, allow_nan=False)
    for k, mark in marks.items():
        text = text.replace(json.dumps(mark), json.dumps(doc["memory_init"][k], allow_nan=False), 1)
    path.write_text(text + "\n", encoding="utf-8")
    return path
