"""Trust, then use: the first call of a CUDA kernel for a configuration is checked first.

The Triton kernels are compiled for the user's GPU on first use, and natten's come from a build this
repo doesn't control; neither had run on the hardware they meet. So before `auto` relies on one for a
(device, dtype, kernel size, dilation, head dim, RPB or not), `self_check` runs it on a small problem
of that configuration, forward and backward, against the `torch` backend in float64. A compile or
launch error, or a result outside the dtype's bound, warns once (naming the backend, the
configuration and the error) and is remembered for the rest of the process: `checks.trusted_backend`
then moves `auto` to the next backend (flex, then torch), and an explicit request raises saying why.
A later `auto` call of a checked configuration that still fails in its forward (a larger shape than
the check's: grid, shared memory, launch) is recorded the same way (`distrust_after_failed_call`)
and rerun on the next backend; out-of-memory errors are not (any backend would need the memory).
A failure inside the backward still raises: the forward's tensors are on autograd's tape by then.
"""

from __future__ import annotations

import warnings

import torch

from .natten_na import na2d_natten
from .torch_tiled import na2d_tiled
from .triton_na import na2d_triton

SELF_CHECKED = {"triton": na2d_triton, "natten": na2d_natten}
# Device types whose calls are checked: CUDA (tests add "cpu" to run this logic on Triton's interpreter).
CHECKED_DEVICE_TYPES = {"cuda"}
# Relative-error bounds (error norm over the float64 reference's norm) of the output, the q/k/v
# gradients and the RPB gradient: a dtype's rounding passes (fp32 at TF32's), a wrong kernel doesn't
# (a missed key row or a wrong border is off by ~1e-1 or more).
BOUNDS = {
    torch.float16: dict(out=5e-3, grad=1e-2, drpb=3e-2),
    torch.bfloat16: dict(out=2e-2, grad=3e-2, drpb=8e-2),
    torch.float32: dict(out=5e-3, grad=5e-3, drpb=1e-2),
    torch.float64: dict(out=1e-9, grad=1e-9, drpb=1e-9),
}
_NAMES = ("out", "dq", "dk", "dv", "drpb")

# (backend, device, dtype, kernel size, dilation, head dim, RPB) -> None when the check passed, else why not
_outcomes: dict[tuple, str | None] = {}


def relative_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    """{out, dq, dk, dv, drpb: |got - want| / |want|} (norms, in float64), for as many as given."""
    return {n: float((a.double() - b).norm() / b.norm()) for n, a, b in zip(_NAMES, got, want, strict=False)}


def outputs_and_grads(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor, dtype, backward=True) -> list:
    """fn's output and gradients on `dtype` copies of the float64 `inputs` (q, k, v[, rpb]; the RPB
    stays float32, as a parameter does under autocast)."""
    rpb_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [
        t.detach().to(dtype if i < 3 else rpb_dtype).requires_grad_(backward) for i, t in enumerate(inputs)
    ]
    out = fn(*leaves)
    if not backward:
        return [out.detach()]
    return [out.detach(), *torch.autograd.grad((out * grad_out.to(out.dtype)).sum(), leaves)]


def out_of_bounds(errors: dict[str, float], dtype: torch.dtype) -> dict[str, float]:
    bound = BOUNDS[dtype]
    return {n: e for n, e in errors.items() if not e < bound.get(n, bound["grad"])}  # NaN fails


def _check(backend: str, device: str, dtype, kernel_size: int, dilation: int, head_dim: int, has_rpb: bool):
    gen = torch.Generator().manual_seed(0)  # its own generator: the caller's RNG stream is untouched
    size = (kernel_size + 3) * dilation  # borders and interior; the Triton kernels' 8x8 tiles from k = 7
    shape = (1, size, size + 1, 2, head_dim)
    q, k, v, grad_out = (torch.randn(shape, generator=gen, dtype=torch.float64).to(device) for _ in range(4))
    span = 2 * kernel_size - 1
    inputs = [q, k, v] + (
        [torch.randn(2, span, span, generator=gen, dtype=torch.float64).to(device)] if has_rpb else []
    )
    scale = head_dim**-0.5

    def run_with(implementation):
        def run(q_, k_, v_, rpb_=None):
            return implementation(q_, k_, v_, kernel_size, dilation, rpb_, scale, 0.0)

        return run

    want = outputs_and_grads(run_with(na2d_tiled), inputs, grad_out, torch.float64)
    try:
        got = outputs_and_grads(run_with(SELF_CHECKED[backend]), inputs, grad_out, dtype)
    except Exception as error:  # a compile, resource or launch error: the reason, not a crash
        return error_line(error)
    bad = out_of_bounds(relative_errors(got, want), dtype)
    if bad:
        found = ", ".join(f"{n} {e:.2g}" for n, e in bad.items())
        return f"mismatch against the 'torch' backend (relative errors {found}; bounds {BOUNDS[dtype]})"
    return None


def self_check(
    backend: str,
    device: str,
    dtype: torch.dtype,
    kernel_size: int,
    dilation: int,
    head_dim: int,
    has_rpb: bool,
) -> str | None:
    """None when `backend` computes this configuration right on `device` (checked on first call),
    else why not; a failure warns once."""
    key = (backend, device, dtype, kernel_size, dilation, head_dim, has_rpb)
    if key not in _outcomes:
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(torch.device(device).type, enabled=False),
        ):
            _outcomes[key] = _check(*key)
        if _outcomes[key] is not None:
            warnings.warn(
                f"NA backend {backend!r} failed its self-check on {device} for {describe(key)}: "
                f"{_outcomes[key]}. backend='auto' uses the next backend for these calls for the rest "
                "of the process.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _outcomes[key]


def error_line(error: BaseException) -> str:
    """`Type: first line` of an error, at most 300 characters of it."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def distrust_after_failed_call(key: tuple, error: BaseException) -> None:
    """A call that passed its self-check failed on a real problem (a larger shape: grid, shared
    memory, a launch): warn once and record it as this configuration's outcome (`key`: self_check's
    arguments, as a tuple), so that `auto` moves to the next backend for it from this call on, as
    after a failed self-check."""
    backend, device = key[:2]
    _outcomes[key] = f"a call after the self-check failed: {error_line(error)}"
    warnings.warn(
        f"NA backend {backend!r} failed on {device} for {describe(key)} after passing its self-check: "
        f"{error_line(error)}. backend='auto' uses the next backend for these calls for the rest of "
        "the process.",
        RuntimeWarning,
        stacklevel=3,
    )


def describe(key: tuple) -> str:
    _, _, dtype, kernel_size, dilation, head_dim, has_rpb = key
    return (
        f"{str(dtype).removeprefix('torch.')}, kernel {kernel_size}, dilation {dilation}, "
        f"head dim {head_dim}, {'with' if has_rpb else 'without'} RPB"
    )


def outcomes() -> dict[tuple, str | None]:
    """Every self-check run so far: key -> None (passed) or the failure."""
    return dict(_outcomes)
