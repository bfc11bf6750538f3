"""Continuum Memory System (CMS): a chain of MLP blocks, each a memory with its own update period.

A plain feed-forward block is a memory updated by the outer optimizer at every step; CMS splits it
into k levels with periods C_1..C_k (paper Eqs. 70-71). Variants, over input x:

    sequential (default):  h_1 = f_1(x),  h_l = h_{l-1} + f_l(h_{l-1}),  y = h_k
    independent:           y = sum_l w_l f_l(x)              (w learned, initialised to 1/k)
    nested:                y = f(x; theta_1 + ... + theta_k)  (level l+1 is a delta on level l)

With k = 1 the sequential CMS is the plain FFN f_1 (period 1, or "infinity" in context).

Training mode: each block's parameters carry a period (:meth:`CMS.level_spec`, a
``{parameter name: period}`` dict) that deepopt optimizers and the Lightning callback honour: a block of
period C is stepped every C optimizer steps with the mean of its accumulated gradients.

In-context mode (``in_context=[C_1, ...]``): inside one sequence, every level holds per-sequence
fast weights and, every C_l tokens, takes a gradient step on its accumulated objective
(see cms_in_context.py); chunks run in parallel, so there is no Python loop per token unless C_l = 1.

Blocks can be built from a pre-trained FFN (:meth:`CMS.from_ffn`, paper section 7.3) so that the
CMS computes exactly what the FFN did: the sequential variant keeps the FFN as f_1 and adds blocks
whose output layer starts at zero; independent copies the FFN into every level (weights 1/k);
nested keeps the FFN as theta_1 and starts the deltas at zero.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ._checks import check_choice, check_positive_int
from .cms_in_context import CMSState, InContextEngine

VARIANTS = ("sequential", "independent", "nested")
_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


def resolve_activation(activation):
    """A string ("gelu", "relu", "silu", "tanh"), an nn.Module or a callable -> callable."""
    if isinstance(activation, str):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)} or a callable, got {activation!r}")
        return _ACTIVATIONS[activation]
    if not callable(activation):
        raise TypeError(f"activation must be a string or a callable, got {type(activation).__name__}")
    return activation


class MLPBlock(nn.Module):
    """fc2(dropout(act(fc1(x)))): the FFN of a Transformer, built or wrapped from existing layers.

    Example:
        >>> blk = MLPBlock.build(dim=8, hidden=32, activation="gelu")
        >>> blk(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, fc1: nn.Module, fc2: nn.Module, activation="gelu", dropout: nn.Module | float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.act = resolve_activation(activation)
        self.dropout = dropout if isinstance(dropout, nn.Module) else nn.Dropout(float(dropout))

    @classmethod
    def build(cls, dim: int, hidden: int, activation="gelu", dropout: float = 0.0, zero_out: bool = False, bias: bool = True):
        """A fresh block; ``zero_out`` starts fc2 at zero so the block's output is 0."""
        block = cls(nn.Linear(dim, hidden, bias=bias), nn.Linear(hidden, dim, bias=bias), activation, dropout)
        if zero_out:
            nn.init.zeros_(block.fc2.weight)
            if block.fc2.bias is not None:
                nn.init.zeros_(block.fc2.bias)
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


def _as_list(value, k: int, name: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != k:
            raise ValueError(f"{name} has {len(value)} entries but the CMS has {k} levels (one per entry of periods)")
        return list(value)
    return [value] * k


class CMS(nn.Module):
    """Continuum Memory System: k MLP blocks with update periods.

    Args:
        dim: input/output width. hidden: block width (default 4 * dim).
        periods: one update period (optimizer steps) per level, e.g. (1, 4, 16); its length is k.
        variant: "sequential", "independent" or "nested".
        activation, dropout: of the built blocks.
        in_context: None (off) or one chunk size per level (tokens; None = frozen in context).
        in_context_lr: in-context step size, one float or one per level; each step is capped at the
            minimum of its Gauss-Newton model (stable at any width, see cms_in_context).
        blocks: optional list of k modules to use as the levels (see :meth:`from_ffn`).

    ``forward(x, state=None, return_state=False, mode="chunked")`` returns y, or ``(y, CMSState)``
    with ``return_state``; ``mode="recurrent"`` runs the token-by-token in-context reference.
    Without in-context mode the CMS is position-wise (it runs as a model's FFN on inputs of any
    shape (..., dim)) and does not scan its input for NaN: a NaN stays at its own position.
    In-context mode needs (batch, time, dim) and rejects NaN/Inf like the other layers.

    Example:
        >>> cms = CMS(dim=16, periods=(1, 4, 16))
        >>> y = cms(torch.randn(2, 10, 16))
        >>> spec = cms.level_spec(prefix="ffn.")      # {"ffn.blocks.0.fc1.weight": 1, ...}
        >>> ctx = CMS(dim=16, periods=(1, 4), in_context=(None, 8), in_context_lr=0.1)
        >>> y, state = ctx(torch.randn(2, 20, 16), return_state=True)
    """

    def __init__(
        self,
        dim: int,
        hidden: int | None = None,
        periods: Sequence[int] = (1,),
        variant: str = "sequential",
        activation="gelu",
        dropout: float = 0.0,
        in_context: Sequence[int | None] | None = None,
        in_context_lr: float | Sequence[float] = 1e-2,
        blocks: Sequence[nn.Module] | None = None,
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_choice(variant, "variant", VARIANTS)
        if isinstance(periods, int) or not len(periods):
            raise ValueError(f"periods must be a non-empty sequence of ints >= 1, got {periods!r}")
        for p in periods:
            check_positive_int(p, "every entry of periods")
        k = len(periods)
        hidden = 4 * dim if hidden is None else hidden
        check_positive_int(hidden, "hidden")
        self.dim, self.hidden, self.variant, self.periods = dim, hidden, variant, tuple(periods)
        if blocks is None:
            blocks = [MLPBlock.build(dim, hidden, activation, dropout) for _ in range(k)]
            if variant == "nested":  # levels 2..k are deltas on level 1
                for blk in blocks[1:]:
                    _zero_params(blk)
        if len(blocks) != k:
            raise ValueError(f"got {len(blocks)} blocks for {k} periods; pass one period per block")
        self.blocks = nn.ModuleList(blocks)
        if variant == "nested":
            ref = [(n, p.shape) for n, p in self.blocks[0].named_parameters()]
            for blk in self.blocks[1:]:
                if [(n, p.shape) for n, p in blk.named_parameters()] != ref:
                    raise ValueError("the nested variant needs blocks with identical parameter names and shapes")
        ref = next(self.blocks[0].parameters(), None)
        like = dict(dtype=ref.dtype, device=ref.device) if ref is not None else {}
        self.mix = nn.Parameter(torch.full((k,), 1.0 / k, **like)) if variant == "independent" else None
        self.engine = None
        if in_context is not None:
            chunks = _as_list(in_context, k, "in_context")
            for c in chunks:
                check_positive_int(c, "every entry of in_context", allow_none=True)
            lrs = [float(v) for v in _as_list(in_context_lr, k, "in_context_lr")]
            self.engine = InContextEngine(self, chunks, lrs)

    @classmethod
    def from_ffn(
        cls,
        ffn: nn.Module,
        periods: Sequence[int] = (1, 4),
        variant: str = "sequential",
        dim: int | None = None,
        hidden: int | None = None,
        activation="gelu",
        **kwargs,
    ) -> "CMS":
        """A CMS that computes exactly ``ffn(x)`` at initialisation (``ffn`` becomes level 1).

        ``dim`` and ``hidden`` are read from the first submodule with ``in_features`` /
        ``out_features`` when not given (needed only by the sequential variant's new blocks).

        Example:
            >>> ffn = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
            >>> cms = CMS.from_ffn(ffn, periods=(16, 1))
            >>> x = torch.randn(3, 8)
            >>> bool(torch.equal(cms(x), ffn(x)))
            True
        """
        check_choice(variant, "variant", VARIANTS)
        k = len(periods)
        if dim is None or hidden is None:
            linears = [m for m in ffn.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]
            if dim is None:
                if not linears:
                    raise ValueError("cannot infer dim from this FFN (no submodule with in_features); pass dim=")
                dim = linears[0].in_features
            if hidden is None:
                hidden = linears[0].out_features if linears else 4 * dim
        if variant == "sequential":
            blocks = [ffn] + [MLPBlock.build(dim, hidden, activation, zero_out=True) for _ in range(k - 1)]
        elif variant == "independent":
            blocks = [ffn] + [copy.deepcopy(ffn) for _ in range(k - 1)]
        else:
            blocks = [ffn] + [_zero_params(copy.deepcopy(ffn)) for _ in range(k - 1)]
        _match_device_dtype(blocks, ffn)
        return cls(dim, hidden, periods, variant, activation, blocks=blocks, **kwargs)

    def level_spec(self, prefix: str = "") -> dict[str, int]:
        """Level specification {parameter name: period} for every block parameter.

        ``prefix`` is this module's name in the enclosing model plus a dot (e.g. "layers.0.ffn.").
        """
        return {
            f"{prefix}blocks.{i}.{name}": period
            for i, (block, period) in enumerate(zip(self.blocks, self.periods))
            for name, _ in block.named_parameters()
        }

    def nested_params(self) -> dict:
        """theta_1 + ... + theta_k, by parameter name (nested variant)."""
        summed = dict(self.blocks[0].named_parameters())
        for blk in self.blocks[1:]:
            for n, p in blk.named_parameters():
                summed[n] = summed[n] + p
        return summed

    def forward(self, x: torch.Tensor, state: CMSState | None = None, return_state: bool = False, mode: str = "chunked"):
        if not isinstance(x, torch.Tensor) or x.shape[-1:] != (self.dim,):
            raise ValueError(f"x must be a tensor whose last dimension is {self.dim}, got {getattr(x, 'shape', x)}")
        if self.engine is None:
            if state is not None or return_state or mode != "chunked":
                raise ValueError("state, return_state and mode need in-context mode: build the CMS with in_context=[...]")
            return self._static(x)
        y, new_state = self.engine.run(self, x, state, mode)
        return (y, new_state) if return_state else y

    def _static(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "sequential":
            h = self.blocks[0](x)
            for blk in self.blocks[1:]:
                h = h + blk(h)
            return h
        if self.variant == "independent":
            return sum(w * blk(x) for w, blk in zip(self.mix, self.blocks))
        return functional_call(self.blocks[0], self.nested_params(), (x,))

    def extra_repr(self) -> str:
        ctx = "" if self.engine is None else f", in_context={self.engine.chunks}"
        return f"variant={self.variant!r}, periods={self.periods}{ctx}"


def _zero_params(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def _match_device_dtype(blocks: list, like: nn.Module) -> None:
    ref = next(like.parameters(), None)
    if ref is not None:
        for blk in blocks[1:]:
            blk.to(device=ref.device, dtype=ref.dtype)
