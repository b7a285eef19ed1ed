#!/usr/bin/env python
"""Verify and measure every GPU path in one run (aimed at <= 8 minutes on one H100/H200).

    python scripts/gpu_check.py                    # on a machine with a CUDA GPU
    python scripts/gpu_check.py --dry-run          # CPU, tiny shapes, seconds: checks the script (CI)

Sections (engine/gpu_check.py says what each checks and measures): self_check (the check `auto`
runs before trusting natten or Triton), operator (every backend against the float64 reference),
na_timing (NA fwd+bwd on NAT-T/DiNAT-T layer shapes), train (NAT-T, DiNAT-T, Swin-T, ConvNeXt-T in
bf16 at batch 64: train and inference img/s, peak memory), sweep (scripts/benchmark.py on the GPU);
and, asked for by name (`--sections tiles`, a second call), tiles: the Triton kernels' query tile
sweep on the na_timing shapes.

Writes gpu_check.json and gpu_check.md to --out, after every section. Exit status 1 when a check
failed (a self-check, a wrong gradient, a non-finite loss, a section that crashed) or a section did
not start within --budget; missed speed targets are reported, not failed; 2 without a GPU (and
without --dry-run).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:
    # Triton chooses interpreted or compiled when first imported (torch, imported next, imports it)
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(REPO))

from engine import gpu_check  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "output" / "gpu_check")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="on the CPU, tiny shapes and models, Triton interpreted: seconds; numbers meaningless",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        default=list(gpu_check.DEFAULT_SECTIONS),
        choices=gpu_check.SECTIONS,
        help="default: all but `tiles` (the Triton tile sweep: a second call's)",
    )
    p.add_argument("--sweep-timeout", type=int, default=330, help="seconds the benchmark sweep may take")
    p.add_argument(
        "--budget",
        type=float,
        default=480,
        help="seconds after which no section starts",
    )
    p.add_argument(
        "--deadline", type=float, default=540, help="seconds by which the sweep stops (its output is kept)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return gpu_check.run(
        args.out, args.dry_run, args.sections, args.sweep_timeout, args.budget, args.deadline
    )


if __name__ == "__main__":
    sys.exit(main())
