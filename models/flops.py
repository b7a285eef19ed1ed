"""FLOP counting that sees neighborhood attention at its true cost.

`count_flops` runs one forward pass under `torch.utils.flop_counter.FlopCounterMode` with the NA
operator forced onto its "naive" backend, which computes QK^T and AV as batched matmuls over exactly
kernel_size**2 keys per query: the counter then charges NA what the papers do. Convs, linears and
matmuls are counted; norms, activations, softmax and pooling are not (negligible, and left out of
the papers' tables too). Numbers are multiply-accumulates ("FLOPs" in the NAT/DiNAT/Swin tables).

Fused attention (`F.scaled_dot_product_attention`, the zoo mixers' workhorse) is charged its
QK^T and AV matmuls over the keys it is given: torch's counter knows the CUDA kernels but not the
CPU flash kernel, which is added here (without it a CPU count would miss full attention entirely).

A model built under `with torch.device("meta"):` is counted without allocating weights or
activations (the counter needs shapes only): the fast way to count big variants on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_flash_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flops}


def count_flops(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), batch_size: int = 1) -> int:
    """Multiply-adds of one forward pass of `model` on a `(batch_size, *input_size)` input."""
    from .layers import use_backend  # the NA operator; imported here so `models` imports without it

    if len(input_size) != 3:
        raise ValueError(f"input_size must be (channels, height, width), got {tuple(input_size)}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(batch_size, *input_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
        with torch.no_grad(), use_backend("naive"), counter:
            model(x)
    finally:
        model.train(was_training)
    # FlopCounterMode counts a multiply and an add per MAC
    return counter.get_total_flops() // 2
