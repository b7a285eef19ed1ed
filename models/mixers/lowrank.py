"""Attention over a reduced set of keys/values: Linformer's learned projection, PVT-v2's spatial reduction.

Each query attends to all of a fixed-size (Linformer, pooled spatial reduction) or
resolution/ratio^2-size (strided spatial reduction) set of key/value representatives, each made from
the map's tokens: no N x N matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from . import register_mixer
from .common import QKVMixer, check_size, pad_to_multiple


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
        check_size("linformer", "num_proj", num_proj)
        check_size("linformer", "ref_size", ref_size)
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
    """PVT-v2's spatial-reduction attention (Wang et al. 2022; timm `pvt_v2.Attention`), two reductions.

    Every query attends to all keys of a reduced map; `qkv` packs PVT-v2's `q` (applied to x) and
    `kv` (applied to the reduced map) as one linear. Set exactly one of:

    * `pool_size=P` (default 7): PVT-v2-li, timm's `linear_attn=True`. Keys/values come from
      GELU(LayerNorm(Conv1x1(AdaptiveAvgPool2d(x, P)))): P^2 keys at every resolution, key (i, j)
      made from the mean of the tokens in rows floor(i H / P) .. ceil((i + 1) H / P) - 1 and the
      matching columns. Where P does not divide H (or W) neighbouring bins share a row (column), so
      a token may feed several keys; a map smaller than P repeats tokens over keys (as timm).
      Cost O(N P^2 D) attention + O(N D) pooling + O(P^2 D^2) conv: linear in tokens.
    * `sr_ratio=r` with `pool_size=None`: PVT-v2's strided conv. Keys/values come from
      LayerNorm(Conv2d(x, kernel = stride = r)), one per r x r cell; the map is zero-padded
      bottom/right to a multiple of r first (PVT-v2 drops the remainder rows instead), so there are
      ceil(H/r) ceil(W/r) keys, every token feeds one, and a map smaller than r gives one key.
      `sr_ratio=1` is full attention (no conv, no norm, as in PVT-v2). Cost O(N^2 D / r^2):
      quadratic in tokens, r^2 times cheaper than full attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        pool_size: int | None = 7,
        sr_ratio: int | None = None,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        if (pool_size is None) == (sr_ratio is None):
            raise ValueError(
                "mixer 'compressed': set exactly one of pool_size (pooled keys, linear cost) and "
                "sr_ratio (strided-conv keys, quadratic cost: pass pool_size=None with it), "
                f"got pool_size={pool_size!r}, sr_ratio={sr_ratio!r}"
            )
        if pool_size is not None:
            check_size("compressed", "pool_size", pool_size)
        else:
            check_size("compressed", "sr_ratio", sr_ratio)
        super().__init__(
            dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.pool_size = pool_size
        self.sr_ratio = sr_ratio
        # Submodule names as timm's pvt_v2.Attention (pool, sr, norm, act).
        self.pool = nn.AdaptiveAvgPool2d(pool_size) if pool_size is not None else None
        if pool_size is not None or sr_ratio > 1:
            kernel = 1 if pool_size is not None else sr_ratio
            self.sr = nn.Conv2d(dim, dim, kernel_size=kernel, stride=kernel)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = None
            self.norm = None
        self.act = nn.GELU() if pool_size is not None else None

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, H, W, C)` -> the `(B, keys, C)` tokens keys and values are made from."""
        if self.sr is None:
            return x.flatten(1, 2)
        if self.pool is not None:
            x = self.pool(x.permute(0, 3, 1, 2))
        else:
            x = pad_to_multiple(x, self.sr_ratio).permute(0, 3, 1, 2)
        x = self.norm(self.sr(x).flatten(2).transpose(1, 2))
        return x if self.act is None else self.act(x)

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
        reduction = f"pool_size={self.pool_size}" if self.pool is not None else f"sr_ratio={self.sr_ratio}"
        return f"heads={self.num_heads}, {reduction}"
