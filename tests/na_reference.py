"""Float64 reference neighborhood attention, written independently of models/layers.

Window starts follow natten's legacy CPU kernels (`get_window_start` / `get_pb_start` in
natten <= 0.14, the code the official NAT/DiNAT checkpoints were trained with), query by query.
"""

from __future__ import annotations

import torch


def natten_window_start(index: int, length: int, kernel_size: int, dilation: int) -> int:
    half = kernel_size // 2
    if dilation <= 1:
        return max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * half * dilation
        return a + imodd - kernel_size * dilation
    return index - half * dilation


def reference_na2d(q, k, v, kernel_size, dilation=1, rpb=None, scale=None):
    """Loops over queries in float64; returns float64 (B, H, W, heads, D)."""
    q, k, v = (t.double() for t in (q, k, v))
    B, H, W, heads, D = q.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    for i in range(H):
        si = natten_window_start(i, H, kernel_size, dilation)
        rows = [si + dilation * t for t in range(kernel_size)]
        for j in range(W):
            sj = natten_window_start(j, W, kernel_size, dilation)
            cols = [sj + dilation * t for t in range(kernel_size)]
            keys = k[:, rows][:, :, cols]  # (B, k, k, heads, D)
            vals = v[:, rows][:, :, cols]
            logits = torch.einsum("bhd,bxyhd->bhxy", q[:, i, j] * scale, keys)
            if rpb is not None:
                ri = [(r - i) // dilation + kernel_size - 1 for r in rows]
                rj = [(c - j) // dilation + kernel_size - 1 for c in cols]
                logits = logits + rpb.double()[:, ri][:, :, rj]
            attn = logits.flatten(2).softmax(-1).view_as(logits)
            out[:, i, j] = torch.einsum("bhxy,bxyhd->bhd", attn, vals)
    return out


def reference_attention_maps(q, k, kernel_size, dilation=1, rpb=None, scale=None):
    """Each query's NA weights spread over the whole map: float64 `(B, H, W, heads, H, W)`, zero
    outside the query's window (window and logits as in `reference_na2d`)."""
    q, k = q.double(), k.double()
    B, H, W, heads, D = q.shape
    scale = D**-0.5 if scale is None else scale
    maps = torch.zeros(B, H, W, heads, H, W, dtype=torch.float64)
    for i in range(H):
        si = natten_window_start(i, H, kernel_size, dilation)
        rows = [si + dilation * t for t in range(kernel_size)]
        for j in range(W):
            sj = natten_window_start(j, W, kernel_size, dilation)
            cols = [sj + dilation * t for t in range(kernel_size)]
            logits = torch.einsum("bhd,bxyhd->bhxy", q[:, i, j] * scale, k[:, rows][:, :, cols])
            if rpb is not None:
                ri = [(r - i) // dilation + kernel_size - 1 for r in rows]
                rj = [(c - j) // dilation + kernel_size - 1 for c in cols]
                logits = logits + rpb.double()[:, ri][:, :, rj]
            attn = logits.flatten(2).softmax(-1).view_as(logits)
            for a, r in enumerate(rows):
                maps[:, i, j, :, r, cols] = attn[:, :, a]
    return maps
