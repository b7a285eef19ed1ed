"""Full (global) self-attention: the dense baseline, through PyTorch's fused SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register_mixer
from .common import QKVMixer


@register_mixer("full")
class FullAttention(QKVMixer):
    """Multi-head self-attention over the whole map: every query attends to all `H * W` tokens.

    No positional bias (the conv stem and downsamplers give the position cues). Fused
    `F.scaled_dot_product_attention` never materialises the N x N matrix on CPU and GPU, but the
    cost is quadratic in tokens: the reference every sparse mixer is measured against.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = (t.flatten(2, 3) for t in self.split_heads(x))  # (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p, scale=self.scale)
        return self.merge_heads(out.unflatten(2, (H, W)))
