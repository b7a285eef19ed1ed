"""Pure-PyTorch neighborhood attention: dense attention over halo tiles.

Queries are cut into `T x T` tiles; every tile attends to the union of its queries' windows (its
halo, at most `(T + k - 1)^2` keys) through `scaled_dot_product_attention`, with an additive mask
that holds each query's RPB inside its own window and -inf elsewhere. That trades ~(T+k-1)^2 / k^2
extra logits for large dense matmuls and no k^2-fold copy of K and V, and it runs (with autograd)
wherever SDPA does.

Dilation: each axis is reordered group-major (positions `g, g+d, ...` of group `g` made
contiguous), where every window is a contiguous run of k positions; tiles never straddle two
groups, so the halo bound above holds for any dilation and for maps not divisible by it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .windows import group_length


@dataclass(frozen=True)
class AxisTiling:
    """Tiling of one axis. Positions are those of the original (not reordered) axis."""

    tile: int  # queries per tile
    halo: int  # keys per tile
    query_index: torch.Tensor  # (n_tiles * tile,) query position of each tiled slot
    key_index: torch.Tensor  # (n_tiles * halo,) key position of each halo slot
    output_index: torch.Tensor  # (length,) tiled slot holding each query's output
    in_window: torch.Tensor  # (n_tiles, tile, halo) bool: key slot inside the query's window
    bias_index: torch.Tensor  # (n_tiles, tile, halo) RPB row of each (query, key) pair; 0 outside

    @property
    def n_tiles(self) -> int:
        return self.in_window.shape[0]


def default_tile(length: int, kernel_size: int, dilation: int) -> int:
    """Query tile edge. Measured on CPU (scripts/bench_na.py --tiles): ~k+1 balances the halo's
    extra logits against the per-tile overhead; a group that a halo would nearly cover anyway is
    taken whole, since one dense tile beats several overlapping ones."""
    longest_group = group_length(length, 0, dilation)
    tile = kernel_size + 1
    return longest_group if tile + kernel_size - 1 >= longest_group else tile


@functools.lru_cache(maxsize=256)
def axis_tiling(length: int, kernel_size: int, dilation: int, tile: int) -> AxisTiling:
    groups = [torch.arange(g, length, dilation) for g in range(dilation)]
    order = torch.cat(groups)  # reordered slot -> original position
    longest_group = groups[0].numel()
    halo = min(tile + kernel_size - 1, longest_group)
    query_slots, key_slots, in_window, bias_index = [], [], [], []
    output_index = torch.empty(length, dtype=torch.long)
    group_offset = 0
    for members in groups:
        glen = members.numel()
        n_tiles = math.ceil(glen / tile)
        local = torch.arange(n_tiles * tile).clamp(max=glen - 1)  # pad the last tile with repeats
        starts = (local - kernel_size // 2).clamp(min=0).clamp(max=glen - kernel_size)
        first = starts.view(n_tiles, tile)[:, 0]
        halo_start = (group_offset + first).clamp(max=length - halo)  # in reordered slots
        halo_slots = halo_start[:, None] + torch.arange(halo)  # (n_tiles, halo)
        query_reordered = (group_offset + local).view(n_tiles, tile)
        window_start = (group_offset + starts).view(n_tiles, tile)
        rel = halo_slots[:, None, :] - query_reordered[:, :, None]  # (n_tiles, tile, halo)
        inside = (halo_slots[:, None, :] >= window_start[:, :, None]) & (
            halo_slots[:, None, :] < window_start[:, :, None] + kernel_size
        )
        tiles_before = sum(t.shape[0] for t in in_window)
        output_index[members] = tiles_before * tile + torch.arange(glen)
        query_slots.append(query_reordered.flatten())
        key_slots.append(halo_slots.flatten())
        in_window.append(inside)
        bias_index.append(torch.where(inside, rel + kernel_size - 1, 0))
        group_offset += glen
    return AxisTiling(
        tile=tile,
        halo=halo,
        query_index=order[torch.cat(query_slots)],
        key_index=order[torch.cat(key_slots)],
        output_index=output_index,
        in_window=torch.cat(in_window),
        bias_index=torch.cat(bias_index),
    )


@functools.lru_cache(maxsize=128)
def plane_tiling(
    height: int, width: int, kernel_size: int, dilation: int, tile_h: int, tile_w: int, device: str
) -> tuple[AxisTiling, AxisTiling, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    rows = axis_tiling(height, kernel_size, dilation, tile_h)
    cols = axis_tiling(width, kernel_size, dilation, tile_w)
    shape = (rows.n_tiles * cols.n_tiles, rows.tile * cols.tile, rows.halo * cols.halo)

    def outer(a: torch.Tensor, b: torch.Tensor, op) -> torch.Tensor:
        # (nh, th, hh) x (nw, tw, hw) -> (nh, nw, th, tw, hh, hw) -> (tiles, tq, hk)
        return op(a[:, None, :, None, :, None], b[None, :, None, :, None, :]).reshape(shape)

    in_window = outer(rows.in_window, cols.in_window, torch.logical_and)
    span = 2 * kernel_size - 1
    bias_index = outer(rows.bias_index, cols.bias_index, lambda r, c: r * span + c)
    bias_index = torch.where(in_window, bias_index, 0)
    indices = (
        rows.query_index,
        cols.query_index,
        rows.key_index,
        cols.key_index,
        rows.output_index,
        cols.output_index,
    )
    dev = torch.device(device)
    return rows, cols, in_window.to(dev), bias_index.to(dev), tuple(t.to(dev) for t in indices)


def _gather_tiles(x: torch.Tensor, row_index, col_index, rows: int, cols: int) -> torch.Tensor:
    """(B, H, W, heads, D) -> (B, heads * tiles, rows * cols, D) gathered at the given positions."""
    B, _, _, heads, dim = x.shape
    x = x.index_select(1, row_index).index_select(2, col_index)
    nh, nw = row_index.numel() // rows, col_index.numel() // cols
    x = x.view(B, nh, rows, nw, cols, heads, dim).permute(0, 5, 1, 3, 2, 4, 6)
    return x.reshape(B, heads * nh * nw, rows * cols, dim)


def na2d_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int,
    rpb: torch.Tensor | None,
    scale: float,
    attn_drop: float,
    tile: int | None = None,
) -> torch.Tensor:
    B, H, W, heads, dim = q.shape
    tile_h = tile or default_tile(H, kernel_size, dilation)
    tile_w = tile or default_tile(W, kernel_size, dilation)
    rows, cols, in_window, bias_index, indices = plane_tiling(
        H, W, kernel_size, dilation, tile_h, tile_w, str(q.device)
    )
    q_rows, q_cols, k_rows, k_cols, out_rows, out_cols = indices
    qt = _gather_tiles(q, q_rows, q_cols, rows.tile, cols.tile)
    kt = _gather_tiles(k, k_rows, k_cols, rows.halo, cols.halo)
    vt = _gather_tiles(v, k_rows, k_cols, rows.halo, cols.halo)
    n_tiles = in_window.shape[0]
    if rpb is None:
        mask = in_window.expand(heads, *in_window.shape).reshape(heads * n_tiles, *in_window.shape[1:])
    else:
        bias = rpb.to(q.dtype).flatten(1)[:, bias_index]  # (heads, tiles, tq, hk)
        mask = bias.masked_fill(~in_window, float("-inf")).reshape(heads * n_tiles, *in_window.shape[1:])
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=attn_drop, scale=scale)
    nh, nw = rows.n_tiles, cols.n_tiles
    out = out.view(B, heads, nh, nw, rows.tile, cols.tile, dim).permute(0, 2, 4, 3, 5, 1, 6)
    out = out.reshape(B, nh * rows.tile, nw * cols.tile, heads, dim)
    return out.index_select(1, out_rows).index_select(2, out_cols)
