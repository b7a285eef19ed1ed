"""The attention zoo: token mixers that drop into the NAT backbone in place of neighborhood attention.

Every mixer is `MIXERS[name](dim, num_heads, **options)`, maps a channels-last `(B, H, W, C)` map to
`(B, H, W, C)` for any `H, W >= 1`, and owns its projections. A family file registers its classes
with `@register_mixer("name")`; importing `models` imports every family file, which fills `MIXERS`.

The backbone builds a block's mixer with `build_mixer`: the block's own attention arguments
(`qkv_bias`, `qk_scale`, `attn_drop`, `proj_drop`) always pass through; NAT's `kernel_size`, a
DiNAT block's dilation (when > 1) and `attn_backend` go to the mixers whose `__init__` takes
`kernel_size` / `dilation` / `backend`; the user's `mixer_kwargs` override all of these.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

MIXERS: dict[str, type[nn.Module]] = {}

# Arguments the backbone block owns: every mixer takes them, `mixer_kwargs` may not set them.
BLOCK_ARGS = ("qkv_bias", "qk_scale", "attn_drop", "proj_drop")


def register_mixer(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: add the mixer to `MIXERS` under `name` (one name, one class)."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MIXERS and MIXERS[name] is not cls:
            raise ValueError(
                f"mixer name {name!r} is registered twice ({MIXERS[name].__name__}, {cls.__name__})"
            )
        MIXERS[name] = cls
        return cls

    return add


def mixer_options(name: str) -> dict[str, Any]:
    """The options mixer `name` takes (beyond dim, num_heads and the block's arguments), with defaults."""
    params = list(inspect.signature(mixer_class(name).__init__).parameters.values())[1:]  # drop self
    return {
        p.name: p.default
        for p in params
        if p.name not in ("dim", "num_heads", *BLOCK_ARGS)
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def mixer_class(name: str) -> type[nn.Module]:
    """`MIXERS[name]`, or one ValueError listing the registered names."""
    if not isinstance(name, str) or name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; choose one of: {', '.join(sorted(MIXERS))}")
    return MIXERS[name]


def check_mixer(name: str, options: Mapping[str, Any]) -> None:
    """Raise one ValueError if `name` is not registered or does not take one of `options`."""
    valid = mixer_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        choices = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        owned = [k for k in unknown if k in BLOCK_ARGS]
        hint = f" ({', '.join(owned)}: set on the model, not in mixer_kwargs)" if owned else ""
        raise ValueError(
            f"mixer {name!r} does not take option(s) {', '.join(unknown)}{hint}; its options: {choices}"
        )


def build_mixer(
    name: str,
    dim: int,
    num_heads: int,
    *,
    kernel_size: int,
    dilation: int = 1,
    backend: str = "auto",
    qkv_bias: bool = True,
    qk_scale: float | None = None,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The mixer of one NAT block; see the module docstring for which arguments reach it."""
    options = dict(options or {})
    check_mixer(name, options)
    valid = mixer_options(name)
    args: dict[str, Any] = {}
    if "kernel_size" in valid:
        args["kernel_size"] = kernel_size
    # a NAT block's dilation 1 means "no DiNAT dilation here": a dilated mixer keeps its own default
    if "dilation" in valid and dilation > 1:
        args["dilation"] = dilation
    if "backend" in valid:
        args["backend"] = backend
    args.update(options)
    return mixer_class(name)(
        dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop, **args
    )


# The family files register their mixers on import (after MIXERS exists).
from . import (  # noqa: E402, F401
    bigbird,
    full,
    kernel,
    longformer,
    lowrank,
    lsh,
    neighborhood,
    sinkhorn,
    synthesizer,
    window,
)

__all__ = [
    "BLOCK_ARGS",
    "MIXERS",
    "build_mixer",
    "check_mixer",
    "mixer_class",
    "mixer_options",
    "register_mixer",
]
