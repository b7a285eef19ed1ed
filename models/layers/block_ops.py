"""NAT's blocks and downsamplers under CPU bfloat16 autocast: LayerNorm, the drop-path residual add and
the downsampling conv's weight gradient.

Under CPU autocast NAT's token stream is bfloat16 from the stem's convolution on, so each block's two
LayerNorms and two residual adds run on bfloat16. ATen's bfloat16 LayerNorm (float32 weights) costs
8-15x a copy of its input per pass, and timm's `DropPath` is a bfloat16 multiply by the rounded mask
before the add. The C++ ops (`backends/csrc/block_ops_cpu.cpp`, built with the NA kernel) make each
one pass over bfloat16 rows widened to float32: the same statistics and gradients as ATen's (float32
sums, rounded to bfloat16 once), and `x + scale * branch` with the drop-path scale per sample in
float32 (timm rounds 1/keep_prob and the scaled branch to bfloat16 first); a block's first residual
add and second LayerNorm are one op (`residual_layer_norm_bf16`). The downsamplers' 3x3
stride-2 conv keeps oneDNN's forward and input gradient; its weight gradient, which oneDNN computes in
bfloat16 at a fraction of its forward's rate on NAT's 56^2-14^2 maps, is one GEMM over the input's
patches (im2col on the NHWC map). NAT-T's bf16 train step: docs/benchmarks.md, bf16 section.

`fused_bf16_applies(x)` says whether they run: a bfloat16 CPU input under CPU bfloat16 autocast, the
kernel built, and no TorchScript, FX or ONNX tracer looking (those see the stock ops: custom ops would
not script or export). torch.compile keeps the fused ops, traced through their fake kernels in
`backends/cpp_kernel.py`. `fusable_layer_norm` and `fusable_conv` say which modules they stand in for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import drop_path as timm_drop_path
from torch import nn

from .backends.cpp_kernel import kernel_build_error

Pair = tuple[int, int]


def fused_bf16_applies(x: torch.Tensor) -> bool:
    """Whether the fused ops run for a module input `x` (see the module docstring); loads the kernel."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or isinstance(x, torch.fx.Proxy):
        return False
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and kernel_build_error() is None
    )


def fusable_layer_norm(norm: nn.Module) -> bool:
    """Whether `layer_norm_bf16` computes `norm`: a plain LayerNorm with float32 weight and bias."""
    return (
        type(norm) is nn.LayerNorm
        and norm.weight is not None
        and norm.bias is not None
        and norm.weight.dtype == torch.float32
    )


def fusable_conv(conv: nn.Module) -> bool:
    """Whether `conv2d_nhwc_bf16` computes `conv`: a plain Conv2d, float32 weight, no bias, groups or
    dilation, zero padding given as numbers."""
    return (
        type(conv) is nn.Conv2d
        and conv.bias is None
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.weight.dtype == torch.float32
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


class _ResidualLayerNormBf16(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        branch: torch.Tensor,
        scale: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, normed, mean, rstd = torch.ops.nat_block_cpu.residual_layer_norm_bf16(
            x, branch, scale, weight, bias, eps
        )
        ctx.save_for_backward(out, mean, rstd, weight, scale)
        return out, normed

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, grad_normed: torch.Tensor):
        out, mean, rstd, weight, scale = ctx.saved_tensors
        dx, dbranch, dweight, dbias = torch.ops.nat_block_cpu.residual_layer_norm_bf16_backward(
            grad_out, grad_normed, out, mean, rstd, weight, scale
        )
        return dx, dbranch, None, dweight, dbias, None


def _patches(x: torch.Tensor, kernel: Pair, stride: Pair, padding: Pair, out_size: Pair) -> torch.Tensor:
    """im2col on NHWC: `(B, Ho, Wo, kh * kw, C)`, x `(B, H, W, C)` zero-padded, at each output's taps."""
    (kh, kw), (sh, sw), (ph, pw), (ho, wo) = kernel, stride, padding, out_size
    padded = F.pad(x, (0, 0, pw, pw, ph, ph))
    rows, cols = sh * (ho - 1) + 1, sw * (wo - 1) + 1
    taps = [padded[:, i : i + rows : sh, j : j + cols : sw] for i in range(kh) for j in range(kw)]
    return torch.stack(taps, dim=3)


class _Conv2dNHWCBf16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: Pair, padding: Pair) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding
        return F.conv2d(x.permute(0, 3, 1, 2), weight, None, stride, padding).permute(0, 2, 3, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        out_channels, in_channels, kh, kw = weight.shape
        grad = grad.contiguous()  # NHWC: the channels_last NCHW gradient oneDNN takes, and GEMM rows
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            # oneDNN's input gradient alone (asked for with the weight's, the pair took longer than the two)
            conv_args = (stride, padding, (1, 1), False, (0, 0), 1)  # dilation, transposed, out pad, groups
            grad_nchw, x_nchw = grad.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2)
            dx, _, _ = torch.ops.aten.convolution_backward(
                grad_nchw, x_nchw, weight, None, *conv_args, (True, False, False)
            )
            dx = dx.permute(0, 2, 3, 1)
        if ctx.needs_input_grad[1]:
            # dW[o, (i, j, c)] = sum over (b, y, x) of grad[b, y, x, o] * patches[b, y, x, (i, j), c]: one
            # bf16 GEMM (float32 sums, rounded once, as oneDNN's) over K = B * Ho * Wo.
            patches = _patches(x, (kh, kw), stride, padding, grad.shape[1:3])
            dweight = grad.reshape(-1, out_channels).t() @ patches.reshape(-1, kh * kw * in_channels)
            dweight = dweight.view(out_channels, kh, kw, in_channels).permute(0, 3, 1, 2).contiguous()
        return dx, dweight, None, None


def conv2d_nhwc_bf16(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """`conv` (see `fusable_conv`) on a bfloat16 NHWC map `(B, H, W, C)`, NHWC out; oneDNN's forward and
    input gradient, the weight gradient as one GEMM over x's patches (module docstring)."""
    weight = conv.weight.to(torch.bfloat16)  # autocast's cast (and its backward to float32), explicit
    return _Conv2dNHWCBf16.apply(x, weight, conv.stride, conv.padding)


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


def residual_layer_norm_bf16(
    x: torch.Tensor, branch: torch.Tensor, drop_path: nn.Module, norm: nn.LayerNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x + drop_path(branch)` and `norm` of it (see `fusable_layer_norm`), for bfloat16 `x` and
    `branch`, in one pass; the backward adds the two gradients of the sum (the residual's and the
    LayerNorm's) in float32 in the same pass, where autograd would add them in bfloat16 after.

    A branch in another dtype (a layer scale promotes it to float32) takes the stock ops.
    """
    if branch.dtype != torch.bfloat16 or branch.shape != x.shape:
        x = x + drop_path(branch)  # before drawing a mask here: drop_path draws its own
        return x, norm(x)
    scale = drop_path_scale(x, drop_path)
    if scale is None:
        scale = x.new_ones(x.shape[0], dtype=torch.float32)
    return _ResidualLayerNormBf16.apply(x, branch, scale, norm.weight, norm.bias, norm.eps)
