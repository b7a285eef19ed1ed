"""A NAT block's LayerNorm and drop-path residual add, fused, for bfloat16 autocast on CPU.

Under CPU autocast NAT's token stream is bfloat16 from the stem's convolution on, so each block's two
LayerNorms and two residual adds run on bfloat16. ATen's bfloat16 LayerNorm (float32 weights) costs
8-15x a copy of its input per pass, and timm's `DropPath` is a bfloat16 multiply by the rounded mask
before the add. The C++ ops (`backends/csrc/block_ops_cpu.cpp`, built with the NA kernel) make each
one pass over bfloat16 rows widened to float32: the same statistics and gradients as ATen's (float32
sums, rounded to bfloat16 once), and `x + scale * branch` with the drop-path scale per sample in
float32 (timm rounds 1/keep_prob and the scaled branch to bfloat16 first). NAT-T's bf16 train step:
docs/benchmarks.md, bf16 section.

`fused_bf16_applies(x)` says whether they run: a bfloat16 CPU input under CPU bfloat16 autocast, the
kernel built, and no tracer, scripting or compiler looking (those see the stock ops).
"""

from __future__ import annotations

import torch
from timm.layers import drop_path as timm_drop_path
from torch import nn

from .backends.cpp_kernel import kernel_build_error


def fused_bf16_applies(x: torch.Tensor) -> bool:
    """Whether the fused ops run for a block input `x` (see the module docstring); loads the kernel."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or isinstance(x, torch.fx.Proxy):
        return False
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and kernel_build_error() is None
    )


class _LayerNormBf16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        y, mean, rstd = torch.ops.nat_block_cpu.layer_norm_bf16(x, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mean, rstd, weight = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.nat_block_cpu.layer_norm_bf16_backward(grad, x, mean, rstd, weight)
        return dx, dweight, dbias, None


class _ScaledResidualBf16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return torch.ops.nat_block_cpu.residual_add_bf16(x, branch, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad, torch.ops.nat_block_cpu.scale_samples_bf16(grad, scale), None


def layer_norm_bf16(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """`norm(x)` for bfloat16 `x` (float32 weight and bias; over the last dim), in one pass."""
    return _LayerNormBf16.apply(x, norm.weight, norm.bias, norm.eps)


def drop_path_scale(x: torch.Tensor, drop_path: nn.Module) -> torch.Tensor | None:
    """timm's `DropPath` as a float32 scale per sample of `x` (0 or 1/keep_prob); None when it is off."""
    drop_prob = getattr(drop_path, "drop_prob", 0.0)
    if not drop_path.training or not drop_prob:
        return None
    # timm's own mask (and its draw from the generator), applied to ones: the scale itself.
    ones = x.new_ones(x.shape[0], dtype=torch.float32)
    return timm_drop_path(ones, drop_prob, training=True, scale_by_keep=drop_path.scale_by_keep)


def residual_add_bf16(x: torch.Tensor, branch: torch.Tensor, drop_path: nn.Module) -> torch.Tensor:
    """`x + drop_path(branch)` for bfloat16 `x` and `branch`, in one pass.

    A branch in another dtype (a layer scale promotes it to float32) takes the stock ops; without
    drop path (eval, rate 0) it is the plain add (one pass already).
    """
    if branch.dtype != torch.bfloat16 or branch.shape != x.shape:
        return x + drop_path(branch)  # before drawing a mask here: drop_path draws its own
    scale = drop_path_scale(x, drop_path)
    if scale is None:
        return x + branch
    return _ScaledResidualBf16.apply(x, branch, scale)
