"""`neighborhood_attention_2d`: the one public entry point of the NA operator."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .backends.checks import BACKENDS, call_fields, forced_backend, resolve_backend, trusted_backend
from .backends.cpp_kernel import na2d_cpp
from .backends.flex import na2d_flex
from .backends.naive import na2d_naive, naive_attention
from .backends.natten_na import na2d_natten
from .backends.self_check import SELF_CHECKED, distrust_after_failed_call
from .backends.torch_tiled import na2d_tiled
from .backends.triton_na import na2d_triton

_IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "cpp": na2d_cpp,
    "torch": na2d_tiled,
    "naive": na2d_naive,
    "natten": na2d_natten,
    "flex": na2d_flex,
    "triton": na2d_triton,
}
assert set(_IMPLEMENTATIONS) == set(BACKENDS)
# Backends that also take the packed qkv tensor behind q, k, v (keyword `qkv`) and read it themselves.
_TAKE_QKVPACKED = frozenset({"cpp"})


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every NA call inside the block on backend `name` (overrides each call's `backend`)."""
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"unknown NA backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    token = forced_backend.set(name)
    try:
        yield
    finally:
        forced_backend.reset(token)


def check_window(kernel_size, dilation) -> None:
    """ValueError unless `kernel_size` is an odd integer >= 1 and `dilation` an integer >= 1 (NA's window:
    a query at its centre); modules check at construction, the operator at each call."""

    def integer(x) -> bool:  # True is an int to Python, not a window size
        return isinstance(x, int) and not isinstance(x, bool)

    if not (integer(kernel_size) and kernel_size >= 1 and kernel_size % 2 == 1):
        raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
    if not (integer(dilation) and dilation >= 1):
        raise ValueError(f"dilation must be an integer >= 1, got {dilation!r}")


def _validate(q, k, v, kernel_size, dilation, rpb) -> None:
    check_window(kernel_size, dilation)
    if q.dim() != 5:
        raise ValueError(
            f"q, k, v must be (batch, height, width, heads, head_dim); got q of shape {tuple(q.shape)}"
        )
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; they must match"
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")
    if q.shape[3] < 1 or q.shape[4] < 1:
        raise ValueError(f"q, k, v need a head and a channel per head at least; got shape {tuple(q.shape)}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    _, height, width, heads, _ = q.shape
    window = kernel_size * dilation
    if height < window or width < window:
        raise ValueError(
            f"feature map {height}x{width} is smaller than the window kernel_size*dilation = {window}; "
            "zero-pad it to at least that (NeighborhoodAttention2D does) or use a smaller kernel/dilation"
        )
    if rpb is not None:
        expected = (heads, 2 * kernel_size - 1, 2 * kernel_size - 1)
        if tuple(rpb.shape) != expected:
            raise ValueError(f"rpb must have shape (heads, 2k-1, 2k-1) = {expected}, got {tuple(rpb.shape)}")
        if rpb.device != q.device:
            raise ValueError(f"rpb is on {rpb.device} but q is on {q.device}")


def neighborhood_attention_2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    attn_drop: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """2-D neighborhood attention (NAT / DiNAT), `(B, H, W, heads, head_dim)` in and out.

    Query (i, j) attends to the `kernel_size x kernel_size` keys nearest to it inside its dilation
    group, the window clamped to stay inside the map. `rpb` `(heads, 2k-1, 2k-1)` adds
    `rpb[h, (ki - qi)/d + k - 1, (kj - qj)/d + k - 1]` to each logit. `scale` defaults to
    `head_dim ** -0.5`. `backend`: 'auto' (see `explain_backends`), 'cpp', 'torch', 'naive', 'natten'
    or 'flex'; a backend that can't serve the call raises ValueError saying why. Under autocast,
    float32 q, k, v are cast to its dtype (as for SDPA); `rpb` is read in its own dtype.
    """
    return _dispatch(q, k, v, kernel_size, dilation, rpb, scale, attn_drop, backend, None)


def neighborhood_attention_2d_qkvpacked(
    qkv: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    attn_drop: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """`neighborhood_attention_2d(*qkv.unbind(3), ...)` for qkv `(B, H, W, 3, heads, head_dim)`, one
    projection's output (as flash-attn's `qkvpacked` functions take it): the same backend choice and
    numbers. The `cpp` backend then copies q, k, v into its layout at once and writes qkv's gradient
    whole, where three views cost three copies and a stack of three gradients.
    """
    if qkv.dim() != 6 or qkv.shape[3] != 3:
        raise ValueError(
            f"qkv must be (batch, height, width, 3, heads, head_dim); got shape {tuple(qkv.shape)}"
        )
    return _dispatch(*qkv.unbind(3), kernel_size, dilation, rpb, scale, attn_drop, backend, qkv)


def _dispatch(q, k, v, kernel_size, dilation, rpb, scale, attn_drop, backend, qkv) -> torch.Tensor:
    """Validates, picks the backend and runs it; `qkv`: what q, k, v are the views of, or None."""
    _validate(q, k, v, kernel_size, dilation, rpb)
    if not 0 <= attn_drop <= 1:
        raise ValueError(f"attn_drop is a probability in [0, 1], got {attn_drop}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    requested = forced_backend.get() or backend
    fields = call_fields(q, k, v, rpb, attn_drop)
    if fields[1] != q.dtype:  # float32 under autocast: run in its dtype (checks.compute_dtype)
        if qkv is not None:
            qkv = qkv.to(fields[1])
            q, k, v = qkv.unbind(3)
        else:
            q, k, v = (t.to(fields[1]) for t in (q, k, v))
    name = resolve_backend(requested, *fields, q.shape[-1])

    def run(backend: str) -> torch.Tensor:
        packed = {"qkv": qkv} if qkv is not None and backend in _TAKE_QKVPACKED else {}
        return _IMPLEMENTATIONS[backend](q, k, v, kernel_size, dilation, rpb, scale, attn_drop, **packed)

    if name not in SELF_CHECKED:
        return run(name)
    # CUDA kernels: trusted once checked on this configuration; under `auto`, one that fails later on
    # a real call is distrusted for it and the call reruns on the next backend (self_check.py).
    configuration = (kernel_size, dilation, q.shape[-1], str(q.device))
    name = trusted_backend(requested, name, *fields, *configuration)
    if requested != "auto" or name not in SELF_CHECKED or torch.compiler.is_compiling():
        return run(name)
    try:
        return run(name)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 (compile, resource or launch errors: warned, then rerun)
        key = (name, str(q.device), q.dtype, kernel_size, dilation, q.shape[-1], rpb is not None)
        distrust_after_failed_call(key, error)
    return run(trusted_backend(requested, name, *fields, *configuration))


def neighborhood_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The attention weights `(B, H, W, heads, k, k)` of `neighborhood_attention_2d` (same arguments).

    `weights[b, i, j, h, a, c]` is query (i, j)'s weight on the key at
    (`window_indices(H, k, d)[i, a]`, `window_indices(W, k, d)[j, c]`) (`backends/windows.py`); each
    query's k*k weights sum to 1. Computed on the exact gather path (the `naive` backend).
    """
    _validate(q, k, v, kernel_size, dilation, rpb)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    _, weights = naive_attention(q, k, v, kernel_size, dilation, rpb, scale, 0.0)
    return weights.unflatten(-1, (kernel_size, kernel_size))
