"""Naive neighborhood attention: gather each query's k*k keys and values, attend with matmuls.

Memory-hungry (k^2 copies of K and V) and slow, but it does exactly the paper's arithmetic (k^2
logits per query), so FLOP counting runs through it, and the benchmark uses it as the baseline.
"""

from __future__ import annotations

import torch

from .windows import bias_indices, geometry_cache, window_indices


@geometry_cache(maxsize=128)
def _plane_indices(height: int, width: int, kernel_size: int, dilation: int, device: str):
    dev = torch.device(device)
    rows = window_indices(height, kernel_size, dilation)  # (H, k)
    cols = window_indices(width, kernel_size, dilation)  # (W, k)
    span = 2 * kernel_size - 1
    bias = (
        bias_indices(height, kernel_size, dilation)[:, None, :, None] * span
        + bias_indices(width, kernel_size, dilation)[None, :, None, :]
    )  # (H, W, k, k) flat RPB index
    return (
        rows[:, None, :, None].to(dev),
        cols[None, :, None, :].to(dev),
        bias.flatten(2).to(dev),
    )


def na2d_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int,
    rpb: torch.Tensor | None,
    scale: float,
    attn_drop: float,
) -> torch.Tensor:
    B, H, W, heads, dim = q.shape
    rows, cols, bias_index = _plane_indices(H, W, kernel_size, dilation, str(q.device))
    # (B, H, W, k, k, heads, D) -> (B, H, W, heads, k*k, D)
    keys = k[:, rows, cols].flatten(3, 4).transpose(3, 4)
    values = v[:, rows, cols].flatten(3, 4).transpose(3, 4)
    logits = (q.unsqueeze(-2) * scale) @ keys.transpose(-1, -2)  # (B, H, W, heads, 1, k*k)
    if rpb is not None:
        bias = rpb.to(q.dtype).flatten(1)[:, bias_index]  # (heads, H, W, k*k)
        logits = logits + bias.permute(1, 2, 0, 3).unsqueeze(-2)
    attn = logits.softmax(dim=-1)
    if attn_drop:
        attn = torch.nn.functional.dropout(attn, attn_drop)
    return (attn @ values).squeeze(-2)
