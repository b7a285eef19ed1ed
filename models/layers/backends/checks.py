"""Which backend can serve a call, and why the others can't.

Kept apart from the backends so that `auto` and error messages share one source of truth.
"""

from __future__ import annotations

import contextvars
import warnings
from dataclasses import dataclass, field, replace

import torch

from .cpp_kernel import DTYPES as CPP_DTYPES
from .cpp_kernel import kernel_build_error
from .flex import flex_available
from .natten_na import natten_has_cuda_kernels, natten_version
from .self_check import CHECKED_DEVICE_TYPES, SELF_CHECKED, describe, outcomes, self_check
from .triton_na import DTYPES as TRITON_DTYPES
from .triton_na import fp32_matmul_uses_tf32, triton_error, triton_interpreting

BACKENDS = ("cpp", "torch", "naive", "natten", "flex", "triton")
# Fastest first, per device type; `naive` is never picked automatically (k^2 copies of K and V).
# CUDA: natten's fused kernels where they serve (no RPB), then the fused Triton kernel (the only
# fused one that trains an RPB), flex, and SDPA over halo tiles (the one with attention dropout);
# float32 without TF32 ranks Triton last (`_auto_order`). natten and Triton run only once their
# self-check passed for the call's configuration (`trusted_backend`).
AUTO_ORDER = {"cuda": ("natten", "triton", "flex", "torch"), "cpu": ("cpp", "torch")}


# `use_backend(name)`'s block: every NA call in it runs `name` (functional.py sets it)
forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("na_backend", default=None)


@dataclass(frozen=True)
class CallInfo:
    device_type: str
    dtype: torch.dtype
    has_rpb: bool
    attn_drop: float
    needs_grad: bool
    head_dim: int | None = None  # None: any (the callers that plan for a whole model)


@dataclass(frozen=True)
class BackendChoice:
    name: str
    rejected: dict[str, str] = field(default_factory=dict)
    self_checks: tuple[str, ...] = ()  # explain_backends: the CUDA self-checks run so far, and outcomes

    def __str__(self) -> str:
        lines = [f"backend: {self.name}"]
        lines += [f"  not {name}: {why}" for name, why in self.rejected.items()]
        lines += [f"  {line}" for line in self.self_checks]
        return "\n".join(lines)


def why_not(backend: str, call: CallInfo) -> str | None:
    """None when `backend` can serve `call`, else the reason it can't."""
    if backend not in BACKENDS:
        return f"unknown backend; choose one of {', '.join(BACKENDS)} or 'auto'"
    if backend in ("torch", "naive"):
        return None
    if backend == "cpp":
        if call.device_type != "cpu":
            return "CPU-only kernel"
        if call.dtype not in CPP_DTYPES:
            return f"float32/float64/bfloat16 only, got {call.dtype} ('torch' runs it)"
        if call.attn_drop > 0:
            return "no attention dropout ('torch' has it)"
        return kernel_build_error()  # last: the first call may build the kernel (~10 s, once)
    if backend == "natten":
        if natten_version() is None:
            return "natten is not importable (pip install --no-build-isolation natten==0.21.7)"
        if call.device_type not in ("cuda", "cpu"):
            return f"natten runs on CUDA and CPU tensors, got {call.device_type}"
        if call.has_rpb:
            return "natten>=0.20 has no relative position bias (pass rpb=None or use 'torch'/'flex')"
        if call.attn_drop > 0:
            return "natten has no attention dropout"
        if call.needs_grad and call.device_type != "cuda":
            return "natten has no backward on CPU (FlexAttention has no CPU backward)"
        if call.dtype == torch.float64:
            return "natten has no float64 kernels"
        if (
            call.device_type == "cpu"
            and call.head_dim is not None
            and not _natten_cpu_head_dim(call.head_dim)
        ):
            return f"natten's CPU path takes head dims 8, 16, 32, ... (powers of two), got {call.head_dim}"
        return None
    if backend == "triton":
        if triton_error() is not None:
            return triton_error()
        if call.device_type == "cpu" and not triton_interpreting():
            return "Triton kernels run on CUDA tensors (on CPU only under TRITON_INTERPRET=1, for tests)"
        if call.device_type not in ("cuda", "cpu"):
            return f"Triton kernels run on CUDA tensors, got {call.device_type}"
        if call.dtype not in TRITON_DTYPES:
            return f"float16/bfloat16/float32/float64 only, got {call.dtype}"
        if call.attn_drop > 0:
            return "no attention dropout ('torch' has it)"
        return None
    # flex
    if not flex_available():
        return "torch.nn.attention.flex_attention is not available in this torch build"
    if call.attn_drop > 0:
        return "FlexAttention has no attention dropout"
    if call.needs_grad and call.device_type != "cuda":
        return "FlexAttention has no backward on CPU"
    return None


