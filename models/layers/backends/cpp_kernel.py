"""Exact-window CPU kernel: k*k logits per query, in C++ built on first use by torch's extension JIT.

The halo-tile backend computes (Th + k - 1)(Tw + k - 1) logits per query tile and pays the flash
kernel's per-call overhead on small tiles; this one walks each query's own window (`csrc/na2d_cpu.cpp`,
its loops in `csrc/na2d_cpu_loops.h`: forward, for 7x7 windows at dilation 1 with 16 queries of a
map row per vector, and a fused one-pass backward from the probabilities the forward kept; 512-bit
code where ATen runs AVX-512, else 256-bit or baseline). float32 and float64
run in their own precision; bfloat16 is widened to float32 on load and summed in it
(probabilities, RPB and its gradient in float32), only the output and dq, dk, dv rounded back.
Window geometry comes from `windows.py`, shared with every other backend.

The build (~1 min on 2 cores, once per torch version and kernel source) lands in
`$TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`); `make setup` does it up front.
Without a C++ compiler or ninja the dispatcher says so and runs the `torch` backend instead.
`NAT_NO_CPP_KERNEL=1` turns the kernel off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from pathlib import Path

import torch

from .double_backward import refuse_double_backward
from .windows import bias_indices, geometry_cache, window_starts

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# The NA kernel, and the bf16 LayerNorm and residual ops of NAT blocks (`models/layers/block_ops.py`).
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / name for name in ("na2d_cpu.cpp", "block_ops_cpu.cpp")]
_log = logging.getLogger(__name__)


def _build_directory() -> Path:
    # One per torch version (an extension built against another libtorch would not load: ABI) and
    # per kernel source text: checkouts of the same kernel (a worktree, a CI clone) share one build,
    # and checkouts of different ones no longer rebuild over each other in turn (~1 min each time).
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    sources = hashlib.sha256()
    for source in sorted(_CSRC.iterdir()):
        sources.update(source.name.encode() + b"\0" + source.read_bytes())
    torch_version = re.sub(r"[^A-Za-z0-9.]", "_", torch.__version__)
    path = root / f"nat_na2d_cpu-torch{torch_version}-{sources.hexdigest()[:12]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


_build_outcome: list[str | None] = []  # the one build-and-load attempt's answer, once made


# torch.compile takes its answer instead of tracing the build. Cached by hand: dynamo looks through
# a functools.cache wrapper (with a warning), so the mark would be lost.
@torch.compiler.assume_constant_result
def kernel_build_error() -> str | None:
    """Build (if the cached build is stale) and load the kernel, once; None, or why it isn't available."""
    if not _build_outcome:
        _build_outcome.append(_build_and_load())
    return _build_outcome[0]


