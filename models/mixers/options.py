"""Option checks shared by the global/content-based zoo mixers: one ValueError naming the valid range."""

from __future__ import annotations


def check_int(name: str, value: int, low: int, high: int | None = None, *, even: bool = False) -> int:
    """Return `value` if it is an int in `[low, high]` (and even when asked), else raise one ValueError."""
    valid = f">= {low}" if high is None else f"in [{low}, {high}]"
    kind = "an even int" if even else "an int"
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
        or (even and value % 2)
    ):
        raise ValueError(f"{name} must be {kind} {valid}, got {value!r}")
    return value


def check_positive(name: str, value: float) -> float:
    """Return `value` if it is a number > 0, else raise one ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def reject_unused(mixer: str, qk_scale: float | None = None, attn_drop: float = 0.0) -> None:
    """Refuse shared options a mechanism has nothing to apply to (no q·k logits, no attention matrix)."""
    if qk_scale is not None:
        raise ValueError(f"{mixer} has no q·k logits to scale: leave qk_scale=None (got {qk_scale!r})")
    if attn_drop:
        raise ValueError(
            f"{mixer} forms no attention matrix to drop out: use attn_drop=0.0 and proj_drop instead "
            f"(got attn_drop={attn_drop!r})"
        )
