"""The attention zoo: token mixers that drop into the NAT backbone in place of neighborhood attention.

Every mixer is `MIXERS[name](dim, num_heads, **options)`, maps a channels-last `(B, H, W, C)` map to
`(B, H, W, C)` for any `H, W >= 1`, and owns its projections. A family file registers its classes
with `@register_mixer("name")`; importing `models` imports every family file, which fills `MIXERS`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

MIXERS: dict[str, type[nn.Module]] = {}


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


__all__ = ["MIXERS", "register_mixer"]

# Family files register their mixers on import (they import `register_mixer` from here).
from . import kernel, lowrank, lsh, sinkhorn, synthesizer  # noqa: E402, F401
