"""The fused LayerNorm and drop-path residual of NAT blocks and the downsampling conv's GEMM weight
gradient under CPU bfloat16 autocast (models/layers/block_ops.py), against float64 references built here
and against the modules' stock ops."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from functorch.compile import make_boxed_func
from timm.layers import DropPath
from torch import nn
from torch._dynamo.backends.common import aot_autograd

from models.layers import block_ops
from models.layers.backends.cpp_kernel import kernel_build_error
from models.nat import NAT, ConvDownsample, ConvStem, NATBlock

pytestmark = pytest.mark.skipif(kernel_build_error() is not None, reason=str(kernel_build_error()))

BF16_STEP = 2.0**-8  # bfloat16 unit roundoff: one rounding moves a value by at most this, relatively


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return ((actual.double() - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("channels", [64, 37, 512])
def test_layer_norm_bf16_matches_float64_reference(channels):
    torch.manual_seed(channels)
    norm = nn.LayerNorm(channels)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    # An offset row mean: the variance must not come from E[x^2] - E[x]^2.
    x = (torch.randn(3, 5, 7, channels) * 3 + 20).bfloat16().requires_grad_()
    grad = torch.randn(x.shape).bfloat16()
    out = block_ops.layer_norm_bf16(x, norm)
    out.backward(grad)

    x64 = x.detach().double().requires_grad_()
    weight64 = norm.weight.detach().double().requires_grad_()
    bias64 = norm.bias.detach().double().requires_grad_()
    reference = nn.functional.layer_norm(x64, (channels,), weight64, bias64, norm.eps)
    reference.backward(grad.double())

    assert out.dtype == x.grad.dtype == torch.bfloat16
    # Rounded once from float32 sums: within one bfloat16 step of each value (plus float32 noise).
    assert ((out.double() - reference).abs() <= BF16_STEP * reference.abs() + 1e-5).all()
    dx_bound = BF16_STEP * x64.grad.abs() + 1e-4 * x64.grad.abs().max()
    assert ((x.grad.double() - x64.grad).abs() <= dx_bound).all()
    # Weight and bias gradients are float32 sums over all rows (ATen's bfloat16 path: ~5% off at 8x14x14).
    assert relative_error(norm.weight.grad, weight64.grad) < 1e-5
    assert relative_error(norm.bias.grad, bias64.grad) < 1e-5


def test_residual_add_bf16_with_drop_path_matches_float64_reference():
    torch.manual_seed(0)
    drop_path = DropPath(0.5).train()
    x = torch.randn(16, 7, 9, 24).bfloat16().requires_grad_()
    branch = torch.randn(x.shape).bfloat16().requires_grad_()
    torch.manual_seed(1)
    out = block_ops.residual_add_bf16(x, branch, drop_path)
    torch.manual_seed(1)
    scale = block_ops.drop_path_scale(x, drop_path)
    assert set(scale.tolist()) == {0.0, 2.0}  # 16 samples at p = 0.5: both outcomes, seed fixed
    grad = torch.randn(x.shape).bfloat16()
    out.backward(grad)

    per_sample = scale.double().view(-1, 1, 1, 1)
    reference = x.detach().double() + per_sample * branch.detach().double()
    assert ((out.double() - reference).abs() <= BF16_STEP * reference.abs()).all()
    assert torch.equal(x.grad, grad)
    assert torch.equal(branch.grad.double(), grad.double() * per_sample)  # scale 0 or 2: exact


def test_residual_add_bf16_without_drop_path_is_the_plain_add():
    x, branch = torch.randn(2, 3, 3, 8).bfloat16(), torch.randn(2, 3, 3, 8).bfloat16()
    for drop_path in (nn.Identity(), DropPath(0.3).eval()):
        assert torch.equal(block_ops.residual_add_bf16(x, branch, drop_path), x + branch)


@pytest.mark.parametrize("drop_prob", [0.0, 0.5])
def test_residual_layer_norm_bf16_matches_float64_reference(drop_prob):
    torch.manual_seed(3)
    drop_path, norm = DropPath(drop_prob).train(), nn.LayerNorm(48)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = (torch.randn(8, 5, 6, 48) * 3 + 10).bfloat16().requires_grad_()
    branch = torch.randn(x.shape).bfloat16().requires_grad_()
    torch.manual_seed(1)
    out, normed = block_ops.residual_layer_norm_bf16(x, branch, drop_path, norm)
    torch.manual_seed(1)
    scale = block_ops.drop_path_scale(x, drop_path)
    per_sample = (torch.ones(8) if scale is None else scale).double().view(-1, 1, 1, 1)
    assert drop_prob == 0 or set(per_sample.flatten().tolist()) == {0.0, 2.0}
    grad_out, grad_normed = torch.randn(x.shape).bfloat16(), torch.randn(x.shape).bfloat16()
    torch.autograd.backward((out, normed), (grad_out, grad_normed))

    sum64 = x.detach().double() + per_sample * branch.detach().double()
    assert ((out.double() - sum64).abs() <= BF16_STEP * sum64.abs()).all()
    # The LayerNorm reads the rounded sum, as the stock ops' LayerNorm reads the residual's output.
    out64 = out.detach().double().requires_grad_()
    weight64 = norm.weight.detach().double().requires_grad_()
    bias64 = norm.bias.detach().double().requires_grad_()
    normed64 = nn.functional.layer_norm(out64, (48,), weight64, bias64, norm.eps)
    normed64.backward(grad_normed.double())
    total64 = out64.grad + grad_out.double()  # the sum's gradient: the residual's plus the LayerNorm's
    assert ((normed.double() - normed64).abs() <= BF16_STEP * normed64.abs() + 1e-5).all()
    for actual, expected in [(x.grad, total64), (branch.grad, per_sample * total64)]:
        assert actual.dtype == torch.bfloat16
        assert (
            (actual.double() - expected).abs() <= BF16_STEP * expected.abs() + 1e-4 * total64.abs().max()
        ).all()
    assert relative_error(norm.weight.grad, weight64.grad) < 1e-5
    assert relative_error(norm.bias.grad, bias64.grad) < 1e-5


def run_block(block: NATBlock, x: torch.Tensor, grad: torch.Tensor, fused: bool):
    if not fused:  # the stock ops, as outside CPU bf16 autocast
        block._fused_bf16_applies = lambda x: False
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    out.backward(grad)
    return out, x.grad, {name: p.grad for name, p in block.named_parameters()}


@pytest.mark.parametrize("layer_scale", [None, 0.5])
def test_nat_block_takes_the_fused_ops_under_cpu_bf16_autocast(monkeypatch, layer_scale):
    torch.manual_seed(0)
    # a layer scale promotes the branches to float32: the residual and what follows it take the stock ops
    block = NATBlock(64, 2, kernel_size=5, drop_path=0.0, layer_scale=layer_scale).train()
    x = torch.randn(2, 9, 11, 64).bfloat16()  # the block's input dtype under autocast (the stem's conv)
    grad = torch.randn(x.shape).bfloat16()
    calls = []
    for name in ("layer_norm_bf16", "residual_layer_norm_bf16"):
        op = getattr(block_ops, name)
        monkeypatch.setattr(
            f"models.nat.{name}", lambda *args, op=op, name=name: calls.append(name) or op(*args)
        )
    fused_out, fused_dx, fused_grads = run_block(block, x, grad, fused=True)
    assert calls == ["layer_norm_bf16", "residual_layer_norm_bf16"]
    stock_out, stock_dx, stock_grads = run_block(block, x, grad, fused=False)
    assert len(calls) == 2 and fused_out.dtype == stock_out.dtype
    assert fused_out.dtype == (torch.bfloat16 if layer_scale is None else torch.float32)
    # Same math, bfloat16 roundings in different places: close, not equal.
    torch.testing.assert_close(fused_out, stock_out, rtol=0.02, atol=0.02)
    torch.testing.assert_close(fused_dx, stock_dx, rtol=0.05, atol=0.05)
    for name, grad_fused in fused_grads.items():
        scale = stock_grads[name].abs().max()
        assert (grad_fused - stock_grads[name]).abs().max() <= 0.06 * scale, name


def test_nat_block_keeps_the_stock_ops_outside_cpu_bf16_autocast():
    block = NATBlock(32, 2, kernel_size=3)
    x = torch.randn(1, 4, 4, 32)
    assert not block._fused_bf16_applies(x)  # float32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block._fused_bf16_applies(x.bfloat16())
        assert not block._fused_bf16_applies(x)
    block.bfloat16()  # bfloat16 weights: ATen's LayerNorm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not block._fused_bf16_applies(x.bfloat16())


@pytest.mark.parametrize(
    "height, width, kernel_size, stride, padding",
    [(14, 14, 3, 2, 1), (7, 9, 3, 2, 1), (8, 12, 2, 2, 0), (6, 5, 3, 1, 1)],
)
def test_conv2d_nhwc_bf16_matches_float64_reference(height, width, kernel_size, stride, padding):
    torch.manual_seed(height * width)
    conv = nn.Conv2d(24, 40, kernel_size, stride, padding, bias=False)
    x = torch.randn(3, height, width, 24).bfloat16().requires_grad_()
    out = block_ops.conv2d_nhwc_bf16(x, conv)
    grad = torch.randn(out.shape).bfloat16()
    out.backward(grad)

    x64 = x.detach().double().permute(0, 3, 1, 2).requires_grad_()
    weight64 = conv.weight.detach().bfloat16().double().requires_grad_()  # the bf16 weight the conv ran
    reference = nn.functional.conv2d(x64, weight64, None, stride, padding)
    reference.backward(grad.double().permute(0, 3, 1, 2))
    reference = reference.permute(0, 2, 3, 1)

    assert out.shape == reference.shape and out.dtype == x.grad.dtype == torch.bfloat16
    assert conv.weight.grad.dtype == torch.float32
    # float32 sums rounded to bfloat16 once: one bfloat16 step of each value, plus float32 noise
    for actual, expected in [
        (out, reference),
        (x.grad, x64.grad.permute(0, 2, 3, 1)),
        (conv.weight.grad, weight64.grad),
    ]:
        bound = BF16_STEP * expected.abs() + 1e-4 * expected.abs().max()
        assert ((actual.double() - expected).abs() <= bound).all()


def run_module(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, fused: bool):
    if not fused:  # the stock ops, as outside CPU bf16 autocast
        module._fused_bf16_applies = lambda x: False
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x.is_floating_point() and x.dtype == torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    out.backward(grad)
    return out, x.grad, {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize(
    "module, x",
    [
        (ConvDownsample(32, 64), torch.randn(2, 13, 14, 32).bfloat16()),  # NHWC bf16, as a NAT stage hands it
        (ConvStem(3, 32), torch.randn(2, 3, 30, 28)),  # the image, float32
    ],
)
def test_stem_and_downsampler_take_the_fused_ops_under_cpu_bf16_autocast(monkeypatch, module, x):
    torch.manual_seed(0)
    calls = []
    for name in ("layer_norm_bf16", "conv2d_nhwc_bf16"):
        op = getattr(block_ops, name)
        monkeypatch.setattr(
            f"models.nat.{name}", lambda *args, op=op, name=name: calls.append(name) or op(*args)
        )
    with torch.no_grad():
        grad = torch.randn(module(x.float() if x.dtype == torch.bfloat16 else x).shape).bfloat16()
    fused_out, fused_dx, fused_grads = run_module(module, x, grad, fused=True)
    expected = (
        ["conv2d_nhwc_bf16", "layer_norm_bf16"] if isinstance(module, ConvDownsample) else ["layer_norm_bf16"]
    )
    assert calls == expected
    stock_out, stock_dx, stock_grads = run_module(module, x, grad, fused=False)
    assert calls == expected and fused_out.dtype == stock_out.dtype == torch.bfloat16
    torch.testing.assert_close(fused_out, stock_out, rtol=0.02, atol=0.02)
    if fused_dx is not None:
        torch.testing.assert_close(fused_dx, stock_dx, rtol=0.05, atol=0.05)
    for name, grad_fused in fused_grads.items():
        scale = stock_grads[name].abs().max()
        assert (grad_fused - stock_grads[name]).abs().max() <= 0.06 * scale, name


def test_torch_compile_keeps_the_fused_ops_in_one_graph_and_matches_eager():
    """Under torch.compile a NAT in CPU bf16 autocast traces in one graph through the ops' fake kernels:
    every block's, the stem's and the downsamplers' LayerNorms and residuals are the fused ops in the
    forward graph (their backwards in the backward graph), and outputs and gradients are eager's."""
    graphs: dict[str, Counter] = {}

    def recorder(name: str):
        def compile_graph(graph_module, inputs):
            nodes = graph_module.graph.nodes
            graphs[name] = Counter(str(node.target) for node in nodes if node.op == "call_function")
            return make_boxed_func(graph_module.forward)

        return compile_graph

    torch.manual_seed(0)
    depths = (1, 2, 1, 1)
    model = NAT(embed_dim=16, depths=depths, num_heads=(1, 2, 2, 4), kernel_size=3, drop_path_rate=0.2)
    x = torch.randn(2, 3, 32, 32)

    def train_step(forward):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # one drop-path draw for both runs
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(x)
        out.float().square().sum().backward()
        return out, {name: p.grad for name, p in model.named_parameters()}

    eager_out, eager_grads = train_step(model.train())
    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    compiled_out, compiled_grads = train_step(torch.compile(model, backend=backend, fullgraph=True))

    blocks, forward, backward = sum(depths), graphs["forward"], graphs["backward"]
    fused = "nat_block_cpu.{}.default".format
    # one LayerNorm per block, the stem and each downsampler; the model's last norm stays ATen's
    assert forward[fused("layer_norm_bf16")] == blocks + 1 + len(depths) - 1
    assert forward["aten.native_layer_norm.default"] == 1
    assert forward[fused("residual_layer_norm_bf16")] == blocks
    # the second residual: the fused op where drop path is on (the first block's rate is 0: a plain add)
    assert forward[fused("residual_add_bf16")] == backward[fused("scale_samples_bf16")] == blocks - 1
    assert backward[fused("layer_norm_bf16_backward")] == blocks + len(depths)
    assert backward[fused("residual_layer_norm_bf16_backward")] == blocks
    torch.testing.assert_close(compiled_out, eager_out)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, msg=name)


def test_an_empty_batch_under_cpu_bf16_autocast_runs_as_in_fp32():
    """The fused residual + LayerNorm divided its rows by the batch size: an empty batch (a last,
    filtered batch) killed the process with a floating point exception."""
    torch.manual_seed(0)
    model = NAT(embed_dim=16, depths=(1, 1), num_heads=(1, 2), kernel_size=3, num_classes=3)
    x = torch.randn(0, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (0, 3)
    out.float().sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)