def _build_and_load() -> str | None:
    if os.environ.get("NAT_NO_CPP_KERNEL"):
        return "turned off by NAT_NO_CPP_KERNEL"
    # Importing cpp_extension logs "No CUDA runtime is found" on CPU machines: noise for a CPU build.
    extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = extension_log.level
    extension_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.utils import cpp_extension

            _log.debug("loading the NA C++ CPU kernel (the first time builds it, ~1 min)")
            cpp_extension.load(
                name="nat_na2d_cpu",
                sources=[str(source) for source in _SOURCES],
                extra_cflags=["-O3", "-fopenmp"],  # at::parallel_for is OpenMP inlined into our code
                extra_ldflags=["-fopenmp"],
                build_directory=str(_build_directory()),
                is_python_module=False,
            )
    except Exception as error:  # no compiler, no ninja, no headers: the caller falls back and says why
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return f"C++ kernel unavailable ({first_line}); it needs a C++ compiler and ninja (pip install ninja)"
    finally:
        extension_log.setLevel(level)
    _register_fake_kernels()
    return None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernel sums in, and the dtype of its RPB and kept probabilities, for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fake_kernels() -> None:
    """Shape-only versions of the NA ops and the block ops (`models/layers/block_ops.py`), so
    torch.compile traces through them instead of breaking the graph or leaving them out."""

    @torch.library.register_fake("nat_na2d_cpu::forward")
    def _(q, k, v, rpb, row_start, col_start, row_bias, col_bias, kernel_size, dilation, scale, save_probs):
        batch, height, width, heads, _ = q.shape
        probs_shape = (batch, heads, height, width, kernel_size * kernel_size) if save_probs else (0,)
        return q.new_empty(q.shape), q.new_empty(probs_shape, dtype=accumulation_dtype(q.dtype))

    @torch.library.register_fake("nat_na2d_cpu::backward")
    def _(grad_out, q, k, v, probs, row_start, col_start, row_bias, col_bias, kernel_size, *rest):
        rpb_grad, packed = rest[-2:]
        span = 2 * kernel_size - 1
        drpb = q.new_empty((q.shape[3], span, span) if rpb_grad else (0,), dtype=accumulation_dtype(q.dtype))
        if packed:
            batch, height, width, heads, dim = q.shape
            grad_qkv = q.new_empty((batch, height, width, 3, heads, dim))
            return grad_qkv, q.new_empty((0,)), q.new_empty((0,)), drpb
        # As the kernel: dq contiguous; dk, dv contiguous when summed per plane (widened dtype, keys in
        # per-head planes), else in k's layout.
        _, _, width, _, dim = k.shape
        per_plane = (
            accumulation_dtype(k.dtype) != k.dtype and k.stride(2) == dim and k.stride(1) == width * dim
        )
        key_grad = q.new_empty if per_plane else lambda shape: torch.empty_like(k)
        return q.new_empty(q.shape), key_grad(k.shape), key_grad(v.shape), drpb

    def float32_pair(like, shape):
        return like.new_empty(shape, dtype=torch.float32), like.new_empty(shape, dtype=torch.float32)

    def row_stats(x):  # a LayerNorm's mean and rstd, one per row of x's last dim
        return float32_pair(x, (x.numel() // x.shape[-1] if x.shape[-1] else 0,))

    def affine_grads(weight):  # a LayerNorm's weight and bias gradients
        return float32_pair(weight, weight.shape)

    @torch.library.register_fake("nat_block_cpu::layer_norm_bf16")
    def _(x, weight, bias, eps):
        return (x.new_empty(x.shape), *row_stats(x))

    @torch.library.register_fake("nat_block_cpu::layer_norm_bf16_backward")
    def _(grad, x, mean, rstd, weight):
        return (x.new_empty(x.shape), *affine_grads(weight))

    @torch.library.register_fake("nat_block_cpu::residual_add_bf16")
    def _(x, branch, scale):
        return x.new_empty(x.shape)

    @torch.library.register_fake("nat_block_cpu::residual_layer_norm_bf16")
    def _(x, branch, scale, weight, bias, eps):
        return (x.new_empty(x.shape), x.new_empty(x.shape), *row_stats(x))

    @torch.library.register_fake("nat_block_cpu::residual_layer_norm_bf16_backward")
    def _(grad_out, grad_y, out, mean, rstd, weight, scale):
        return (out.new_empty(out.shape), out.new_empty(out.shape), *affine_grads(weight))

    @torch.library.register_fake("nat_block_cpu::scale_samples_bf16")
    def _(grad, scale):
        return grad.new_empty(grad.shape)


@geometry_cache(maxsize=128)
def _axis_geometry(length: int, kernel_size: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first key position, first RPB row) of each query's window along one axis, int64 contiguous."""
    return window_starts(length, kernel_size, dilation), bias_indices(length, kernel_size, dilation)[
        :, 0
    ].clone()


def _geometry(q: torch.Tensor, kernel_size: int, dilation: int, scale: float) -> tuple:
    """The kernel's window arguments for q's map: row and column window starts, RPB starts, and the rest."""
    _, height, width, _, _ = q.shape
    row_start, row_bias = _axis_geometry(height, kernel_size, dilation)
    col_start, col_bias = _axis_geometry(width, kernel_size, dilation)
    return (row_start, col_start, row_bias, col_bias, kernel_size, dilation, scale)


def _attend(ctx, q, k, v, rpb, kernel_size: int, dilation: int, scale: float, save_probs: bool):
    """The forward of both autograd functions: runs the kernel, keeps what the backward needs."""
    geometry = _geometry(q, kernel_size, dilation, scale)
    out, probs = torch.ops.nat_na2d_cpu.forward(q, k, v, rpb, *geometry, save_probs)
    ctx.save_for_backward(q, k, v, probs)
    ctx.geometry = geometry
    return out


def _attention_grads(ctx, grad_out: torch.Tensor, rpb_grad: bool, packed: bool):
    """The kernel's gradients: (dq, dk, dv), or (qkv's, empty, empty) when `packed`; and the RPB's."""
    refuse_double_backward("cpp")
    q, k, v, probs = ctx.saved_tensors
    if grad_out.stride(-1) != 1:
        grad_out = _dense(grad_out)
    *grads, drpb = torch.ops.nat_na2d_cpu.backward(grad_out, q, k, v, probs, *ctx.geometry, rpb_grad, packed)
    return grads, (drpb if rpb_grad else None)


class _ExactWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rpb, kernel_size: int, dilation: int, scale: float, save_probs: bool):
        return _attend(ctx, q, k, v, rpb, kernel_size, dilation, scale, save_probs)

    @staticmethod
    def backward(ctx, grad_out):
        (dq, dk, dv), drpb = _attention_grads(ctx, grad_out, ctx.needs_input_grad[3], packed=False)
        return dq, dk, dv, drpb, None, None, None, None


class _PackedWindowAttention(torch.autograd.Function):
    """NA of q, k, v = qkv.unbind(3), qkv `(B, H, W, 3, heads, D)`: one copy puts all three in per-head
    planes, and the backward writes dq, dk, dv straight into qkv's gradient (no stack of three)."""

    @staticmethod
    def forward(ctx, qkv, rpb, kernel_size: int, dilation: int, scale: float, save_probs: bool):
        q, k, v = _dense(qkv.permute(3, 0, 4, 1, 2, 5)).permute(0, 1, 3, 4, 2, 5).unbind(0)
        return _attend(ctx, q, k, v, rpb, kernel_size, dilation, scale, save_probs)

    @staticmethod
    def backward(ctx, grad_out):
        (grad_qkv, _, _), drpb = _attention_grads(ctx, grad_out, ctx.needs_input_grad[1], packed=True)
        return grad_qkv, drpb, None, None, None, None


def _is_dense(x: torch.Tensor) -> bool:
    """Whether x has the strides of row-major memory of its shape, exactly. `is_contiguous()` is not
    this: torch calls a tensor contiguous whatever the strides of its size-1 axes (one head, head dim
    1) or of an empty one (and `.contiguous()` returns it as it is), while the kernel compares strides
    exactly (head dim 1, k's and v's the same)."""
    expected, step = [], 1
    for size in reversed(x.shape):
        expected.append(step)
        step *= max(size, 1)
    return x.stride() == tuple(reversed(expected))


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when `_is_dense`, else a copy in row-major memory."""
    return x if _is_dense(x) else x.clone(memory_format=torch.contiguous_format)


def _head_planes(x: torch.Tensor) -> torch.Tensor:
    """x `(B, H, W, heads, D)` as a view of `(B, heads, H, W, D)` memory (a copy unless it is already)."""
    return _dense(x.permute(0, 3, 1, 2, 4)).permute(0, 2, 3, 1, 4)


def _readable(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel reads it: as it is when contiguous or in per-head planes, else copied into planes.

    Views into a qkv projection's output (passed as views, not packed) the kernel would read
    slowly (or, for k and v, not at all); the copy a `.contiguous()` would make goes into planes
    instead, on which the backward is 1.2x-1.6x faster than on `(B, H, W, heads, D)` memory
    (csrc/na2d_cpu.cpp). Contiguous inputs are not copied: with 2 heads the copy costs more than it
    saves, with 4-16 heads it saves ~5% of a forward and backward (2 threads).
    """
    if _is_dense(x):  # (B, H, W, heads, D) memory
        return x
    return _head_planes(x)  # itself when it is in planes already


def _prepare(rpb: torch.Tensor | None, *inputs: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """The RPB as the kernel takes it (for `inputs`' dtype), and whether to keep the probabilities
    for a backward."""
    error = kernel_build_error()  # loads the kernel when called without the dispatcher
    if error is not None:
        raise RuntimeError(error)
    if rpb is not None:
        rpb = rpb.to(accumulation_dtype(inputs[0].dtype)).contiguous()
    # The k*k probabilities per query are kept only when a backward can come. Not from
    # ctx.needs_input_grad: under no_grad it still says True for parameters (the RPB).
    save_probs = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*inputs, rpb))
    return rpb, save_probs


