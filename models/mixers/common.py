"""Pieces every zoo mixer shares: the qkv/projection pair and padding a map to a block multiple."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QKVMixer(nn.Module):
    """Base of the attention mixers: `qkv` and `proj` linears named as in NAT's NA module.

    Subclasses implement `forward(x: (B, H, W, C)) -> (B, H, W, C)`; `split_heads` gives q, k, v as
    `(B, heads, H, W, head_dim)` from one packed projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(B, H, W, C)` -> q, k, v, each `(B, heads, H, W, head_dim)`."""
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H, W, 3, self.num_heads, self.head_dim)
        return qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, heads, H, W, head_dim)` -> projected `(B, H, W, C)`."""
        B, _, H, W, _ = x.shape
        return self.proj_drop(self.proj(x.permute(0, 2, 3, 1, 4).reshape(B, H, W, self.dim)))

    @property
    def dropout_p(self) -> float:
        """Attention dropout to apply now (none in eval)."""
        return self.attn_drop if self.training else 0.0


def pad_to_multiple(x: torch.Tensor, multiple_h: int, multiple_w: int | None = None) -> torch.Tensor:
    """Zero-pad a `(B, H, W, C)` map bottom/right so H and W are multiples; crop with `[:, :H, :W]`."""
    multiple_w = multiple_h if multiple_w is None else multiple_w
    H, W = x.shape[1], x.shape[2]
    pad_h, pad_w = -H % multiple_h, -W % multiple_w
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def valid_token_mask(height: int, width: int, padded_h: int, padded_w: int, device=None) -> torch.Tensor:
    """`(padded_h, padded_w)` bool map: True on real tokens, False on the padding `pad_to_multiple` added."""
    rows = torch.arange(padded_h, device=device) < height
    cols = torch.arange(padded_w, device=device) < width
    return rows[:, None] & cols[None, :]
