"""Attention over a reduced set of keys/values: Linformer's learned projection, PVT-v2's spatial reduction.

Each query attends to all of a fixed-size (Linformer) or resolution/ratio^2-size (spatial reduction)
set of key/value representatives, each a weighted sum of the map's tokens: no N x N matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from . import register_mixer
from .common import QKVMixer, pad_to_multiple
from .options import check_int


def resize_maps(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinearly resize `(..., h, w)` parameter maps to `(..., height, width)`.

    Antialiased, so shrinking averages over the whole reference cell rather than sampling two points
    of it; the identity at the reference size.
    """
    if maps.shape[-2:] == (height, width):
        return maps
    lead = maps.shape[:-2]
    # At least fp32: the antialiased kernel has no half-precision CPU version (and the maps are small).
    resized = F.interpolate(
        maps.reshape(1, -1, *maps.shape[-2:]).to(torch.promote_types(maps.dtype, torch.float32)),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    return resized.reshape(*lead, height, width).to(maps.dtype)


@register_mixer("linformer")
class LinformerAttention(QKVMixer):
    """Linformer (Wang et al. 2020): keys and values projected to `num_proj` learned mixtures of tokens.

    Pattern: every query attends to all `num_proj` projected keys k'_j = sum_n E_j(n) k_n (values
    v'_j = sum_n F_j(n) v_n alike), softmax(scale q·k') v'; E, F are shared by the heads.

    Resolution-free: Linformer's N x k matrices are stored as k maps at `ref_size x ref_size` and
    resized bilinearly (antialiased) to the actual H x W, then multiplied by ref_size^2 / (H W). Read
    as a density over the image, a projection then weighs the same image regions at every
    resolution and its sum over tokens keeps the same scale (a Riemann sum of one function), which
    the other options lose: adaptive pooling fixes the weights (that is spatial reduction, the
    `compressed` mixer), a projection computed from K is another mechanism (Transformer-LS). At the
    reference size this is exactly Linformer's learned projection. Any H, W >= 1, no padding.
    Cost O(N k D) time and O(N k) memory for the resized maps, linear in N.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_proj: int = 64,
        ref_size: int = 14,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        check_int("num_proj", num_proj, 1)
        check_int("ref_size", ref_size, 1)
        super().__init__(
            dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.num_proj = num_proj
        self.ref_size = ref_size
        # (key/value, num_proj, ref, ref); std ref^-1 keeps a projected key the size of one key at init.
        self.kv_proj = nn.Parameter(torch.empty(2, num_proj, ref_size, ref_size))
        trunc_normal_(self.kv_proj, std=1.0 / ref_size)

    def projections(self, height: int, width: int) -> torch.Tensor:
        """`(2, num_proj, height * width)` key and value projections for a `height x width` map."""
        maps = resize_maps(self.kv_proj, height, width) * (self.ref_size**2 / (height * width))
        return maps.flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = (t.flatten(2, 3) for t in self.split_heads(x))
        k_proj, v_proj = self.projections(H, W).to(x.dtype)
        out = F.scaled_dot_product_attention(
            q, k_proj @ k, v_proj @ v, dropout_p=self.dropout_p, scale=self.scale
        )
        return self.merge_heads(out.unflatten(2, (H, W)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, num_proj={self.num_proj}, ref_size={self.ref_size}"


@register_mixer("compressed")
class SpatialReductionAttention(QKVMixer):
    """PVT-v2's spatial-reduction attention (Wang et al. 2022; timm `pvt_v2.Attention`).

    Pattern: every query attends to all keys of the reduced map: keys/values come from
    LayerNorm(Conv2d(x, kernel = stride = `sr_ratio`)), one per `sr_ratio x sr_ratio` cell. `qkv`
    packs PVT-v2's `q` (applied to x) and `kv` (applied to the reduced map) as one linear.
    `sr_ratio=1` is full attention (no conv, no norm, as in PVT-v2).

    Resolution-free: the map is zero-padded bottom/right to a multiple of `sr_ratio` before the conv
    (PVT-v2's conv drops the remainder rows instead), so the reduced map is ceil(H/r) x ceil(W/r) and
    every token feeds a key; a map smaller than the ratio (down to 1 x 1) reduces to one key, i.e.
    the stride is clamped to the map. Cost O(N^2 D / r^2): quadratic in tokens, r^2 times cheaper.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        sr_ratio: int = 2,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        check_int("sr_ratio", sr_ratio, 1)
        super().__init__(
            dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = None
            self.norm = None

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, H, W, C)` -> the `(B, ceil(H/r) * ceil(W/r), C)` tokens keys and values are made from."""
        if self.sr is None:
            return x.flatten(1, 2)
        x = pad_to_multiple(x, self.sr_ratio).permute(0, 3, 1, 2)
        return self.norm(self.sr(x).flatten(2).transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        q = F.linear(x, self.qkv.weight[:C], None if self.qkv.bias is None else self.qkv.bias[:C])
        q = q.reshape(B, H * W, heads, head_dim).transpose(1, 2)
        kv_weight, kv_bias = self.qkv.weight[C:], None if self.qkv.bias is None else self.qkv.bias[C:]
        kv = F.linear(self.reduce(x), kv_weight, kv_bias)
        k, v = kv.reshape(B, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p, scale=self.scale)
        return self.merge_heads(out.unflatten(2, (H, W)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, sr_ratio={self.sr_ratio}"