def na2d_cpp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int,
    rpb: torch.Tensor | None,
    scale: float,
    attn_drop: float,
    qkv: torch.Tensor | None = None,
) -> torch.Tensor:
    """`qkv`: the `(B, H, W, 3, heads, D)` tensor q, k, v are `unbind(3)` views of, when the caller
    has one to give (`neighborhood_attention_2d_qkvpacked`): then one copy puts all three in per-head
    planes where the views take three, and the backward writes its gradient whole, where autograd
    would stack three."""
    rpb, save_probs = _prepare(rpb, q, k, v)
    if not save_probs and q.stride(-1) == k.stride(-1) == 1 and k.stride() == v.stride():
        # No backward can come (inference): the forward reads q, k, v where they are, e.g. as views into
        # the qkv projection, without the copy into per-head planes that only the backward needs (NAT-T's
        # bf16 inference 0.96x the time, docs/benchmarks.md).
        geometry = _geometry(q, kernel_size, dilation, scale)
        return torch.ops.nat_na2d_cpu.forward(q, k, v, rpb, *geometry, False)[0]
    if qkv is not None:
        return _PackedWindowAttention.apply(qkv, rpb, kernel_size, dilation, scale, save_probs)
    q, k, v = _readable(q), _readable(k), _readable(v)
    if k.stride() != v.stride():  # the kernel walks k and v with one table of tap offsets
        k, v = _head_planes(k), _head_planes(v)
    # The output is (B, H, W, heads, D) contiguous, the layout the output projection reads.
    return _ExactWindowAttention.apply(q, k, v, rpb, kernel_size, dilation, scale, save_probs)