def natten_cuda_kernels_missing(call: CallInfo) -> str | None:
    """Why natten's CUDA path is no kernel of its own here (None: it is, or the call is not on CUDA)."""
    if call.device_type == "cuda" and not natten_has_cuda_kernels():
        return (
            "natten has no CUDA kernels here (make setup NATTEN_CUDA=1 builds them): its CUDA path is then "
            "uncompiled FlexAttention"
        )
    return None


def _auto_excludes(backend: str, call: CallInfo) -> str | None:
    """Why `auto` passes over a backend that could serve `call` (None: it doesn't)."""
    if backend == "naive":
        return "never picked automatically: it copies K and V k*k times (use it for FLOP counting)"
    if backend == "flex" and call.needs_grad and call.has_rpb:
        # Learnable score_mod buffers train through atomics with open upstream bugs
        # (pytorch/pytorch#157677, #145208); request backend='flex' explicitly to train with it.
        return "auto uses flex for inference only when the RPB needs a gradient (upstream learned-bias bugs)"
    if backend == "natten" and (reason := natten_cuda_kernels_missing(call)):
        return reason
    if backend == "triton" and call.device_type != "cuda":
        return "auto runs it on CUDA only (on CPU it is Triton's interpreter, for tests)"
    return None


def _natten_cpu_head_dim(head_dim: int) -> bool:
    """Whether natten 0.21's CPU path (FlexAttention) takes this head dim: powers of two from 8
    (measured: 8-256 run; 1-4, 12, 17, 24, 40, 48, 96 find no backend)."""
    return head_dim >= 8 and head_dim & (head_dim - 1) == 0


def compute_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype a call on `dtype` inputs runs in: under autocast, float32 q, k, v are cast to its
    dtype first, as autocast casts SDPA's (attention is on its lower-precision list), so every
    backend computes and returns the same dtype."""
    if (
        dtype == torch.float32
        and torch.amp.is_autocast_available(device_type)  # meta and others have no autocast
        and torch.is_autocast_enabled(device_type)
    ):
        return torch.get_autocast_dtype(device_type)
    return dtype


def call_fields(q: torch.Tensor, k, v, rpb: torch.Tensor | None, attn_drop: float) -> tuple:
    """`CallInfo`'s fields for a call, in order (plain values: see `resolve_backend`)."""
    tensors = (q, k, v) if rpb is None else (q, k, v, rpb)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    # the tensor's own device type: MPS / XPU / meta tensors reach `torch` (portable ATen ops), not
    # the CPU kernel, which would read their memory as host memory
    return q.device.type, compute_dtype(q.dtype, q.device.type), rpb is not None, attn_drop, needs_grad


def call_info(q: torch.Tensor, k, v, rpb: torch.Tensor | None, attn_drop: float) -> CallInfo:
    return CallInfo(*call_fields(q, k, v, rpb, attn_drop), head_dim=q.shape[-1])


# A constant to torch.compile: evaluated once while tracing (its arguments are plain values) and its
# answer baked into the graph. Traced instead, the checks (the kernel's build, natten's import)
# broke the graph at every NA layer, and the per-layer graphs then ran into dynamo's recompile limit.
@torch.compiler.assume_constant_result
def resolve_backend(
    requested: str,
    device_type: str,
    dtype: torch.dtype,
    has_rpb: bool,
    attn_drop: float,
    needs_grad: bool,
    head_dim: int | None = None,
) -> str:
    """The backend that runs a call: `requested` if it can serve it (else ValueError saying why),
    or `auto`'s choice."""
    call = CallInfo(device_type, dtype, has_rpb, attn_drop, needs_grad, head_dim)
    if requested == "auto":
        return select_backend(call).name
    reason = why_not(requested, call)
    if reason is not None:
        raise ValueError(f"NA backend {requested!r} can't serve this call: {reason}")
    return requested


def _fp32_on_cuda_cores(call: CallInfo) -> bool:
    return call.device_type == "cuda" and call.dtype == torch.float32 and not fp32_matmul_uses_tf32()


def _auto_order(call: CallInfo) -> tuple[str, ...]:
    order = AUTO_ORDER.get(call.device_type, ("torch",))
    if _fp32_on_cuda_cores(call):  # FMA dots, no tensor cores: not ranked first until timed
        order = tuple(name for name in order if name != "triton") + ("triton",)
    return order


def _passed_over(chosen: str, name: str, call: CallInfo) -> str:
    if name == "triton" and _fp32_on_cuda_cores(call):
        return (
            f"float32 without TF32: its dots run on CUDA cores, so auto ranks it after '{chosen}' until "
            "timed (torch.backends.cuda.matmul.fp32_precision = 'tf32' puts it first)"
        )
    if call.device_type == "cuda":  # the CUDA order is by design until timed: scripts/gpu_check.py
        return f"'{chosen}' comes first in auto's CUDA order (not yet timed on a GPU: scripts/gpu_check.py)"
    return f"'{chosen}' is faster here"


