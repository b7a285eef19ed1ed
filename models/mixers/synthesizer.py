"""Synthesizer attention (Tay et al. 2021): attention weights not from query-key dot products.

Both variants keep their key-position parameters as maps on a `ref_size x ref_size` reference grid
and resize them bilinearly (antialiased, `lowrank.resize_maps`) to the actual H x W: a weight learned
for an image region applies to the same region at any resolution, and at the reference size the
mechanism is exactly the paper's. The synthesized N x N weights are the mechanism itself; both are
low-rank products here (rank head_dim + 1, or `rank`), handed to fused SDPA, which does not keep them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from . import register_mixer
from .common import QKVMixer, check_size, reject_unused
from .lowrank import resize_maps


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """softmax(q·k) v (no scale) through SDPA's fused kernels, which keep no N x N matrix.

    Those kernels need one head width for q, k and v, rows contiguous in memory and a mask without
    gradient, so the synthesizers put their learned bias into q·k and zero-pad q, k and v to a common
    width: q·k is unchanged and the padded output columns are dropped. Otherwise SDPA (torch 2.x,
    CPU) falls back to materialising the N x N weights.
    """
    width = max(q.shape[-1], v.shape[-1])
    q, k, padded_v = (F.pad(t, (0, width - t.shape[-1])).contiguous() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, padded_v, dropout_p=dropout_p, scale=1.0)
    return out[..., : v.shape[-1]]


@register_mixer("synthesizer_dense")
class DenseSynthesizerAttention(QKVMixer):
    """Dense Synthesizer: each token alone predicts its logits over all key positions, no Q·K.

    Pattern: a query at token i attends to every token j of the map with logit
    scale * relu(W1 x_i + b1)·W2(j) + b2(j) (per head; W1 is the first half of `qkv`, the second half
    is v), softmax over j, times v_j. In the paper W2 maps the hidden vector to N logits; here W2
    and b2 are head_dim + 1 maps over a reference grid of absolute key positions, resized
    bilinearly to H x W, so the logit a token gives to position j is its logit for that image region
    (resolution-free; at ref_size x ref_size it is the paper's layer). Cost O(N^2 D) time, as for
    full attention; the N x N weights are the mechanism (a rank head_dim + 1 product, fused SDPA).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        ref_size: int = 14,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        check_size("synthesizer_dense", "ref_size", ref_size)
        super().__init__(
            dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.ref_size = ref_size
        self.qkv = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # (hidden, v)
        # Per head: head_dim weight maps (W2's rows) and one bias map (b2) over the reference grid.
        self.key_maps = nn.Parameter(torch.empty(num_heads, self.head_dim, ref_size, ref_size))
        self.key_bias = nn.Parameter(torch.zeros(num_heads, ref_size, ref_size))
        trunc_normal_(self.key_maps, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """b2 is a bias (3-D only because it is a map), exempt as NAT exempts biases."""
        return {"key_bias"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        hidden, v = self.qkv(x).reshape(B, H * W, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # Keys: W2's maps and b2's map at this size, (heads, N, head_dim + 1); queries get a 1 for b2.
        keys = torch.cat([resize_maps(self.key_maps, H, W), resize_maps(self.key_bias, H, W)[:, None]], 1)
        keys = keys.flatten(2).transpose(1, 2).to(x.dtype).expand(B, -1, -1, -1)
        queries = torch.cat([self.scale * F.relu(hidden), hidden.new_ones(*hidden.shape[:-1], 1)], -1)
        out = fused_attention(queries, keys, v, self.dropout_p)
        return self.merge_heads(out.unflatten(2, (H, W)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, ref_size={self.ref_size}"


@register_mixer("synthesizer_random")
class RandomSynthesizerAttention(QKVMixer):
    """Factorized Random Synthesizer: the attention logits are a learned parameter R = R1 R2^T, per head.

    Pattern: every query i attends to every token j of the map with logit R1(i)·R2(j), input
    independent (only v depends on the input; `qkv` is the v projection alone), softmax over j. R1
    and R2 are `rank` maps each over the reference grid, resized bilinearly to H x W; bilinear
    resizing acts on each index separately, so this is exactly the full ref^2 x ref^2 logit table
    R1 R2^T resized in both its query and its key positions, without storing or resizing an N x N
    table (the factorised form of the paper; its unfactorised table would cost ref^4 per head).
    Cost O(N^2 rank) time, as full attention with head dim `rank`. qk_scale has nothing to scale.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        rank: int = 8,
        ref_size: int = 14,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        check_size("synthesizer_random", "rank", rank)
        check_size("synthesizer_random", "ref_size", ref_size)
        reject_unused("synthesizer_random", qk_scale=qk_scale)
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.rank = rank
        self.ref_size = ref_size
        self.qkv = nn.Linear(dim, dim, bias=qkv_bias)  # v only
        # (query/key factor, heads, rank, ref, ref); std rank^-1/4 starts the logits at unit variance.
        self.factors = nn.Parameter(torch.empty(2, num_heads, rank, ref_size, ref_size))
        trunc_normal_(self.factors, std=rank**-0.25)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """R's factors are learned attention logits by position, exempt as NAT exempts its RPB tables
        (decay would pull the attention towards a uniform average)."""
        return {"factors"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        v = self.qkv(x).reshape(B, H * W, self.num_heads, self.head_dim).transpose(1, 2)
        query_factor, key_factor = resize_maps(self.factors, H, W).flatten(3).transpose(2, 3).to(x.dtype)
        query_factor, key_factor = (f.expand(B, -1, -1, -1) for f in (query_factor, key_factor))
        out = fused_attention(query_factor, key_factor, v, self.dropout_p)
        return self.merge_heads(out.unflatten(2, (H, W)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, rank={self.rank}, ref_size={self.ref_size}"
