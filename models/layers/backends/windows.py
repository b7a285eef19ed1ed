"""Window geometry shared by every backend: where each query's neighbourhood starts on one axis.

Semantics are natten's (and the NAT/DiNAT papers'): with dilation `d`, position `i` belongs to the
dilation group `i % d`; inside its group (positions `g, g+d, g+2d, ...`) the window is the plain
k-window around `i // d`, its start clamped so that it stays inside the group. Windows are never
zero-padded at borders: border queries see a window shifted inwards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def geometry_cache(maxsize: int) -> Callable:
    """`functools.lru_cache` for index/mask tensors that depend only on shapes.

    The tensors are built outside inference mode: one first built under `torch.inference_mode()`
    would be an inference tensor, and every later training step at that size would fail with
    "Inference tensors cannot be saved for backward". Under torch.compile the builder is traced
    instead: Dynamo would trace through the cache anyway, warning once per call site that it did.
    """

    def decorate(build: Callable) -> Callable:
        def build_outside_inference_mode(*args):
            with torch.inference_mode(False):
                return build(*args)

        cached = functools.lru_cache(maxsize=maxsize)(build_outside_inference_mode)

        @functools.wraps(build)
        def lookup(*args):
            return build_outside_inference_mode(*args) if torch.compiler.is_compiling() else cached(*args)

        return lookup

    return decorate


def group_length(length: int, group, dilation: int):
    """Number of positions `group, group + d, ...` below `length` (`group`: an int or a tensor)."""
    return (length - group + dilation - 1) // dilation


def _starts_in_group(
    length: int, kernel_size: int, dilation: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position: its dilation group, its index in the group, and its window's start in the group."""
    pos = torch.arange(length)
    if dilation == 1:  # one group: skips the integer divisions (fewer nodes in exported graphs)
        group, index_in_group = torch.zeros_like(pos), pos
        size = torch.full_like(pos, length)
    else:
        group, index_in_group = pos % dilation, pos // dilation
        size = group_length(length, group, dilation)
    start_in_group = torch.minimum((index_in_group - kernel_size // 2).clamp(min=0), size - kernel_size)
    return group, index_in_group, start_in_group


def window_starts(length: int, kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """`(length,)` int64: first key position of each query's window (keys: start + d * t, t < k)."""
    group, _, start_in_group = _starts_in_group(length, kernel_size, dilation)
    return group + dilation * start_in_group


def axis_indices(length: int, kernel_size: int, dilation: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`window_indices` and `bias_indices` from one geometry computation (half the ops in a traced graph)."""
    group, index_in_group, start_in_group = _starts_in_group(length, kernel_size, dilation)
    slots = torch.arange(kernel_size)
    keys = (group + dilation * start_in_group)[:, None] + dilation * slots
    # (key - query) / d + k - 1, key and query in one group: the difference of their in-group indices
    bias = (start_in_group - index_in_group + kernel_size - 1)[:, None] + slots
    return keys, bias


def window_indices(length: int, kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """`(length, k)` int64: the key positions each query attends to on one axis."""
    return axis_indices(length, kernel_size, dilation)[0]


def bias_indices(length: int, kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """`(length, k)` int64: RPB row `(key - query) / d + k - 1` of each (query, window slot)."""
    return axis_indices(length, kernel_size, dilation)[1]