# torch.onnx.export(dynamo=False) traces: every size and window offset is a constant of the graph
LEGACY_ONNX_FIXED_SIZE = (
    "torch.onnx.export(dynamo=False) records neighborhood attention for this input's height and width "
    "only: other sizes give wrong outputs whatever dynamic_axes says; export with dynamo=True "
    "(scripts/export.py does) for a graph that takes any size"
)


def recording_a_graph() -> bool:
    """torch.export, torch.onnx.export or torch.jit.trace is recording: `auto` then runs `naive`."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def select_backend(call: CallInfo, distrusted: dict[str, str] | None = None) -> BackendChoice:
    """The fastest backend that can serve `call`, with the reasons every other one was passed over;
    `distrusted`: backends whose self-check failed for the call, with the failure."""
    if recording_a_graph():
        # standard ONNX ops (Gather, MatMul, Softmax), and torch.export / torch.jit.trace graphs of
        # plain ATen ops (as scripting runs): the kernels would be custom ops the file's reader must
        # have loaded (a saved torch.export program failed to load in a fresh process)
        why = "a graph being recorded (torch.export, ONNX export, torch.jit.trace) gets plain ATen ops"
        if torch.onnx.is_in_onnx_export() and torch.jit.is_tracing():
            warnings.warn(LEGACY_ONNX_FIXED_SIZE, stacklevel=2)
        return BackendChoice("naive", {name: why for name in BACKENDS if name != "naive"})
    order = _auto_order(call)
    chosen, rejected = None, {}
    for name in order:
        reason = (distrusted or {}).get(name) or why_not(name, call) or _auto_excludes(name, call)
        if reason is None and chosen is None:
            chosen = name
        else:
            rejected[name] = reason or _passed_over(chosen, name, call)
    for name in BACKENDS:
        if name not in order:
            rejected[name] = (
                why_not(name, call)
                or _auto_excludes(name, call)
                or f"slower than '{chosen}' on {call.device_type} (its path there materialises full scores)"
            )
    return BackendChoice(chosen or "torch", rejected)


# A constant to torch.compile too (see resolve_backend): run while tracing, its answer baked in.
@torch.compiler.assume_constant_result
def trusted_backend(
    requested: str, chosen: str, device_type: str, dtype: torch.dtype, has_rpb: bool, attn_drop: float,
    needs_grad: bool, kernel_size: int, dilation: int, head_dim: int, device: str,
) -> str:  # fmt: skip
    """`chosen` once its self-check passed for this configuration (run on first use); after a failure
    (warned once) `auto`'s next choice, checked the same way, or for an explicit request ValueError."""
    call = CallInfo(device_type, dtype, has_rpb, attn_drop, needs_grad)
    return _trusted(requested, chosen, call, kernel_size, dilation, head_dim, device)[0]


def _trusted(requested, chosen, call, kernel_size, dilation, head_dim, device) -> tuple[str, dict[str, str]]:
    distrusted: dict[str, str] = {}
    while chosen in SELF_CHECKED and call.device_type in CHECKED_DEVICE_TYPES:
        failure = self_check(chosen, device, call.dtype, kernel_size, dilation, head_dim, call.has_rpb)
        if failure is None:
            break
        reason = f"failed its self-check on {device}: {failure}"
        if requested != "auto":
            raise ValueError(f"NA backend {chosen!r} can't serve this call: {reason}")
        distrusted[chosen] = reason
        chosen = select_backend(call, distrusted).name
    return chosen, distrusted


def explain_backends(
    q: torch.Tensor,
    rpb: torch.Tensor | None = None,
    attn_drop: float = 0.0,
    requires_grad: bool | None = None,
    kernel_size: int | None = None,
    dilation: int = 1,
) -> BackendChoice:
    """What a call for a query like `q` (device, dtype) runs: `auto`'s choice (under a `use_backend`
    block, that backend), and why not the rest.

    Every backend serves every valid kernel size, dilation and map size, so those don't enter, except
    on CUDA through the self-checks (`self_check.py`): given `kernel_size` (and `dilation`), the
    choice is the one a call makes, its check run if not yet; the checks run so far are listed.

    >>> print(explain_backends(torch.randn(1, 14, 14, 2, 32), rpb=torch.zeros(2, 13, 13)))
    """
    call = call_info(q, q, q, rpb, attn_drop)
    if requires_grad is not None:
        call = replace(call, needs_grad=requires_grad)
    forced = forced_backend.get()
    if forced not in (None, "auto"):
        reason = why_not(forced, call)
        why = f"use_backend({forced!r}) is in force" + (
            f"; it can't serve this call: {reason}" if reason else ""
        )
        return BackendChoice(forced, {"auto": why})
    choice = select_backend(call)
    if kernel_size is not None:
        _, distrusted = _trusted("auto", choice.name, call, kernel_size, dilation, q.shape[-1], str(q.device))
        choice = select_backend(call, distrusted)
    checks = tuple(
        f"self-check {key[0]} on {key[1]} ({describe(key)}): {'passed' if failure is None else failure}"
        for key, failure in outcomes().items()
        if key[1] == str(q.device)
    )
    return replace(choice, self_checks=checks)
