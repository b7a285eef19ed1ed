"""Kernelized (linear-cost) attention: softmax(q·k) replaced by a feature-map product phi(q)·phi(k).

With the product associative, out_i = phi(q_i) (sum_n phi(k_n)^T v_n) / (phi(q_i) · sum_n phi(k_n)):
the "(VK)Q" ordering, O(N F D) for N tokens, F features and head dim D, and no N x N matrix. Every
query attends to every key of the map, so no padding is needed at any size and nothing is masked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import register_mixer
from .common import QKVMixer, check_size, reject_unused


def normalized_kernel_attention(
    q_features: torch.Tensor, k_features: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """phi(Q) (phi(K)^T V) / (phi(Q) sum_n phi(K)); features `(B, heads, N, F)`, v `(B, heads, N, D)`.

    The features must be positive. The key sum rides as an extra column of ones on V, so each
    feature tensor is read by one matmul forward and gets one gradient backward (no N x F sums or
    gradient accumulations: those memory-bound passes are what the cost is at large N). Sums run in
    at least fp32 (autocast off): exp-type features and sums over thousands of tokens overflow or
    lose their small terms in half precision.
    """
    dtype = torch.promote_types(v.dtype, torch.float32)
    with torch.autocast(v.device.type, enabled=False):
        q_features, k_features, v32 = q_features.to(dtype), k_features.to(dtype), v.to(dtype)
        values_and_ones = torch.cat([v32, v32.new_ones(*v32.shape[:-1], 1)], dim=-1)
        kv = k_features.transpose(-2, -1) @ values_and_ones  # (B, heads, F, D + 1): sum phi(k) v, sum phi(k)
        out = q_features @ kv  # (B, heads, N, D + 1): numerator, normalizer
        # Positive features give a positive normalizer; the floor only guards exp underflow to 0 / 0.
        out = out[..., :-1] / out[..., -1:].clamp_min(torch.finfo(dtype).tiny)
    return out.to(v.dtype)


def _flat_heads(x: torch.Tensor, mixer: QKVMixer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as `(B, heads, H*W, D)` token sequences."""
    return tuple(t.flatten(2, 3) for t in mixer.split_heads(x))


@register_mixer("linear")
class LinearAttention(QKVMixer):
    """Linear attention (Katharopoulos et al. 2020) with the elu+1 feature map.

    Pattern: every query attends to all H*W keys of the map, weight phi(q_i)·phi(k_j) / sum_n
    phi(q_i)·phi(k_n) with phi(x) = elu(x) + 1 (no softmax). Resolution-free by construction: no
    parameter depends on H, W, and no padding is added, so no padded key ever enters the sums.
    Cost O(N D^2) time, O(D^2) per head for the key-value summary. fp32 accumulation under autocast.

    There are no q·k logits and no attention matrix, so `qk_scale` must stay None and `attn_drop` 0.
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
        reject_unused("linear", qk_scale=qk_scale, attn_drop=attn_drop)
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = _flat_heads(x, self)
        dtype = torch.promote_types(v.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            q_features, k_features = F.elu(q.to(dtype)) + 1, F.elu(k.to(dtype)) + 1
        out = normalized_kernel_attention(q_features, k_features, v)
        return self.merge_heads(out.unflatten(2, (H, W)))


def orthogonal_random_features(num_features: int, dim: int) -> torch.Tensor:
    """`(num_features, dim)` rows: blocks of `dim` orthogonal directions with chi(dim) norms (FAVOR+).

    Each block is the Q of a Gaussian matrix's QR with its columns' signs fixed by R's diagonal, which
    makes Q uniformly (Haar) distributed: raw Householder QR gives directions with a biased sign, and
    the estimate then stops improving with more features. The norms make each row marginally
    Gaussian, so the positive features are unbiased while orthogonality lowers their variance. Drawn
    from torch's default generator (the caller seeds it).
    """
    q, r = torch.linalg.qr(torch.randn(math.ceil(num_features / dim), dim, dim))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # column j times sign(r_jj)
    directions = q.transpose(-2, -1).reshape(-1, dim)[:num_features]
    return directions * torch.randn(num_features, dim).norm(dim=1, keepdim=True)


@register_mixer("performer")
class PerformerAttention(QKVMixer):
    """Performer's FAVOR+ attention (Choromanski et al. 2021): softmax attention via positive random features.

    Pattern: every query attends to all H*W keys; the weights approximate softmax(scale q·k) with
    phi(x) = exp(w_r·x' - |x'|^2 / 2), x' = x scale^(1/2), over `num_features` orthogonal Gaussian
    rows w_r; the error falls as `num_features` grows. The rows are a buffer drawn once at
    construction (seed torch first) and saved in the state dict: two evals of one model agree bit for
    bit, and a checkpoint keeps its features. Resolution-free: no parameter depends on H, W and no
    padding is added. Cost O(N F D) for F features. Stable: each query's features are divided by
    their largest term and all keys' by their common largest term (constants that cancel in the
    normalisation), computed in fp32 under autocast.

    There is no attention matrix to drop out, so `attn_drop` must be 0.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_features: int = 128,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        check_size("performer", "num_features", num_features)
        reject_unused("performer", attn_drop=attn_drop)
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop)
        self.num_features = num_features
        self.register_buffer("features", orthogonal_random_features(num_features, self.head_dim))

    def feature_map(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        """Positive random features of `(B, heads, N, D)` queries or keys, up to a cancelling constant."""
        x = x * self.scale**0.5
        # w_r·x - |x|^2 / 2 as one matmul: x with -|x|^2 / 2 appended, against w_r with 1 appended.
        x = torch.cat([x, x.square().sum(-1, keepdim=True) / -2], dim=-1)
        features = self.features.to(x.dtype)
        logits = x @ torch.cat([features, features.new_ones(len(features), 1)], dim=-1).T
        # Largest term per query (any constant per query cancels) or over all keys of a head (one
        # constant for every key cancels); detached because it cancels exactly. In place: neither the
        # matmul nor the subtraction needs this N x F tensor for backward, and exp keeps only its result.
        dims = (-1,) if is_query else (-2, -1)
        return logits.sub_(logits.detach().amax(dim=dims, keepdim=True)).exp_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = _flat_heads(x, self)
        dtype = torch.promote_types(v.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            q_features = self.feature_map(q.to(dtype), is_query=True)
            k_features = self.feature_map(k.to(dtype), is_query=False)
        out = normalized_kernel_attention(q_features, k_features, v)
        return self.merge_heads(out.unflatten(2, (H, W)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, num_features={self.num_features}"
