"""Pure-PyTorch neighborhood attention: dense attention over halo tiles.

Queries are cut into `Th x Tw` tiles; every tile attends to the union of its queries' windows
(its halo, at most `(Th + k - 1) * (Tw + k - 1)` keys) through the CPU flash-attention kernel (SDPA
on CUDA), with an additive mask that holds each query's RPB inside its own window and -inf elsewhere.
That trades ~(Th + k - 1)(Tw + k - 1) / k^2 extra logits for dense matmuls and no k^2-fold copy of
K and V, and it runs (with autograd) wherever SDPA does. One difference from an exact-window backend:
a NaN / Inf key or value reaches every query of its tile's halo (a masked logit is still computed,
and NaN - inf is NaN), not only the queries whose windows hold it.

Dilation: each axis is reordered group-major (positions `g, g+d, ...` of group `g` made
contiguous), where every window is a contiguous run of k positions; tiles never straddle two
groups, so the halo bound above holds for any dilation and for maps not divisible by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .double_backward import refuse_double_backward
from .windows import geometry_cache, group_length


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


def default_tiles(height: int, width: int, kernel_size: int, dilation: int) -> tuple[int, int]:
    """Query tile (rows, cols), from CPU sweeps (single thread, B=8, fwd and fwd+bwd):

    * a dilation group of at most 2k positions runs fastest as one dense tile;
    * otherwise about k/2 rows by k columns (fewer wasted logits per query: 130 vs 169 at k=7):
      at 48^2 with k=11, 6x12 ran 40% faster than 11x11; at k=7 a loaded machine showed 4x7 10-18%
      ahead of 7x7 at 56^2 and 28^2, a quiet one every shape from 4x4 to 14x14 within 5%;
    * among sizes near those, the one that pads the group least (repeated queries are wasted work:
      at 28^2, 7 columns ran 25% faster than 8).
    """
    half = (kernel_size + 1) // 2

    def pick(length: int, preferred: int) -> int:
        longest_group = group_length(length, 0, dilation)
        if longest_group <= 2 * kernel_size:
            return longest_group
        candidates = [t for t in (preferred, preferred + 1, preferred - 1) if t >= 1]
        return min(candidates, key=lambda tile: math.ceil(longest_group / tile) * tile)

    return pick(height, half), pick(width, kernel_size)


@geometry_cache(maxsize=256)
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


@dataclass(frozen=True)
class PlaneTiling:
    """2-D tiling: indices into the flattened (H * W) map, tile-major, and the per-tile masks."""

    query_index: torch.Tensor  # (tiles * tq,) flat position of each query slot
    key_index: torch.Tensor  # (tiles * hk,) flat position of each halo slot
    output_index: torch.Tensor  # (H * W,) query slot holding each position's output
    outside_window: torch.Tensor  # (tiles, tq, hk) bool: key slot outside the query's window
    bias_index: torch.Tensor  # (tiles, tq, hk) flat index into rpb.flatten(1); 0 outside windows


def _outer(rows: torch.Tensor, cols: torch.Tensor, op) -> torch.Tensor:
    """(nh, a, b) x (nw, c, e) -> (nh * nw, a * c, b * e): tile (th, tw), slot (i, j) -> i * c + j."""
    nh, a, b = rows.shape
    nw, c, e = cols.shape
    return op(rows[:, None, :, None, :, None], cols[None, :, None, :, None, :]).reshape(nh * nw, a * c, b * e)


@geometry_cache(maxsize=128)
def plane_tiling(
    height: int, width: int, kernel_size: int, dilation: int, tile_h: int, tile_w: int, device: str
) -> PlaneTiling:
    rows = axis_tiling(height, kernel_size, dilation, tile_h)
    cols = axis_tiling(width, kernel_size, dilation, tile_w)

    def flat(row_index: torch.Tensor, col_index: torch.Tensor, rows_per_tile: int, cols_per_tile: int):
        grid = row_index.view(-1, 1, rows_per_tile, 1) * width + col_index.view(1, -1, 1, cols_per_tile)
        return grid.flatten()  # tile-major: (tile_row, tile_col, slot_row, slot_col)

    query_index = flat(rows.query_index, cols.query_index, rows.tile, cols.tile)
    key_index = flat(rows.key_index, cols.key_index, rows.halo, cols.halo)
    # Slot of position (r, c): tile (r_tile, c_tile), then (r_slot, c_slot) inside the tile.
    r_tile, r_slot = rows.output_index // rows.tile, rows.output_index % rows.tile
    c_tile, c_slot = cols.output_index // cols.tile, cols.output_index % cols.tile
    tiles_w, tq = cols.n_tiles, rows.tile * cols.tile
    output_index = (r_tile[:, None] * tiles_w + c_tile[None, :]) * tq + r_slot[:, None] * cols.tile + c_slot
    in_window = _outer(rows.in_window, cols.in_window, torch.logical_and)
    span = 2 * kernel_size - 1
    bias_index = _outer(rows.bias_index, cols.bias_index, lambda r, c: r * span + c)
    dev = torch.device(device)
    return PlaneTiling(
        query_index=query_index.to(dev),
        key_index=key_index.to(dev),
        output_index=output_index.flatten().to(dev),
        outside_window=(~in_window).to(dev),
        bias_index=torch.where(in_window, bias_index, 0).to(dev),
    )


class _CpuFlashHaloAttention(torch.autograd.Function):
    """CPU flash-attention forward with an additive mask that may need a gradient (the RPB).

    SDPA falls back to its unfused math path whenever the mask requires grad; the fused CPU kernel
    is ~3x faster forward. Backward recomputes the probabilities P from the saved logsumexp (nothing
    of size logits is kept between passes) and takes every gradient from them with five matmuls,
    dS = P * (dP - rowsum(dO * O)) serving q, k and the mask; measured ~15% faster than the fused
    backward plus a separate mask-gradient pass.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=mask, scale=scale
        )
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("torch")
        q, k, v, mask, out, lse = ctx.saved_tensors
        # In-place chains: each (B, heads*tiles, tq, hk) temporary is the size of the logits.
        probs = (q @ k.transpose(-1, -2)).mul_(ctx.scale).add_(mask).sub_(lse.unsqueeze(-1)).exp_()
        dv = probs.transpose(-1, -2) @ grad_out
        row = (grad_out * out).sum(-1, keepdim=True)
        dlogits = (grad_out @ v.transpose(-1, -2)).sub_(row).mul_(probs)
        dmask = dlogits.sum(0, keepdim=True) if ctx.needs_input_grad[3] else None
        dlogits.mul_(ctx.scale)
        return dlogits @ k, dlogits.transpose(-1, -2) @ q, dv, dmask, None


