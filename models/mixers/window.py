"""Blocked local attention: Swin's non-overlapping windows (W-MSA, shifted SW-MSA) and HaloNet's
blocked queries with a halo of keys. Both run one SDPA per window / block with a small mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.swin_transformer import window_partition, window_reverse

from ..layers.backends.windows import geometry_cache
from . import register_mixer
from .common import QKVMixer, blocked_attention, check_size, pad_to_multiple


def _axis_windows(length: int, window: int, shift: int) -> tuple[int, int, torch.Tensor]:
    """Swin's per-axis rule: a map no longer than the window is one window with no shift.

    Returns (window, shift, group): `group[p]` numbers the window of padded position p in the map's
    own (unrolled) coordinates, so two tokens attend to each other iff their groups match on both
    axes. With a shift s the window edges sit at s, s + w, ...: cyclically shifting by -s and
    masking the wrapped-around regions (Swin's mask) gives exactly these groups.
    """
    if length <= window:
        window, shift = length, 0
    padded = -(-length // window) * window
    return window, shift, (torch.arange(padded) + window - shift) // window


def _relative_index(rows: torch.Tensor, cols: torch.Tensor, span: int) -> torch.Tensor:
    """Flat index into a `(span, span)` bias table of key-minus-query offsets, centre at span // 2.

    rows, cols: `(Lq, Lk)` offsets key - query on each axis.
    """
    return (rows + span // 2) * span + cols + span // 2


@geometry_cache(maxsize=64)
def _window_geometry(height: int, width: int, window_size: int, shift: int, device: str):
    """Window sizes, shifts, the `(num_windows, 1, L, L)` allowed-pairs mask and the `(L, L)` RPB index."""
    wh, sh, groups_h = _axis_windows(height, window_size, shift)
    ww, sw, groups_w = _axis_windows(width, window_size, shift)
    group = groups_h[:, None] * (len(groups_w) + 1) + groups_w[None, :]
    valid = (torch.arange(len(groups_h)) < height)[:, None] & (torch.arange(len(groups_w)) < width)[None, :]
    # lay the maps out as the tokens: rolled by (-sh, -sw), then cut into windows of L tokens
    maps = torch.stack([group, valid.long()], -1).roll((-sh, -sw), (0, 1))
    group, valid = window_partition(maps[None], (wh, ww)).flatten(1, 2).unbind(-1)  # (num_windows, L)
    L = wh * ww
    # a padded query whose group holds only padding keeps itself: no fully masked row
    allowed = (group[:, :, None] == group[:, None, :]) & (
        valid[:, None, :].bool() | torch.eye(L, dtype=torch.bool)
    )
    yy, xx = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    rel = _relative_index(yy[None, :] - yy[:, None], xx[None, :] - xx[:, None], 2 * window_size - 1)
    return (wh, ww), (sh, sw), allowed[:, None].to(device), rel.to(device)


def _bias_table(num_heads: int, span: int, enabled: bool) -> torch.nn.Parameter | None:
    if not enabled:
        return None
    table = torch.nn.Parameter(torch.zeros(num_heads, span, span))
    trunc_normal_(table, std=0.02)
    return table


def _attn_mask(rpb: torch.Tensor | None, rel: torch.Tensor, allowed: torch.Tensor, dtype) -> torch.Tensor:
    """SDPA mask: the bool `allowed` pattern, plus the RPB bias (masked pairs -inf) when there is one."""
    if rpb is None:
        return allowed
    bias = rpb.to(dtype).flatten(1)[:, rel]  # (heads, Lq, Lk)
    return bias.masked_fill(~allowed, float("-inf"))


@register_mixer("window")
class WindowAttention2D(QKVMixer):
    """Swin's W-MSA: attention inside non-overlapping `window_size x window_size` windows.

    Windows tile the map from the top-left; a query at `(i, j)` attends to the tokens `(y, x)` with
    `y // w == i // w` and `x // w == j // w` (w = window_size). A map not divisible by w is
    zero-padded bottom/right and the padding masked out of the keys; an axis no longer than w is
    one window (Swin's rule). With `rel_pos_bias` (Swin's RPB), a learned per-head bias
    `rpb[h, dy + w - 1, dx + w - 1]` for the key offset `(dy, dx)` from the query.
    Cost: w*w keys per query.
    """

    registered_name = "window"  # for error messages
    shift_size = 0

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int = 7,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        check_size(type(self).registered_name, "window_size", window_size)
        self.window_size = window_size
        self.rpb = _bias_table(num_heads, 2 * window_size - 1, rel_pos_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        (wh, ww), (sh, sw), allowed, rel = _window_geometry(
            H, W, self.window_size, self.shift_size, str(x.device)
        )
        x = pad_to_multiple(x, wh, ww)
        Hp, Wp = x.shape[1:3]
        if sh or sw:
            x = torch.roll(x, (-sh, -sw), (1, 2))
        windows = window_partition(self.qkv(x), (wh, ww))  # (B * num_windows, wh, ww, 3C)
        q, k, v = windows.reshape(B, -1, wh * ww, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        mask = _attn_mask(self.rpb, rel, allowed, q.dtype)
        out = blocked_attention(q, k, v, mask, self.dropout_p, self.scale)
        x = window_reverse(out.transpose(2, 3).reshape(-1, wh, ww, C), (wh, ww), Hp, Wp)
        if sh or sw:
            x = torch.roll(x, (sh, sw), (1, 2))
        return self.proj_drop(self.proj(x[:, :H, :W]))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, window_size={self.window_size}, shift_size={self.shift_size}, "
            f"rel_pos_bias={self.rpb is not None}"
        )


@register_mixer("shifted_window")
class ShiftedWindowAttention2D(WindowAttention2D):
    """Swin's SW-MSA: W-MSA with the window grid shifted by `s = window_size // 2`.

    A query at `(i, j)` attends to the tokens `(y, x)` with `(y + w - s) // w == (i + w - s) // w`
    and the same on the other axis: windows with edges at s, s + w, ... (narrower windows along the
    top/left and bottom/right borders). Computed as Swin does: roll the padded map by -s, partition,
    mask the pairs that the roll brought together from opposite borders, roll back. An axis no
    longer than w is one unshifted window; padding and RPB as in `window`. Cost: w*w keys per query.
    """

    registered_name = "shifted_window"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int = 7,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(
            dim,
            num_heads,
            window_size=window_size,
            rel_pos_bias=rel_pos_bias,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.shift_size = window_size // 2


@geometry_cache(maxsize=64)
def _halo_geometry(height: int, width: int, block_size: int, halo: int, device: str):
    """Block sizes, the `(num_blocks, 1, 1, S)` real-key mask and the `(L, S)` RPB index."""
    bh, bw = min(block_size, height), min(block_size, width)
    Hp, Wp = -(-height // bh) * bh, -(-width // bw) * bw
    real = torch.zeros(Hp + 2 * halo, Wp + 2 * halo, dtype=torch.bool)
    real[halo : halo + height, halo : halo + width] = True
    kh, kw = bh + 2 * halo, bw + 2 * halo
    valid = real.unfold(0, kh, bh).unfold(1, kw, bw).flatten(0, 1).flatten(1)  # (num_blocks, S)
    qy, qx = (t.flatten() for t in torch.meshgrid(torch.arange(bh), torch.arange(bw), indexing="ij"))
    ky, kx = (t.flatten() for t in torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij"))
    span = 2 * (block_size + halo) - 1
    rel = _relative_index(ky[None, :] - halo - qy[:, None], kx[None, :] - halo - qx[:, None], span)
    return (bh, bw), valid[:, None, None].to(device), rel.to(device)


@register_mixer("halo")
class HaloAttention2D(QKVMixer):
    """HaloNet's blocked local attention (Vaswani et al. 2021; timm's `HaloAttn`), 2-D, stride 1.

    Queries are cut into `block_size x block_size` blocks (b); every query of the block at
    `(bi, bj)` attends to the tokens `(y, x)` of the map with `bi*b - halo <= y < (bi+1)*b + halo`
    and the same on x: its block plus a `halo`-wide ring. A map not divisible by b is zero-padded
    bottom/right; the padding and the ring outside the map are masked out of the keys (timm's
    `HaloAttn` attends to them as zeros); an axis shorter than b is one block. With `rel_pos_bias`,
    a learned per-head bias `rpb[h, dy + b + halo - 1, dx + b + halo - 1]` for the key offset
    `(dy, dx)` (timm uses factorized relative logits instead). Cost: (b + 2 halo)^2 keys per query.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        block_size: int = 7,
        halo: int = 3,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        check_size("halo", "block_size", block_size)
        check_size("halo", "halo", halo, minimum=0)
        self.block_size = block_size
        self.halo = halo
        self.rpb = _bias_table(num_heads, 2 * (block_size + halo) - 1, rel_pos_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        (bh, bw), valid, rel = _halo_geometry(H, W, self.block_size, self.halo, str(x.device))
        q, k, v = self.split_heads(pad_to_multiple(x, bh, bw))  # (B, heads, Hp, Wp, D)
        Hp, Wp = q.shape[2:4]
        nh, nw, h = Hp // bh, Wp // bw, self.halo
        q = q.reshape(B, self.num_heads, nh, bh, nw, bw, -1).permute(0, 2, 4, 1, 3, 5, 6).flatten(4, 5)
        q = q.flatten(1, 2)  # (B, num_blocks, heads, L, D)

        def haloed(t: torch.Tensor) -> torch.Tensor:  # (B, num_blocks, heads, S, D)
            t = F.pad(t, (0, 0, h, h, h, h)).unfold(2, bh + 2 * h, bh).unfold(3, bw + 2 * h, bw)
            return t.permute(0, 2, 3, 1, 5, 6, 4).flatten(4, 5).flatten(1, 2)

        mask = _attn_mask(self.rpb, rel, valid, q.dtype)
        out = blocked_attention(q, haloed(k), haloed(v), mask, self.dropout_p, self.scale)
        out = out.unflatten(1, (nh, nw)).unflatten(-2, (bh, bw))  # (B, nh, nw, heads, bh, bw, D)
        out = out.permute(0, 3, 1, 4, 2, 5, 6).reshape(B, self.num_heads, Hp, Wp, -1)
        return self.merge_heads(out[:, :, :H, :W])

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, block_size={self.block_size}, halo={self.halo}, "
            f"rel_pos_bias={self.rpb is not None}"
        )
