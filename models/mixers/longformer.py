"""Neighborhood attention with learned global tokens (`global`), and Longformer's mix of local,
dilated and global attention across heads (`longformer`).

One softmax spans each query's NA window (`models.layers` geometry) and the global tokens, so the
NA operator (which returns no logsumexp to merge with) is not used: the windows run blocked
(`common.blocked_window_attention`), each block of `QUERY_BLOCK`^2 queries of one dilation group
against the union of its windows plus the global tokens.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_

from ..layers.backends.windows import bias_indices, window_indices
from . import register_mixer
from .common import (
    QUERY_BLOCK,
    QKVMixer,
    blocked_window_attention,
    check_odd_size,
    check_size,
    global_token_keys,
    learned_global_tokens,
)


def na_windows(length: int, kernel_size: int, dilation: int):
    """One axis of NA's windows (`common.blocked_window_attention`): clamped inside the axis within the
    dilation group, on the axis zero-padded to at least `kernel_size * dilation` (keys on that
    padding are not real keys); RPB row as NA's."""
    padded = max(length, kernel_size * dilation)
    keys = window_indices(padded, kernel_size, dilation)[:length]
    return keys, keys < length, bias_indices(padded, kernel_size, dilation)[:length], dilation


@register_mixer("global")
class GlobalNeighborhoodAttention(QKVMixer):
    """Neighborhood attention plus `num_global` learned global tokens (Vision Longformer's pattern).

    A query at `(i, j)` attends, in one softmax, to the k x k keys of its NA window (NA's windows:
    clamped inside the map; on a map smaller than the window the window covers the whole map, the
    padding masked out, never attended) and to the `num_global` global tokens. The global tokens
    attend to every token of the map and to each other (`common.global_token_keys`); the keys and
    values the map then attends to are those of the updated global tokens. Learned per block, not
    carried across blocks or stages. With `rel_pos_bias`, NA's RPB on the window keys (none on the
    global ones). Cost: N + num_global keys per global token; per query (QUERY_BLOCK + k - 1)^2
    window logits computed (blocked), k^2 of them unmasked, + num_global.
    """

    registered_name = "global"  # for error messages

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kernel_size: int = 7,
        num_global: int = 1,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        name = self.registered_name
        check_odd_size(name, "kernel_size", kernel_size)
        check_size(name, "num_global", num_global, minimum=1 if name == "global" else 0)
        self.kernel_size = kernel_size
        self.num_global = num_global
        self.head_dilations = (1,) * num_heads
        self.global_tokens = learned_global_tokens(num_global, dim)
        if rel_pos_bias:
            self.rpb = torch.nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            trunc_normal_(self.rpb, std=0.02)
        else:
            self.register_parameter("rpb", None)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"global_tokens"} if self.global_tokens is not None else set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)  # (B, heads, H, W, D)
        global_k = global_v = None
        if self.global_tokens is not None:
            global_k, global_v = global_token_keys(self, self.global_tokens, k.flatten(2, 3), v.flatten(2, 3))
        out, first = [], 0
        for dilation in sorted(set(self.head_dilations), key=self.head_dilations.index):
            heads = slice(first, first + self.head_dilations.count(dilation))
            first = heads.stop
            out.append(
                blocked_window_attention(
                    q[:, heads],
                    k[:, heads],
                    v[:, heads],
                    (na_windows, self.kernel_size, dilation),
                    QUERY_BLOCK,
                    self.rpb[heads] if self.rpb is not None else None,
                    global_k[:, heads] if global_k is not None else None,
                    global_v[:, heads] if global_v is not None else None,
                    self.dropout_p,
                    self.scale,
                )
            )
        return self.merge_heads(torch.cat(out, 1))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kernel_size={self.kernel_size}, head_dilations={self.head_dilations}, "
            f"num_global={self.num_global}, rel_pos_bias={self.rpb is not None}"
        )


@register_mixer("longformer")
class LongformerAttention(GlobalNeighborhoodAttention):
    """Longformer (Beltagy et al. 2020) in 2-D: local, dilated and global attention across heads.

    The first `ceil(heads / 2)` heads attend to their NA window (dilation 1), the other
    `heads // 2` to their dilated NA window (`dilation` apart, DiNA's windows); every head's
    queries also attend to the `num_global` global tokens, which attend to every token. Windows,
    padding, global tokens and RPB exactly as in `global` (see there). With one head there is no
    dilated head. Cost as in `global`.
    """

    registered_name = "longformer"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kernel_size: int = 7,
        dilation: int = 2,
        num_global: int = 1,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(
            dim,
            num_heads,
            kernel_size=kernel_size,
            num_global=num_global,
            rel_pos_bias=rel_pos_bias,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        check_size("longformer", "dilation", dilation)
        self.head_dilations = (1,) * (num_heads - num_heads // 2) + (dilation,) * (num_heads // 2)
