"""natten's `na2d` (>= 0.20): fused kernels on CUDA builds, FlexAttention elsewhere.

natten >= 0.20 has no relative position bias and no attention dropout; on CPU it runs forward only.
`checks.py` keeps it to the cases it can serve.
"""

from __future__ import annotations

import torch


def natten_version() -> str | None:
    try:
        import natten
    except Exception:  # natten missing or built against another torch: treat as unavailable
        return None
    return getattr(natten, "__version__", "unknown")


def natten_has_cuda_kernels() -> bool:
    """Whether natten was built with libnatten, its CUDA kernels (`make setup NATTEN_CUDA=1`). Without
    it natten's CUDA path is its FlexAttention backend, uncompiled by default."""
    try:
        import natten
    except Exception:  # as natten_version
        return False
    return bool(getattr(natten, "HAS_LIBNATTEN", False))


def na2d_natten(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int,
    rpb: torch.Tensor | None,
    scale: float,
    attn_drop: float,
) -> torch.Tensor:
    import natten

    try:
        return natten.na2d(q, k, v, kernel_size=kernel_size, dilation=dilation, scale=scale)
    # natten's own rules beyond those checks.py knows (it knows the CPU head dims), checked inside
    except NotImplementedError as e:
        reason = str(e).splitlines()[0] if str(e) else "no kernel for this call"
        raise ValueError(
            f"backend 'natten' can't run this call (head dim {q.shape[-1]}, {q.dtype}, {q.device.type}): "
            f"{reason}; use backend='auto'"
        ) from None
