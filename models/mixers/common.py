"""Pieces every zoo mixer shares: the qkv/projection pair and padding a map to a block multiple."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QKVMixer(nn.Module):
    """Base of the attention mixers: `qkv` and `proj` linears named as in NAT's NA module.

    Subclasses implement `forward(x: (B, H, W, C)) -> (B, H, W, C)`; `split_heads` gives q, k, v as
    `(B, heads, H, W, head_dim)` from one packed projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(B, H, W, C)` -> q, k, v, each `(B, heads, H, W, head_dim)`."""
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H, W, 3, self.num_heads, self.head_dim)
        return qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, heads, H, W, head_dim)` -> projected `(B, H, W, C)`."""
        B, _, H, W, _ = x.shape
        return self.proj_drop(self.proj(x.permute(0, 2, 3, 1, 4).reshape(B, H, W, self.dim)))

    @property
    def dropout_p(self) -> float:
        """Attention dropout to apply now (none in eval)."""
        return self.attn_drop if self.training else 0.0


def pad_to_multiple(x: torch.Tensor, multiple_h: int, multiple_w: int | None = None) -> torch.Tensor:
    """Zero-pad a `(B, H, W, C)` map bottom/right so H and W are multiples; crop with `[:, :H, :W]`."""
    multiple_w = multiple_h if multiple_w is None else multiple_w
    H, W = x.shape[1], x.shape[2]
    pad_h, pad_w = -H % multiple_h, -W % multiple_w
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def valid_token_mask(height: int, width: int, padded_h: int, padded_w: int, device=None) -> torch.Tensor:
    """`(padded_h, padded_w)` bool map: True on real tokens, False on the padding `pad_to_multiple` added."""
    rows = torch.arange(padded_h, device=device) < height
    cols = torch.arange(padded_w, device=device) < width
    return rows[:, None] & cols[None, :]


# Option checks of every zoo family: one ValueError naming the mixer, the option and the valid range.


def check_size(mixer: str, option: str, value: object, minimum: int = 1, *, even: bool = False) -> None:
    """One ValueError unless `value` is an int >= `minimum` (a window, block, token count), even if asked."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (even and value % 2):
        kind = "an even integer" if even else "an integer"
        raise ValueError(f"mixer {mixer!r}: {option} must be {kind} >= {minimum}, got {value!r}")


def check_odd_size(mixer: str, option: str, value: object) -> None:
    """One ValueError unless `value` is an odd int >= 1 (a window centred on its query)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(
            f"mixer {mixer!r}: {option} must be an odd integer >= 1 (a window centred on the query), "
            f"got {value!r}"
        )


def check_positive(mixer: str, option: str, value: object) -> None:
    """One ValueError unless `value` is a real number > 0 (a temperature, a rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"mixer {mixer!r}: {option} must be a number > 0, got {value!r}")


def reject_unused(mixer: str, qk_scale: float | None = None, attn_drop: float = 0.0) -> None:
    """Refuse block options a mechanism has nothing to apply to (no q·k logits, no attention matrix)."""
    if qk_scale is not None:
        raise ValueError(
            f"mixer {mixer!r} has no q·k logits to scale: leave qk_scale=None (got {qk_scale!r})"
        )
    if attn_drop:
        raise ValueError(
            f"mixer {mixer!r} forms no attention matrix to drop out: use attn_drop=0.0 and proj_drop "
            f"instead (got attn_drop={attn_drop!r})"
        )


def learned_global_tokens(num_global: int, dim: int) -> nn.Parameter | None:
    """`(num_global, dim)` learned tokens (trunc-normal 0.02, as timm's class tokens); None for none."""
    if num_global == 0:
        return None
    tokens = nn.Parameter(torch.zeros(num_global, dim))
    nn.init.trunc_normal_(tokens, std=0.02)
    return tokens


def global_token_keys(
    mixer: QKVMixer, tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Let learned global tokens attend to every token, then give the keys/values they are attended by.

    tokens: `(G, C)`; k, v: the map's `(B, heads, N, head_dim)`. Each global token's query attends to
    all N tokens and the G global tokens (one SDPA, cost N*G); its update is added back through
    `mixer.proj` (a residual, as a transformer layer would), and the updated tokens are projected
    with `mixer.qkv`'s key/value rows. Returns keys, values `(B, heads, G, head_dim)`. Done per block
    (nothing carried between blocks), so the global tokens' pooling over the map reaches every query
    in the same block.
    """
    B, G, C = k.shape[0], tokens.shape[0], mixer.dim
    qg, kg, vg = mixer.qkv(tokens).reshape(G, 3, mixer.num_heads, mixer.head_dim).permute(1, 2, 0, 3)
    keys = torch.cat([k, kg.expand(B, -1, -1, -1)], dim=2)
    values = torch.cat([v, vg.expand(B, -1, -1, -1)], dim=2)
    pooled = F.scaled_dot_product_attention(
        qg.expand(B, -1, -1, -1), keys, values, dropout_p=mixer.dropout_p, scale=mixer.scale
    )
    updated = tokens + mixer.proj(pooled.transpose(1, 2).reshape(B, G, C))
    bias = mixer.qkv.bias[C:] if mixer.qkv.bias is not None else None
    kv = F.linear(updated, mixer.qkv.weight[C:], bias).reshape(B, G, 2, mixer.num_heads, mixer.head_dim)
    key, value = kv.permute(2, 0, 3, 1, 4).unbind(0)
    return key, value


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """SDPA of many small blocks: q `(*batch, L, D)`, k / v `(*batch, S, D)`, `mask` (bool, or a float
    bias with -inf) broadcastable to `(*batch, L, S)`.

    Runs as one 4-D call over the flattened batch: torch's fused CPU kernel takes 4-D inputs only,
    and beats the math path that 5-D inputs fall back to by ~2x forward+backward.
    """
    *batch, L, D = q.shape
    S = k.shape[-2]
    mask = mask.expand(*batch, mask.shape[-2], S).reshape(-1, 1, mask.shape[-2], S)
    out = F.scaled_dot_product_attention(
        q.reshape(-1, 1, L, D),
        k.reshape(-1, 1, S, D),
        v.reshape(-1, 1, S, v.shape[-1]),
        mask,
        dropout_p,
        scale=scale,
    )
    return out.view(*batch, L, v.shape[-1])
