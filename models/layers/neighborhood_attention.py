"""`NeighborhoodAttention2D`: the NA block used by NAT and DiNAT.

Parameter names (`qkv`, `rpb`, `proj`) and the qkv channel layout `(3, heads, head_dim)` are those
of the official NAT/DiNAT repositories, so their checkpoints load without renaming inside a block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from .backends.naive import na2d_naive
from .functional import check_window, neighborhood_attention_2d_qkvpacked, neighborhood_attention_weights

# FX (torchvision's create_feature_extractor, timm's FX features) records the operator as one call
# and runs it eagerly: its validation and backend dispatch branch on shapes and flags.
torch.fx.wrap("neighborhood_attention_2d_qkvpacked")


@torch.fx.wrap
def pad_to_window(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Zero-pad `(B, H, W, C)` right/bottom to at least `window_size` on both spatial axes.

    With symbolic sizes (torch.export / ONNX with dynamic H, W) the amounts are computed in the graph
    and applied even when 0, so one graph serves maps smaller and larger than the window. Under
    torch.jit.trace sizes are tensors that `sym_max` refuses: a traced graph keeps its input's size.
    """
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        pad_b, pad_r = max(0, window_size - int(x.shape[1])), max(0, window_size - int(x.shape[2]))
    else:
        pad_b, pad_r = torch.sym_max(0, window_size - x.shape[1]), torch.sym_max(0, window_size - x.shape[2])
    if isinstance(pad_b, int) and isinstance(pad_r, int) and pad_b == 0 and pad_r == 0:
        return x
    return F.pad(x, (0, 0, 0, pad_r, 0, pad_b))


class NeighborhoodAttention2D(nn.Module):
    """Multi-head 2-D neighborhood attention over a channels-last map `(B, H, W, C)`.

    Maps smaller than the window (`kernel_size * dilation`) are zero-padded right/bottom *before*
    the qkv projection (padded tokens carry the projection bias), attended, then cropped before
    `proj`: what natten 0.14's module did under the official NAT repo, so official checkpoints give
    the same outputs at any resolution.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rel_pos_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        check_window(kernel_size, dilation)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.window_size = kernel_size * dilation
        self.scale = qk_scale or self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """qkv `(B, Hp, Wp, 3, heads, head_dim)` of `x` padded to the window."""
        x = pad_to_window(x, self.window_size)
        B, Hp, Wp, _ = x.shape
        return self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self._qkv(x)
        attn_drop = self.attn_drop if self.training else 0.0
        if torch.jit.is_scripting():
            # TorchScript can't follow the dispatcher; the gather path is plain ATen ops (exact)
            q, k, v = qkv.unbind(3)
            x = na2d_naive(q, k, v, self.kernel_size, self.dilation, self.rpb, self.scale, attn_drop)
        else:
            x = neighborhood_attention_2d_qkvpacked(
                qkv,
                self.kernel_size,
                dilation=self.dilation,
                rpb=self.rpb,
                scale=self.scale,
                attn_drop=attn_drop,
                backend=self.backend,
            )
        x = x.reshape(B, qkv.shape[1], qkv.shape[2], C)[:, :H, :W]
        return self.proj_drop(self.proj(x))

    @torch.jit.ignore
    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """NA weights `(B, H, W, heads, k, k)` of each query of `x` `(B, H, W, C)` (no dropout).

        Indexed as `neighborhood_attention_weights`' on the padded map (`H, W` at least the window;
        the window positions are `windows.window_indices` of the padded sizes), queries cropped to x's.
        """
        q, k, v = self._qkv(x).unbind(3)
        weights = neighborhood_attention_weights(
            q, k, v, self.kernel_size, dilation=self.dilation, rpb=self.rpb, scale=self.scale
        )
        return weights[:, : x.shape[1], : x.shape[2]]

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, rel_pos_bias={self.rpb is not None}, backend={self.backend}"
        )
