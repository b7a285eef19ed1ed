"""Sparse Sinkhorn attention (Tay et al. 2020): each block also attends to a learned, softly sorted block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register_mixer
from .common import QKVMixer, check_positive, check_size, pad_to_multiple, valid_token_mask


def gumbel_sinkhorn(logits: torch.Tensor, temperature: float, iters: int, noise: bool) -> torch.Tensor:
    """Soft permutation from `(..., n, n)` logits: (logits + Gumbel noise) / temperature, then `iters`
    alternate row and column normalisations in log space (a doubly stochastic matrix in the limit)."""
    if noise:
        uniform = torch.rand_like(logits).clamp(torch.finfo(logits.dtype).tiny, 1.0)
        logits = logits - torch.log(-torch.log(uniform))
    log_p = logits / temperature
    for _ in range(iters):
        log_p = log_p - log_p.logsumexp(dim=-1, keepdim=True)
        log_p = log_p - log_p.logsumexp(dim=-2, keepdim=True)
    return log_p.exp()


def to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """`(..., H, W, D)`, H and W multiples of `block` -> `(..., blocks, block^2, D)`, blocks row-major."""
    *lead, H, W, D = x.shape
    x = x.reshape(*lead, H // block, block, W // block, block, D).transpose(-4, -3)
    return x.reshape(*lead, (H // block) * (W // block), block * block, D)


def from_blocks(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `to_blocks` for a `height x width` map: `(..., blocks, block^2, D)` -> `(..., H, W, D)`."""
    *lead, _, area, D = x.shape
    block = round(area**0.5)
    x = x.reshape(*lead, height // block, width // block, block, block, D).transpose(-4, -3)
    return x.reshape(*lead, height, width, D)


@register_mixer("sinkhorn")
class SinkhornAttention(QKVMixer):
    """Sparse Sinkhorn attention on 2-D blocks of `block_size x block_size` tokens.

    A sort net (Linear to dim / 4, GELU, Linear) maps each block's mean input token to a query code
    and a key code (head_dim each) per head; block-to-block logits scale * a_i·b_j go through
    Gumbel-Sinkhorn (`sinkhorn_iters` normalisations at `temperature`; Gumbel noise in training only)
    to a soft permutation S (`block_permutation`). The sorted block i is k'_i = sum_j S_ij k_j (values alike),
    token slot by token slot. Pattern: a query in block i attends to the real tokens of its own block
    plus the block_size^2 slots of the sorted block i, slot p weighed by the share of real tokens
    mixed into it (logit + log sum_j S_ij valid_j(p); a slot that is padding in every block is out).
    With one block, S = [1] and the sorted block is the own block again (the same softmax).

    Resolution-free: maps are zero-padded bottom/right to whole blocks (padding after the qkv
    projection, never a key of the own block, and summaries average real tokens only); the sort net
    scores pairs of blocks, so it works for any number of blocks. Every query keeps its own
    position: no empty row. Cost O(N 2 block_size^2 D) for the attention plus O(N (N / block_size^2)
    D) for mixing the blocks (S is blocks x blocks, (N / block_size^2)^2: no N x N matrix).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        block_size: int = 7,
        sinkhorn_iters: int = 8,
        temperature: float = 0.75,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        check_size("sinkhorn", "block_size", block_size)
        check_size("sinkhorn", "sinkhorn_iters", sinkhorn_iters)
        check_positive("sinkhorn", "temperature", temperature)
        super().__init__(
            dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.block_size = block_size
        self.sinkhorn_iters = sinkhorn_iters
        self.temperature = temperature
        # Bottlenecked (dim / 4 hidden): 0.75 dim^2 parameters, under a tenth of a NAT block's.
        hidden = max(1, dim // 4)
        self.sort_net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * dim))

    def _valid_blocks(self, H: int, W: int, device: torch.device) -> torch.Tensor:
        """`(blocks, block_size^2)` bool: True on real tokens of the padded map's blocks."""
        Hp, Wp = -(-H // self.block_size) * self.block_size, -(-W // self.block_size) * self.block_size
        valid = valid_token_mask(H, W, Hp, Wp, device=device)
        return to_blocks(valid[..., None], self.block_size)[..., 0]

    def block_permutation(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, H, W, C)` -> soft block permutation S `(B, heads, blocks, blocks)`, rows: query blocks."""
        B, H, W, C = x.shape
        valid = self._valid_blocks(H, W, x.device)
        blocks = to_blocks(pad_to_multiple(x, self.block_size), self.block_size)
        summaries = blocks.sum(dim=2) / valid.sum(dim=1, keepdim=True)  # mean of the real tokens
        codes = self.sort_net(summaries).reshape(B, -1, 2, self.num_heads, self.head_dim)
        query_codes, key_codes = codes.permute(2, 0, 3, 1, 4)
        # Sinkhorn's repeated normalisations amplify rounding: at least fp32, autocast or not.
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            logits = self.scale * query_codes.to(dtype) @ key_codes.to(dtype).transpose(-2, -1)
            return gumbel_sinkhorn(logits, self.temperature, self.sinkhorn_iters, noise=self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        size = self.block_size
        permutation = self.block_permutation(x)
        pad_h, pad_w = -H % size, -W % size
        q, k, v = (to_blocks(F.pad(t, (0, 0, 0, pad_w, 0, pad_h)), size) for t in self.split_heads(x))
        valid = self._valid_blocks(H, W, x.device)

        def sorted_blocks(t: torch.Tensor) -> torch.Tensor:
            return (permutation.to(t.dtype) @ t.flatten(-2)).unflatten(-1, t.shape[-2:])

        sorted_valid = sorted_blocks(valid.to(x.dtype)[..., None])[..., 0]  # (B, heads, blocks, slots)
        own_bias = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(~valid, float("-inf"))
        sorted_bias = sorted_valid.clamp_min(torch.finfo(x.dtype).tiny).log()
        sorted_bias = sorted_bias.masked_fill(sorted_valid == 0, float("-inf"))
        bias = torch.cat([own_bias.expand_as(sorted_bias), sorted_bias], dim=-1).unsqueeze(-2)
        keys, values = torch.cat([k, sorted_blocks(k)], dim=-2), torch.cat([v, sorted_blocks(v)], dim=-2)
        out = F.scaled_dot_product_attention(
            q.flatten(1, 2),
            keys.flatten(1, 2),
            values.flatten(1, 2),
            attn_mask=bias.flatten(1, 2),
            dropout_p=self.dropout_p,
            scale=self.scale,
        )
        out = from_blocks(out.unflatten(1, (self.num_heads, -1)), H + pad_h, W + pad_w)
        return self.merge_heads(out[:, :, :H, :W])

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, block_size={self.block_size}, sinkhorn_iters={self.sinkhorn_iters}, "
            f"temperature={self.temperature}"
        )
