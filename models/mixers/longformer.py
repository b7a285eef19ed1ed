"""Neighborhood attention with learned global tokens (`global`), and Longformer's mix of local,
dilated and global attention across heads (`longformer`).

The neighbourhood part gathers each query's k*k keys (NA's windows, `models.layers` geometry) so
that one softmax spans the neighbourhood and the global tokens together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..layers.backends.windows import bias_indices, geometry_cache, window_indices
from . import register_mixer
from .common import QKVMixer, check_odd_size, check_size, global_token_keys, learned_global_tokens


@geometry_cache(maxsize=64)
def _neighborhood_geometry(height: int, width: int, kernel_size: int, dilation: int, device: str):
    """Flat key index, real-key mask and flat RPB index of each query's NA window, each `(N, k*k)`.

    Windows are NA's (clamped inside the map, within the dilation group) on the map zero-padded
    bottom/right to at least `kernel_size * dilation`; keys on that padding are masked out.
    """
    window = kernel_size * dilation
    Hp, Wp = max(height, window), max(width, window)
    rows = window_indices(Hp, kernel_size, dilation)[:height, None, :, None]  # (H, 1, k, 1)
    cols = window_indices(Wp, kernel_size, dilation)[None, :width, None, :]  # (1, W, 1, k)
    real = (rows < height) & (cols < width)
    index = torch.where(real, rows * width + cols, 0)
    span = 2 * kernel_size - 1
    bias = (
        bias_indices(Hp, kernel_size, dilation)[:height, None, :, None] * span
        + bias_indices(Wp, kernel_size, dilation)[None, :width, None, :]
    )
    return tuple(t.flatten(2).flatten(0, 1).to(device) for t in (index, real, bias))


@register_mixer("global")
class GlobalNeighborhoodAttention(QKVMixer):
    """Neighborhood attention plus `num_global` learned global tokens (Vision Longformer's pattern).

    A query at `(i, j)` attends, in one softmax, to the k x k keys of its NA window (NA's windows:
    clamped inside the map; on a map smaller than the window the window covers the whole map, the
    padding masked out, never attended) and to the `num_global` global tokens. The global tokens
    attend to every token of the map and to each other (`common.global_token_keys`); the keys and
    values the map then attends to are those of the updated global tokens. Learned per block, not
    carried across blocks or stages. With `rel_pos_bias`, NA's RPB on the window keys (none on the
    global ones). Cost: k*k + num_global keys per query, N + num_global per global token.
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

    def _windows(self, q, k, v, height: int, width: int):
        """Logits (masked), values of each query's window: `(B, heads, N, k*k)`, `(B, heads, N, k*k, D)`."""
        logits, values, first = [], [], 0
        for dilation in sorted(set(self.head_dilations), key=self.head_dilations.index):
            heads = slice(first, first + self.head_dilations.count(dilation))
            first = heads.stop
            index, real, bias = _neighborhood_geometry(
                height, width, self.kernel_size, dilation, str(q.device)
            )
            keys = k[:, heads, index]  # (B, h, N, k*k, D): the gather, k*k per query
            group = ((q[:, heads] * self.scale).unsqueeze(-2) @ keys.transpose(-1, -2)).squeeze(-2)
            if self.rpb is not None:
                group = group + self.rpb[heads].to(q.dtype).flatten(1)[:, bias]
            logits.append(group.masked_fill(~real, float("-inf")))
            values.append(v[:, heads, index])
        return torch.cat(logits, 1), torch.cat(values, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = (t.flatten(2, 3) for t in self.split_heads(x))  # (B, heads, N, D)
        logits, values = self._windows(q, k, v, H, W)
        window = logits.shape[-1]
        if self.global_tokens is not None:
            global_k, global_v = global_token_keys(self, self.global_tokens, k, v)
            logits = torch.cat([logits, (q * self.scale) @ global_k.transpose(-1, -2)], dim=-1)
        attn = F.dropout(logits.softmax(dim=-1), self.dropout_p)
        out = (attn[..., None, :window] @ values).squeeze(-2)
        if self.global_tokens is not None:
            out = out + attn[..., window:] @ global_v
        return self.merge_heads(out.unflatten(2, (H, W)))

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
    dilated head. Cost: k*k + num_global keys per query.
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
