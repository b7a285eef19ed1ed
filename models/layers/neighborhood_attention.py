"""`NeighborhoodAttention2D`: the NA block used by NAT and DiNAT.

Parameter names (`qkv`, `rpb`, `proj`) and the qkv channel layout `(3, heads, head_dim)` are those
of the official NAT/DiNAT repositories, so their checkpoints load without renaming inside a block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from .functional import neighborhood_attention_2d


class NeighborhoodAttention2D(nn.Module):
    """Multi-head 2-D neighborhood attention over a channels-last map `(B, H, W, C)`.

    Maps smaller than the window (`kernel_size * dilation`) are zero-padded right/bottom *before*
    the qkv projection (padded tokens carry the projection bias), attended, then cropped before
    `proj`: what natten 0.14's module did under the official NAT repo, so official checkpoints give
    the same outputs at any resolution.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rel_pos_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.window_size = kernel_size * dilation
        self.scale = qk_scale or self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        pad_b = max(0, self.window_size - H)
        pad_r = max(0, self.window_size - W)
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        q, k, v = self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim).unbind(3)
        x = neighborhood_attention_2d(
            q,
            k,
            v,
            self.kernel_size,
            dilation=self.dilation,
            rpb=self.rpb,
            scale=self.scale,
            attn_drop=self.attn_drop if self.training else 0.0,
            backend=self.backend,
        )
        x = x.reshape(B, Hp, Wp, C)[:, :H, :W]
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, rel_pos_bias={self.rpb is not None}, backend={self.backend}"
        )
