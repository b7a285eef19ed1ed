"""Which backend can serve a call, and why the others can't.

Kept apart from the backends so that `auto` and error messages share one source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .cpp_kernel import DTYPES as CPP_DTYPES
from .cpp_kernel import kernel_build_error
from .flex import flex_available
from .natten_na import natten_version
from .triton_na import DTYPES as TRITON_DTYPES
from .triton_na import triton_error, triton_interpreting

BACKENDS = ("cpp", "torch", "naive", "natten", "flex", "triton")
# Fastest first, per device type; `naive` is never picked automatically (k^2 copies of K and V).
# CUDA: natten's fused kernels where they serve (no RPB), then the fused Triton kernel (the only
# fused one that trains an RPB), flex, and SDPA over halo tiles (the one with attention dropout).
AUTO_ORDER = {"cuda": ("natten", "triton", "flex", "torch"), "cpu": ("cpp", "torch")}


@dataclass(frozen=True)
class CallInfo:
    device_type: str
    dtype: torch.dtype
    has_rpb: bool
    attn_drop: float
    needs_grad: bool


@dataclass(frozen=True)
class BackendChoice:
    name: str
    rejected: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"backend: {self.name}"]
        lines += [f"  not {name}: {why}" for name, why in self.rejected.items()]
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
        if call.has_rpb:
            return "natten>=0.20 has no relative position bias (pass rpb=None or use 'torch'/'flex')"
        if call.attn_drop > 0:
            return "natten has no attention dropout"
        if call.needs_grad and call.device_type != "cuda":
            return "natten has no backward on CPU (FlexAttention has no CPU backward)"
        if call.dtype == torch.float64:
            return "natten has no float64 kernels"
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


def _auto_excludes(backend: str, call: CallInfo) -> str | None:
    """Why `auto` passes over a backend that could serve `call` (None: it doesn't)."""
    if backend == "naive":
        return "never picked automatically: it copies K and V k*k times (use it for FLOP counting)"
    if backend == "flex" and call.needs_grad and call.has_rpb:
        # Learnable score_mod buffers train through atomics with open upstream bugs
        # (pytorch/pytorch#157677, #145208); request backend='flex' explicitly to train with it.
        return "auto uses flex for inference only when the RPB needs a gradient (upstream learned-bias bugs)"
    if backend == "triton" and call.device_type != "cuda":
        return "auto runs it on CUDA only (on CPU it is Triton's interpreter, for tests)"
    return None


def call_fields(q: torch.Tensor, k, v, rpb: torch.Tensor | None, attn_drop: float) -> tuple:
    """`CallInfo`'s fields for a call, in order (plain values: see `resolve_backend`)."""
    tensors = (q, k, v) if rpb is None else (q, k, v, rpb)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return "cuda" if q.is_cuda else "cpu", q.dtype, rpb is not None, attn_drop, needs_grad


def call_info(q: torch.Tensor, k, v, rpb: torch.Tensor | None, attn_drop: float) -> CallInfo:
    return CallInfo(*call_fields(q, k, v, rpb, attn_drop))


# A constant to torch.compile: evaluated once while tracing (its arguments are plain values) and its
# answer baked into the graph. Traced instead, the checks (the kernel's build, natten's import)
# broke the graph at every NA layer, and the per-layer graphs then ran into dynamo's recompile limit.
@torch.compiler.assume_constant_result
def resolve_backend(
    requested: str, device_type: str, dtype: torch.dtype, has_rpb: bool, attn_drop: float, needs_grad: bool
) -> str:
    """The backend that runs a call: `requested` if it can serve it (else ValueError saying why),
    or `auto`'s choice."""
    call = CallInfo(device_type, dtype, has_rpb, attn_drop, needs_grad)
    if requested == "auto":
        return select_backend(call).name
    reason = why_not(requested, call)
    if reason is not None:
        raise ValueError(f"NA backend {requested!r} can't serve this call: {reason}")
    return requested


def _passed_over(chosen: str, device_type: str) -> str:
    if device_type == "cuda":  # the CUDA order is by design until timed: scripts/gpu_check.py
        return f"'{chosen}' comes first in auto's CUDA order (not yet timed on a GPU: scripts/gpu_check.py)"
    return f"'{chosen}' is faster here"


def select_backend(call: CallInfo) -> BackendChoice:
    """The fastest backend that can serve `call`, with the reasons every other one was passed over."""
    order = AUTO_ORDER.get(call.device_type, ("torch",))
    chosen, rejected = None, {}
    for name in order:
        reason = why_not(name, call) or _auto_excludes(name, call)
        if reason is None and chosen is None:
            chosen = name
        else:
            rejected[name] = reason or _passed_over(chosen, call.device_type)
    for name in BACKENDS:
        if name not in order:
            rejected[name] = (
                why_not(name, call)
                or _auto_excludes(name, call)
                or f"slower than '{chosen}' on {call.device_type} (its path there materialises full scores)"
            )
    return BackendChoice(chosen or "torch", rejected)


def explain_backends(
    q: torch.Tensor,
    rpb: torch.Tensor | None = None,
    attn_drop: float = 0.0,
    requires_grad: bool | None = None,
) -> BackendChoice:
    """What `backend='auto'` would run for a query like `q` (device, dtype), and why not the rest.

    Every backend serves every valid kernel size, dilation and map size, so those don't enter.

    >>> print(explain_backends(torch.randn(1, 14, 14, 2, 32), rpb=torch.zeros(2, 13, 13)))
    """
    call = call_info(q, q, q, rpb, attn_drop)
    if requires_grad is not None:
        call = replace(call, needs_grad=requires_grad)
    return select_backend(call)
