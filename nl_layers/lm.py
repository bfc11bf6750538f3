"""Small language models for examples and benchmarks: HopeLM, TitansLM and a Transformer++ baseline.

Both share one constructor shape ``(vocab_size, dim, depth, heads=...)``, one call signature

    logits = model(tokens)                                   # (B, T) -> (B, T, vocab)
    logits, state = model(tokens, state, return_state=True)   # streaming

and ``generate(prompt, max_new_tokens, temperature=1.0, top_k=None)``, which feeds the prompt
once and then one token at a time through the streaming state (KV cache for attention, fast
weights for the memories).

``torch.compile(model, fullgraph=True)`` traces a forward as one graph with no host
synchronisation. In eager mode the token-range check reads the tokens (one synchronisation per
forward on a GPU, plus one per layer for the NaN/Inf input checks); ``nl_layers.set_value_checks(False)``
turns these checks off for speed (an out-of-range id then fails in the embedding lookup).
``model.compile_blocks()`` compiles each block in place instead (regional compilation): the
blocks share one code path, so dynamo and inductor compile it once for all of them, a fraction
of the whole model's compile time, while the embedding, head and loss stay eager.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_choice, check_positive_int, check_tokens, run_inner
from ._modules import SwiGLU
from .hope import HopeAttentionBlock, HopeBlock
from .memory.attention import AttentionMemory
from .memory.neural import NeuralMemory


def swiglu_hidden(dim: int) -> int:
    """SwiGLU's usual width: the multiple of 8 nearest 8/3 * dim (at least 8)."""
    return max(8, int(round(8 * dim / 3 / 8)) * 8)


class _LanguageModel(nn.Module):
    """Embedding -> blocks (each returns (x, state)) -> RMSNorm -> linear head.

    Blocks take ``need_state``: a forward without ``return_state`` (training) passes False, so the
    fast-weight memories skip their end-of-sequence weights, which nothing reads.
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, blocks: list):
        super().__init__()
        self.vocab_size, self.dim, self.depth = vocab_size, dim, depth
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, state: tuple | None = None, return_state: bool = False):
        check_tokens(tokens, self.vocab_size)
        if state is not None and len(state) != len(self.blocks):
            raise ValueError(f"state has {len(state)} entries but the model has {len(self.blocks)} blocks")
        x = self.embed(tokens if tokens.dtype in (torch.int64, torch.int32) else tokens.long())  # embedding: int32/64 only
        x, new_state = run_inner(self._blocks, x, state, return_state)  # the tokens were checked: the rest is ours
        logits = self.head(self.norm(x))
        return (logits, new_state) if return_state else logits

    def _blocks(self, x: torch.Tensor, state: tuple | None, return_state: bool):
        new_state = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, None if state is None else state[i], need_state=return_state)  # no end states unless returned
            new_state.append(s)
        return x, tuple(new_state)

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of ``prompt`` ((T,) or (B, T) token ids).

        temperature 0 picks the most likely token; top_k keeps only the k most likely.
        Returns the prompt followed by the new tokens, with the prompt's shape convention.
        """
        check_positive_int(max_new_tokens, "max_new_tokens")
        check_positive_int(top_k, "top_k", allow_none=True)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        squeeze = prompt.ndim == 1
        tokens = prompt[None] if squeeze else prompt
        logits, state = self(tokens, return_state=True)
        out = [tokens]
        for _ in range(max_new_tokens):
            last = logits[:, -1].float()
            if temperature == 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                last = last / temperature
                if top_k is not None:
                    kth = last.topk(min(top_k, last.shape[-1]), dim=-1).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                nxt = torch.multinomial(last.softmax(-1), 1, generator=generator)
            out.append(nxt)
            logits, state = self(nxt, state, return_state=True)
        result = torch.cat(out, dim=1)
        return result[0] if squeeze else result

    def compile_blocks(self, **kwargs):
        """Compile every block in place with ``block.compile(**kwargs)`` (``fullgraph=True`` unless
        given); returns the model. Identical blocks reuse one compiled graph, so this compiles in
        about the time of one block (the embedding, norm, head and loss stay eager).

        Example (the "eager" backend only traces, in seconds):
            >>> lm = TitansLM(30, 16, 2, heads=2, chunk_size=4).compile_blocks(backend="eager")
            >>> lm(torch.randint(0, 30, (1, 8))).shape
            torch.Size([1, 8, 30])
        """
        kwargs.setdefault("fullgraph", True)
        for block in self.blocks:
            block.compile(**kwargs)
        return self

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) of a (B, T) batch."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


