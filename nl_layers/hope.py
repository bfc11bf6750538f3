"""HOPE blocks: a sequence mixer that learns in context, then a Continuum Memory System.

    HopeBlock:           h = x + SelfModifyingTitans(norm(x)),  y = h + CMS(norm(h))
    HopeAttentionBlock:  h = x + AttentionMemory(norm(x)),      y = h + CMS(norm(h))

(pre-norm residual blocks with RMSNorm). Both take and return a streaming state, so a model
built from them can process a sequence in pieces or generate token by token.

Reference: Behrouz et al. 2025 (Nested Learning), section 8 (HOPE).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ._checks import check_sequence, run_inner
from .cms import CMS
from .memory.attention import AttentionMemory
from .self_modifying import SelfModifyingTitans


class HopeBlockState(NamedTuple):
    """State of a HOPE block: the mixer's state and the CMS's in-context state (None when off)."""

    mixer: tuple
    cms: tuple | None

    def detach(self) -> "HopeBlockState":
        """A copy cut from the autograd graph (truncated backpropagation through time)."""
        mixer = self.mixer.detach() if hasattr(self.mixer, "detach") else type(self.mixer)(*(t.detach() for t in self.mixer))
        return HopeBlockState(mixer, None if self.cms is None else self.cms.detach())


class _MixerThenCMS(nn.Module):
    def __init__(self, dim: int, mixer: nn.Module, cms_periods, cms_hidden, cms_variant, cms_in_context, cms_in_context_lr):
        super().__init__()
        self.dim = dim
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.mixer = mixer
        self.cms = CMS(
            dim, cms_hidden, periods=cms_periods, variant=cms_variant, in_context=cms_in_context, in_context_lr=cms_in_context_lr
        )

    def forward(self, x: torch.Tensor, state: HopeBlockState | None = None, need_state: bool = True):
        """(y, HopeBlockState); ``need_state=False`` (the state is dropped): the mixer skips its end
        state (the returned state then holds None for it), y is the same."""
        check_sequence(x, self.dim)
        return run_inner(self._forward, x, state, need_state)  # x was checked: the mixer's and CMS's inputs are ours

    def _forward(self, x: torch.Tensor, state: HopeBlockState | None, need_state: bool):
        mixed, mixer_state = self.mixer(self.norm1(x), None if state is None else state.mixer, need_state=need_state)
        h = x + mixed
        if self.cms.engine is None:
            return h + self.cms(self.norm2(h)), HopeBlockState(mixer_state, None)
        out, cms_state = self.cms(self.norm2(h), None if state is None else state.cms, return_state=True)
        return h + out, HopeBlockState(mixer_state, cms_state)

    def level_spec(self, prefix: str = "") -> dict[str, int]:
        """The CMS's level specification, with this block's prefix."""
        return self.cms.level_spec(prefix=f"{prefix}cms.")


class HopeBlock(_MixerThenCMS):
    """Self-modifying Titans followed by a CMS (pre-norm residual).

    Args:
        dim, heads: width and heads of the mixer.
        chunk_size, anchor_size, max_lr: of :class:`~nl_layers.SelfModifyingTitans`.
        cms_periods, cms_hidden, cms_variant, cms_in_context, cms_in_context_lr: of :class:`~nl_layers.CMS`.

    ``forward(x, state=None, need_state=True)`` returns ``(y, HopeBlockState)``.

    Example:
        >>> block = HopeBlock(dim=32, heads=2, chunk_size=8, cms_periods=(1, 4))
        >>> y, state = block(torch.randn(2, 12, 32))
        >>> block.level_spec("blocks.0.")["blocks.0.cms.blocks.1.fc1.weight"]
        4
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        chunk_size: int = 64,
        anchor_size: int | None = None,
        max_lr: float = 0.1,
        cms_periods: Sequence[int] = (1,),
        cms_hidden: int | None = None,
        cms_variant: str = "sequential",
        cms_in_context: Sequence[int | None] | None = None,
        cms_in_context_lr: float | Sequence[float] = 1e-2,
    ):
        mixer = SelfModifyingTitans(dim, heads, chunk_size, anchor_size, max_lr=max_lr)
        super().__init__(dim, mixer, cms_periods, cms_hidden, cms_variant, cms_in_context, cms_in_context_lr)


class HopeAttentionBlock(_MixerThenCMS):
    """Softmax attention (as memory, with RoPE) followed by a CMS (pre-norm residual).

    Example:
        >>> block = HopeAttentionBlock(dim=32, heads=4, cms_periods=(1, 8))
        >>> y, state = block(torch.randn(2, 12, 32))
        >>> y.shape
        torch.Size([2, 12, 32])
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        cms_periods: Sequence[int] = (1,),
        cms_hidden: int | None = None,
        cms_variant: str = "sequential",
        cms_in_context: Sequence[int | None] | None = None,
        cms_in_context_lr: float | Sequence[float] = 1e-2,
    ):
        mixer = AttentionMemory(dim, heads, causal=True, rope=True)
        super().__init__(dim, mixer, cms_periods, cms_hidden, cms_variant, cms_in_context, cms_in_context_lr)
