"""The fused backends' gradients are not themselves differentiable: refuse a double backward.

A backward run with create_graph=True (a gradient penalty, a Hessian-vector product) runs with grad
mode on; the cpp, torch and triton backends compute their gradients from saved tensors treated as
constants, so the second derivative would silently miss this op's terms. `once_differentiable` errs
only when the output gradient itself requires grad, not for the usual all-ones one, hence this check.
`naive` (plain ATen ops) has exact higher derivatives.
"""

from __future__ import annotations

import torch


def refuse_double_backward(backend: str) -> None:
    """RuntimeError when `backend`'s backward runs under create_graph=True."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the '{backend}' NA backend has no double backward (create_graph=True): use backend='naive' "
            "for higher-order gradients"
        )