class HopeLM(_LanguageModel):
    """A small HOPE language model: ``depth`` HOPE blocks between an embedding and a head.

    Args:
        vocab_size, dim, depth, heads: sizes.
        block: "hope" (self-modifying Titans + CMS) or "attention" (softmax attention + CMS).
        chunk_size, anchor_size, max_lr: of the self-modifying Titans mixer.
        cms_periods, cms_hidden, cms_variant, cms_in_context, cms_in_context_lr: of every CMS.

    Example:
        >>> lm = HopeLM(vocab_size=50, dim=32, depth=2, heads=2, chunk_size=8, cms_periods=(1, 4))
        >>> tokens = torch.randint(0, 50, (2, 16))
        >>> lm(tokens).shape
        torch.Size([2, 16, 50])
        >>> lm.generate(tokens[0, :4], max_new_tokens=5).shape
        torch.Size([9])
        >>> spec = lm.level_spec()      # for deepopt.group_by_period / the Lightning callback
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        heads: int = 4,
        block: str = "hope",
        chunk_size: int = 64,
        anchor_size: int | None = None,
        max_lr: float = 0.1,
        cms_periods: Sequence[int] = (1,),
        cms_hidden: int | None = None,
        cms_variant: str = "sequential",
        cms_in_context: Sequence[int | None] | None = None,
        cms_in_context_lr: float | Sequence[float] = 1e-2,
    ):
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth), ("heads", heads)):
            check_positive_int(value, name)
        check_choice(block, "block", ("hope", "attention"))
        cms = dict(
            cms_periods=cms_periods, cms_hidden=cms_hidden, cms_variant=cms_variant,
            cms_in_context=cms_in_context, cms_in_context_lr=cms_in_context_lr,
        )
        if block == "hope":
            blocks = [HopeBlock(dim, heads, chunk_size, anchor_size, max_lr, **cms) for _ in range(depth)]
        else:
            blocks = [HopeAttentionBlock(dim, heads, **cms) for _ in range(depth)]
        super().__init__(vocab_size, dim, depth, blocks)

    def level_spec(self, prefix: str = "") -> dict[str, int]:
        """Level specification of every CMS parameter (other parameters: period 1)."""
        spec = {}
        for i, blk in enumerate(self.blocks):
            spec.update(blk.level_spec(prefix=f"{prefix}blocks.{i}."))
        return spec


class TransformerBlock(nn.Module):
    """Transformer++ block: x + Attn(RMSNorm(x)) (causal SDPA, RoPE), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = AttentionMemory(dim, heads, causal=True, rope=True, impl="sdpa")
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, state=None, need_state: bool = True):
        a, state = self.attn(self.norm1(x), state, need_state=need_state)
        x = x + a
        return x + self.mlp(self.norm2(x)), state


class TransformerLM(_LanguageModel):
    """Transformer++ baseline (SDPA causal attention with RoPE, RMSNorm, SwiGLU), same API as HopeLM.

    ``hidden`` defaults to the multiple of 8 nearest 8/3 * dim (SwiGLU's usual width).

    Example:
        >>> lm = TransformerLM(vocab_size=50, dim=32, depth=2, heads=4)
        >>> lm.generate(torch.randint(0, 50, (1, 4)), max_new_tokens=3, temperature=0).shape
        torch.Size([1, 7])
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int = 4, hidden: int | None = None):
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth), ("heads", heads)):
            check_positive_int(value, name)
        hidden = hidden if hidden is not None else swiglu_hidden(dim)
        super().__init__(vocab_size, dim, depth, [TransformerBlock(dim, heads, hidden) for _ in range(depth)])


class TitansBlock(nn.Module):
    """Titans memory block (the paper's memory-as-a-layer variant, without attention):
    x + NeuralMemory(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, chunk_size: int, max_lr: float, anchor_size: int | None = None):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.memory = NeuralMemory(dim, heads, chunk_size=chunk_size, anchor_size=anchor_size, max_lr=max_lr)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, state=None, need_state: bool = True):
        """(y, state); ``need_state=False``: the memory skips its end state (returned as None), y is the same."""
        m, state = self.memory(self.norm1(x), state, need_state=need_state)
        x = x + m
        return x + self.mlp(self.norm2(x)), state


class TitansLM(_LanguageModel):
    """Language model of Titans neural-memory blocks (memory as the sequence mixer, SwiGLU after it).

    Every block's mixer is a :class:`~nl_layers.NeuralMemory` (residual-MLP fast weights written by
    gradient descent with momentum and forgetting, gradients anchored per ``anchor_size`` tokens);
    same API as :class:`TransformerLM` and :class:`HopeLM`.

    Example:
        >>> lm = TitansLM(vocab_size=50, dim=32, depth=2, heads=2, chunk_size=8)
        >>> lm(torch.randint(0, 50, (2, 12))).shape
        torch.Size([2, 12, 50])
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int = 4, hidden: int | None = None,
                 chunk_size: int = 64, anchor_size: int | None = None, max_lr: float = 1.0):
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth), ("heads", heads)):
            check_positive_int(value, name)
        hidden = hidden if hidden is not None else swiglu_hidden(dim)
        blocks = [TitansBlock(dim, heads, hidden, chunk_size, max_lr, anchor_size) for _ in range(depth)]
        super().__init__(vocab_size, dim, depth, blocks)
