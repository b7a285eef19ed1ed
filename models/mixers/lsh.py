"""Reformer's LSH attention (Kitaev et al. 2020): shared-QK tokens sorted by hash bucket, chunked."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register_mixer
from .common import QKVMixer, check_size


@register_mixer("reformer")
class ReformerAttention(QKVMixer):
    """Reformer's LSH self-attention on the map's H*W tokens (row-major), shared query/key.

    Per head and hash round r (of `num_hashes`): bucket(x) = argmax([x R_r, -x R_r]) over
    `num_buckets` buckets, R_r a random `(head_dim, num_buckets / 2)` rotation. Tokens are sorted by
    (bucket, position) (a stable sort), the sorted sequence is padded at its end to a multiple of
    `block_size` and cut into chunks. Pattern: a query attends to the keys of its own chunk and of
    the previous chunk (the first chunk's previous is the last, as in Reformer; with one chunk, only
    itself), padding excluded, and not to itself unless it has no other key (Reformer's rule: with a
    shared QK its own logit would dominate). Keys are the unit-normalised queries. The rounds are
    combined by their log-sum-exp, so the result is softmax attention over every key found in any
    round, a key found in n rounds counted n times (Reformer's paper divides the duplicates out; its
    implementations do not). Rounds are sorted and chunked separately.

    Resolution-free: hashing needs only the token features and any N >= 1 is padded to whole chunks;
    the rotations are a buffer drawn once at construction (seed torch first) and saved with the
    model, so evals are deterministic. 2-D only through the row-major position used to break ties.
    `qkv` packs (shared qk, v): 2 * dim outputs. Cost O(R N block_size D) time and memory for R hash
    rounds, plus an O(R N log N) sort; no N x N matrix.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        block_size: int = 64,
        num_buckets: int = 8,
        num_hashes: int = 2,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        check_size("reformer", "block_size", block_size)
        check_size("reformer", "num_buckets", num_buckets, 2, even=True)
        check_size("reformer", "num_hashes", num_hashes)
        super().__init__(
            dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.block_size = block_size
        self.num_buckets = num_buckets
        self.num_hashes = num_hashes
        self.qkv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.register_buffer("rotations", torch.randn(num_heads, num_hashes, self.head_dim, num_buckets // 2))

    def hash_buckets(self, qk: torch.Tensor) -> torch.Tensor:
        """`(B, heads, N, D)` shared query/keys -> `(B, heads, num_hashes, N)` bucket ids."""
        rotated = torch.einsum("bhnd,hrdk->bhrnk", qk.detach(), self.rotations.to(qk.dtype))
        return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N, chunk = H * W, self.block_size
        qk, v = self.qkv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        buckets = self.hash_buckets(qk)
        # Keys are the unit queries; the floor is representable in half precision (1e-12 is not, and
        # a zero vector would give 0/0).
        k = F.normalize(qk, dim=-1, eps=torch.finfo(qk.dtype).tiny)
        num_chunks = -(-N // chunk)
        padded = num_chunks * chunk
        pad = padded - N
        if pad:
            # Padding tokens take a bucket past the last, so the stable sort puts them at the end.
            buckets = F.pad(buckets, (0, pad), value=self.num_buckets)
            qk, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (qk, k, v))
        order = torch.sort(buckets, dim=-1, stable=True).indices  # (B, heads, R, padded) positions

        def sort(t: torch.Tensor) -> torch.Tensor:
            """`(B, heads, padded, D)` -> `(B, heads, R, chunks, chunk, D)` in each round's sorted order."""
            index = order.unsqueeze(-1).expand(-1, -1, -1, -1, t.shape[-1])
            t = t.unsqueeze(2).expand(-1, -1, self.num_hashes, -1, -1).gather(3, index)
            return t.unflatten(3, (num_chunks, chunk))

        def with_previous(t: torch.Tensor) -> torch.Tensor:
            """Keys of chunk c and c-1 (cyclic) side by side; a single chunk is its own only neighbour."""
            return t if num_chunks == 1 else torch.cat([t, t.roll(1, dims=3)], dim=4)

        query = sort(qk)
        key, value = with_previous(sort(k)), with_previous(sort(v))
        positions = order.unflatten(3, (num_chunks, chunk))
        key_positions = with_previous(positions)
        logits = self.scale * query @ key.transpose(-2, -1)  # (B, heads, R, chunks, chunk, keys)
        logits = logits.masked_fill((key_positions >= N).unsqueeze(-2), float("-inf"))
        # Finite, so a query whose only key is itself keeps it (padding queries included: no row is
        # all -inf, no NaN even in the discarded rows); any other key outweighs it completely.
        self_key = positions.unsqueeze(-1) == key_positions.unsqueeze(-2)
        logits = logits.masked_fill(self_key, torch.finfo(logits.dtype).min / 2)
        lse = logits.logsumexp(dim=-1, keepdim=True)
        attn = F.dropout((logits - lse).exp(), self.dropout_p, training=self.training)
        out, lse = (attn @ value).flatten(3, 4), lse.flatten(3, 5)

        # Back to token order, then weigh the rounds by their share of the total softmax mass.
        unsort = order.argsort(dim=-1)
        out = out.gather(3, unsort.unsqueeze(-1).expand_as(out))
        round_weights = lse.gather(3, unsort).softmax(dim=2).unsqueeze(-1)
        out = (round_weights * out).sum(dim=2)[:, :, :N]
        return self.merge_heads(out.unflatten(2, (H, W)))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, block_size={self.block_size}, num_buckets={self.num_buckets}, "
            f"num_hashes={self.num_hashes}"
        )
