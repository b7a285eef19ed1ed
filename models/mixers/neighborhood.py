"""Sliding-window attention around each query: NA (the project's operator), dilated NA and SASA."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_

from ..layers import NeighborhoodAttention2D
from . import register_mixer
from .common import QUERY_BLOCK, QKVMixer, blocked_window_attention, check_odd_size

# NAT's own mixer, unchanged: the NA window is clamped inside the map (border queries see a window
# shifted inwards, always k x k keys); maps smaller than the window are zero-padded then cropped.
register_mixer("na")(NeighborhoodAttention2D)


@register_mixer("dilated")
class DilatedNeighborhoodAttention2D(NeighborhoodAttention2D):
    """DiNA (DiNAT's dilated neighborhood attention) with dilation 2 unless told otherwise.

    A query at `(i, j)` attends to the `kernel_size**2` keys `dilation` apart in its dilation group
    (positions congruent to `i` mod `dilation` on each axis), the window clamped inside the group as
    in NA. Maps smaller than `kernel_size * dilation` are zero-padded bottom/right first (the padded
    tokens are attended, as in `NeighborhoodAttention2D`), then cropped.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 2,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rel_pos_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__(
            dim,
            num_heads,
            kernel_size=kernel_size,
            dilation=dilation,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            rel_pos_bias=rel_pos_bias,
            backend=backend,
        )


def centred_windows(length: int, kernel_size: int):
    """One axis of SASA's windows (`common.blocked_window_attention`): the k positions centred on each
    query, those outside the map not real keys; RPB row = slot."""
    offsets = torch.arange(kernel_size) - kernel_size // 2
    keys = torch.arange(length)[:, None] + offsets
    real = (keys >= 0) & (keys < length)
    return keys.clamp(0, length - 1), real, (offsets + kernel_size // 2).expand(length, -1), 1


@register_mixer("sasa")
class StandAloneSelfAttention(QKVMixer):
    """SASA (Ramachandran et al. 2019): attention over the `kernel_size x kernel_size` window
    centred on each query, zero-padded at the borders.

    A query at `(i, j)` attends to the tokens `(y, x)` of the map with `|y - i| <= k // 2` and
    `|x - j| <= k // 2`: fewer keys near the borders (the padding is masked out, never attended), so
    unlike NA it does not become full attention when the window covers the map. With
    `rel_pos_bias`, a learned per-head bias for each of the k*k window offsets (the paper's
    relative embeddings, as a bias table like NA's). Computed blocked
    (`common.blocked_window_attention`, blocks of `QUERY_BLOCK`^2 queries): each query computes
    (QUERY_BLOCK + k - 1)^2 logits, k^2 of them unmasked (fewer at the borders).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kernel_size: int = 7,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        check_odd_size("sasa", "kernel_size", kernel_size)
        self.kernel_size = kernel_size
        if rel_pos_bias:
            self.rpb = torch.nn.Parameter(torch.zeros(num_heads, kernel_size, kernel_size))
            trunc_normal_(self.rpb, std=0.02)
        else:
            self.register_parameter("rpb", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)  # (B, heads, H, W, D)
        out = blocked_window_attention(
            q,
            k,
            v,
            (centred_windows, self.kernel_size),
            QUERY_BLOCK,
            self.rpb,
            dropout_p=self.dropout_p,
            scale=self.scale,
        )
        return self.merge_heads(out)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kernel_size={self.kernel_size}, rel_pos_bias={self.rpb is not None}"
