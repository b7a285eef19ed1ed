"""FlexAttention neighborhood attention: a block mask for the neighbourhood, `score_mod` for RPB.

On CUDA this is a fused kernel with autograd (training with RPB). Without compilation (CPU) flex
runs its reference path, which materialises full (HW x HW) scores: fine for inference on small maps.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .windows import geometry_cache, window_starts


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@geometry_cache(maxsize=64)
def _geometry(height: int, width: int, kernel_size: int, dilation: int, device: str):
    dev = torch.device(device)
    return window_starts(height, kernel_size, dilation).to(dev), window_starts(
        width, kernel_size, dilation
    ).to(dev)


@geometry_cache(maxsize=64)
def _block_mask(height: int, width: int, kernel_size: int, dilation: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = _mask_mod(height, width, kernel_size, dilation, device)
    n = height * width
    # Compiled on CUDA: eager create_block_mask evaluates the mask over all n x n pairs (4.3e9 at a
    # 1024 px input's 256 x 256 map), compiled it works block by block.
    compiled = torch.device(device).type == "cuda"
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device, _compile=compiled)


def _mask_mod(height: int, width: int, kernel_size: int, dilation: int, device: str):
    row_start, col_start = _geometry(height, width, kernel_size, dilation, device)
    span = dilation * (kernel_size - 1)

    def mask_mod(b, h, q_idx, kv_idx):
        qr, qc = q_idx // width, q_idx % width
        kr, kc = kv_idx // width, kv_idx % width
        dr, dc = kr - row_start[qr], kc - col_start[qc]
        rows_ok = (dr >= 0) & (dr <= span) & (dr % dilation == 0)
        cols_ok = (dc >= 0) & (dc <= span) & (dc % dilation == 0)
        return rows_ok & cols_ok

    return mask_mod


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Eager flex materialises the full score matrix; compiled, it is a fused block-sparse kernel.
    return torch.compile(flex_attention, dynamic=False)


def na2d_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int,
    rpb: torch.Tensor | None,
    scale: float,
    attn_drop: float,
) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    attend = _compiled_flex_attention() if q.is_cuda else flex_attention
    B, H, W, heads, dim = q.shape
    device = str(q.device)
    block_mask = _block_mask(H, W, kernel_size, dilation, device)
    score_mod = None
    if rpb is not None:
        bias = rpb.to(q.dtype)
        last = 2 * kernel_size - 2

        def score_mod(score, b, h, q_idx, kv_idx):
            dr = (kv_idx // W - q_idx // W) // dilation + kernel_size - 1
            dc = (kv_idx % W - q_idx % W) // dilation + kernel_size - 1
            return score + bias[h, dr.clamp(0, last), dc.clamp(0, last)]

    def to_seq(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(B, H * W, heads, dim).transpose(1, 2)

    with warnings.catch_warnings():
        # Off CUDA the unfused path is the intended one (see module docstring); don't warn about it.
        # On CUDA the warning stays: it means the compiled kernel was given up (e.g. dynamo's
        # recompile limit after many shapes) and full score matrices are being built.
        if not q.is_cuda:
            warnings.filterwarnings("ignore", message=".*without torch.compile")
        out = attend(to_seq(q), to_seq(k), to_seq(v), score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out.transpose(1, 2).reshape(B, H, W, heads, dim)
