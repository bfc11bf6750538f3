"""Small building blocks shared by the layers: causal depthwise convolution, SwiGLU, rotary embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / max(||x||, eps) over the last dimension."""
    return F.normalize(x, dim=-1, eps=eps)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H*d) -> (B, H, T, d)."""
    b, t, hd = x.shape
    return x.view(b, t, heads, hd // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) -> (B, T, H*d)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class CausalDepthwiseConv1d(nn.Module):
    """Depthwise convolution over time that only looks back: y_t = sum_j w_j * x_{t-j}, j < width.

    ``forward(x, cache)`` takes (B, T, C) and the last ``width - 1`` inputs of the previous call
    (zeros at the start of a sequence) and returns ``(y, new_cache)``, so a sequence can be streamed.
    The filter starts as the identity (y = x), so the convolution only mixes once trained.
    """

    def __init__(self, channels: int, width: int = 4):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.width = width
        self.weight = nn.Parameter(torch.zeros(channels, 1, width))
        with torch.no_grad():
            self.weight[:, 0, -1] = 1.0

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, c = x.shape
        if cache is None:
            cache = x.new_zeros(b, self.width - 1, c)
        full = torch.cat([cache, x], dim=1)  # (B, w-1+T, C)
        y = F.conv1d(full.transpose(1, 2), self.weight, groups=c).transpose(1, 2)
        return y, full[:, full.shape[1] - (self.width - 1) :]


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of (B, H, T, d) at integer ``positions`` (T,), d even."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d)
    angles = positions.to(torch.float64)[:, None] * inv[None, :]  # (T, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)
