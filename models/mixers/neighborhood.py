"""Sliding-window attention around each query: NA (the project's operator), dilated NA and SASA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..layers import NeighborhoodAttention2D
from ..layers.backends.windows import geometry_cache
from . import register_mixer
from .common import QKVMixer, check_odd_size

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


@geometry_cache(maxsize=64)
def _centred_window_mask(height: int, width: int, kernel_size: int, device: str) -> torch.Tensor:
    """`(H, W, k*k)` bool: which slots of each query's centred window fall inside the map."""
    r = kernel_size // 2
    inside = F.pad(torch.ones(height, width, device=device), (r, r, r, r))
    return inside.unfold(0, kernel_size, 1).unfold(1, kernel_size, 1).flatten(2).bool()


@register_mixer("sasa")
class StandAloneSelfAttention(QKVMixer):
    """SASA (Ramachandran et al. 2019): attention over the `kernel_size x kernel_size` window
    centred on each query, zero-padded at the borders.

    A query at `(i, j)` attends to the tokens `(y, x)` of the map with `|y - i| <= k // 2` and
    `|x - j| <= k // 2`: fewer keys near the borders (the padding is masked out, never attended), so
    unlike NA it does not become full attention when the window covers the map. With
    `rel_pos_bias`, a learned per-head bias for each of the k*k window offsets (the paper's
    relative embeddings, as a bias table like NA's). Cost: k*k keys per query, gathered with
    `Tensor.unfold` over the padded keys and values.
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
        B, H, W, _ = x.shape
        ks, r = self.kernel_size, self.kernel_size // 2
        q, k, v = self.split_heads(x)  # (B, heads, H, W, D)

        def windows(t: torch.Tensor) -> torch.Tensor:  # (B, heads, H, W, D, k*k): a copy, k*k per query
            return F.pad(t, (0, 0, r, r, r, r)).unfold(2, ks, 1).unfold(3, ks, 1).flatten(-2)

        logits = (q.unsqueeze(-2) * self.scale) @ windows(k)  # (B, heads, H, W, 1, k*k)
        if self.rpb is not None:
            logits = logits + self.rpb.to(q.dtype).flatten(1)[:, None, None, None, :]
        inside = _centred_window_mask(H, W, ks, str(x.device))
        attn = logits.masked_fill(~inside.unsqueeze(-2), float("-inf")).softmax(dim=-1)
        attn = F.dropout(attn, self.dropout_p)
        out = attn @ windows(v).transpose(-1, -2)  # (B, heads, H, W, 1, D)
        return self.merge_heads(out.squeeze(-2))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kernel_size={self.kernel_size}, rel_pos_bias={self.rpb is not None}"
