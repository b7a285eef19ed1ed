"""bf16 on the CPU: which units the CPU has for it, and what a run's log says about that.

Autocast in bf16 pays only where the CPU multiplies bf16 in hardware (oneDNN's AMX-BF16 or
AVX512-BF16 kernels); elsewhere oneDNN emulates it and a run is many times slower than in float32
(docs/benchmarks.md, "Without bf16 hardware"). train.py and eval.py say which case a run is in."""

from __future__ import annotations

import platform

import torch

NO_BF16_UNITS = (
    "this CPU has neither AMX-BF16 nor AVX512-BF16: bf16 autocast is emulated here and runs many times "
    "slower than float32"
)


def cpu_bf16_units() -> str | None:
    """What runs bf16 matrix products on this x86 CPU, as ATen's own checks see it: "AMX-BF16",
    "AVX512-BF16", or "none" (emulated); None where torch can't tell (another architecture, a torch
    without the checks)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if amx is None or avx512_bf16 is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return "AMX-BF16" if amx() else "AVX512-BF16" if avx512_bf16() else "none"


def cpu_precision_notes(use_amp: bool) -> tuple[str, str | None]:
    """For a run on the CPU: what its precision log line adds (the bf16 units and, where they exist
    and autocast is off, how to turn it on), and the warning to print, if any (autocast on, no units)."""
    units = cpu_bf16_units()
    notes = [f"bf16 units: {units}"] if units else []
    if not use_amp and units != "none":
        notes.append("train.amp true / --amp: bfloat16 autocast")
    warning = f"warning: {NO_BF16_UNITS}; drop --amp" if use_amp and units == "none" else None
    return (f" ({'; '.join(notes)})" if notes else ""), warning
