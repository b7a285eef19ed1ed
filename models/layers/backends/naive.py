"""Naive neighborhood attention: gather each query's k*k keys and values, attend with matmuls.

Memory-hungry (k^2 copies of K and V) and slow, but it does exactly the paper's arithmetic (k^2
logits per query), so FLOP counting runs through it, and the benchmark uses it as the baseline.
It is also the portable path: plain tensor ops whose window indices come from arithmetic on the
map's shape, so it scripts (TorchScript), exports with symbolic H, W (ONNX: Gather, MatMul, Softmax)
and hands back the attention weights (`naive_attention`) for visualisation.
"""

from __future__ import annotations

import torch

from .windows import axis_indices


def _plane_indices(
    height: int, width: int, kernel_size: int, dilation: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key rows `(H, 1, k, 1)` and columns `(1, W, 1, k)` of each query's window, and the flat RPB
    index `(H, W, k*k)` of each (query, key) pair. Built per call (microseconds next to the gather),
    not cached: a cache keyed on sizes would pin them, and symbolic sizes can't key one."""
    rows, row_bias = axis_indices(height, kernel_size, dilation)  # (H, k) each
    cols, col_bias = axis_indices(width, kernel_size, dilation)  # (W, k) each
    bias = row_bias[:, None, :, None] * (2 * kernel_size - 1) + col_bias[None, :, None, :]  # (H, W, k, k)
    return rows[:, None, :, None].to(device), cols[None, :, None, :].to(device), bias.flatten(2).to(device)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int,
    rpb: torch.Tensor | None,
    scale: float,
    attn_drop: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output `(B, H, W, heads, D)` and attention weights `(B, H, W, heads, k*k)` (before dropout);
    weight `a * k + b` is the key at (`rows[i, a]`, `cols[j, b]`) of `windows.window_indices`."""
    B, H, W, heads, dim = q.shape
    rows, cols, bias_index = _plane_indices(H, W, kernel_size, dilation, q.device)
    # (B, H, W, k, k, heads, D) -> (B, H, W, heads, k*k, D)
    keys = k[:, rows, cols].flatten(3, 4).transpose(3, 4)
    values = v[:, rows, cols].flatten(3, 4).transpose(3, 4)
    logits = (q.unsqueeze(-2) * scale) @ keys.transpose(-1, -2)  # (B, H, W, heads, 1, k*k)
    if rpb is not None:
        # (heads, H, W, k*k), gathered before the cast: the gradient's scatter-add stays in rpb's dtype
        bias = rpb.flatten(1)[:, bias_index].to(q.dtype)
        logits = logits + bias.permute(1, 2, 0, 3).unsqueeze(-2)
    attn = logits.softmax(dim=-1)
    weights = attn.squeeze(-2)
    if attn_drop > 0:
        attn = torch.nn.functional.dropout(attn, attn_drop)
    return (attn @ values).squeeze(-2), weights


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
    return naive_attention(q, k, v, kernel_size, dilation, rpb, scale, attn_drop)[0]