def _attend(q, k, v, mask, scale: float, attn_drop: float) -> torch.Tensor:
    if q.is_cuda or attn_drop > 0:
        # CUDA's memory-efficient kernel takes a mask gradient itself; dropout needs the SDPA path.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn_drop, scale=scale)
    return _CpuFlashHaloAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), mask, scale)


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
    tile_h, tile_w = (tile, tile) if tile else default_tiles(H, W, kernel_size, dilation)
    plane = plane_tiling(H, W, kernel_size, dilation, tile_h, tile_w, str(q.device))
    n_tiles, tq, hk = plane.outside_window.shape

    def gather(x: torch.Tensor, index: torch.Tensor, per_tile: int) -> torch.Tensor:
        # (B, H, W, heads, D) -> (B, heads, H*W, D) -> (B, heads * tiles, per_tile, D), one gather.
        x = x.reshape(B, H * W, heads, dim).transpose(1, 2)
        return x.index_select(2, index).view(B, heads * n_tiles, per_tile, dim)

    if rpb is None:
        bias = q.new_zeros(()).expand(heads, n_tiles, tq, hk)
    else:
        bias = rpb.to(q.dtype).flatten(1).index_select(1, plane.bias_index.flatten())
        bias = bias.view(heads, n_tiles, tq, hk)  # index_select: ~4x faster than [:, index] here
    # Additive 4-D mask (1, heads * tiles, tq, hk): the shape SDPA's fused kernels accept.
    mask = bias.masked_fill(plane.outside_window, float("-inf")).view(1, heads * n_tiles, tq, hk)
    out = _attend(
        gather(q, plane.query_index, tq),
        gather(k, plane.key_index, hk),
        gather(v, plane.key_index, hk),
        mask,
        scale,
        attn_drop,
    )
    # One gather straight into the caller's (B, H, W, heads, D) layout, contiguous.
    out = out.view(B, heads, n_tiles * tq, dim).transpose(1, 2).index_select(1, plane.output_index)
    return out.view(B, H, W, heads, dim)
