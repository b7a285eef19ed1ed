#!/usr/bin/env python3
"""Dense backbones at high resolution: forward time and peak memory against input size.

NAT-T and DiNAT-T (the official dense layout; DiNAT with the COCO dilations) next to Swin-T, ConvNeXt-T
and ViT-S (global attention), batch 1, inference, interleaved rounds per input size; the FPN neck's
time on each backbone's maps; log-log slopes against pixels over 512^2 .. 1024^2. Writes
OUT/dense_cost.{md,csv,json} and OUT/dense-cost.png (engine/dense_cost.py); a backbone that fails at a
size (out of memory, say) gets its row's `error`, the others are measured, and the exit status is 1.

    OMP_NUM_THREADS=1 python scripts/dense_cost.py                       # 224^2 .. 1024^2 and 800x1216
    python scripts/dense_cost.py --models NAT-T ViT-S --sizes 512 1024 --rounds 2
    python scripts/dense_cost.py --quick                                 # seconds: 64^2 and 96^2, 1 round
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import dense_cost  # noqa: E402
from engine.bench import failed_rows, positive_int, writable_folder  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(dense_cost.BACKBONES), help="backbones to measure")
    p.add_argument(
        "--sizes", nargs="+", default=None, metavar="S|HxW", help="input sizes (default: the study's)"
    )
    p.add_argument("--rounds", type=positive_int, default=3, help="timed rounds per size below 768^2")
    p.add_argument("--large-rounds", type=positive_int, default=2, help="timed rounds from 768^2 pixels on")
    p.add_argument("--out", default="runs/dense_cost", help="output folder")
    p.add_argument("--plot", default=None, help="where the plot goes (default OUT/dense-cost.png)")
    p.add_argument("--quick", action="store_true", help="64^2 and 96^2, one round: checks the pipeline")
    args = p.parse_args(argv)
    try:
        dense_cost.check_names(args.models)
        sizes = (
            [dense_cost.parse_size(s) for s in args.sizes] if args.sizes else list(dense_cost.DEFAULT_SIZES)
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if problem := writable_folder(args.out):  # before the measurement, not after it
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.quick:
        sizes, args.rounds, args.large_rounds = [(64, 64), (96, 96)], 1, 1
    rows = dense_cost.measure(args.models, sizes, args.rounds, args.large_rounds)
    out = Path(args.out)
    dense_cost.write_outputs(rows, out, Path(args.plot) if args.plot else None)
    print((out / "dense_cost.md").read_text())
    return failed_rows(rows, lambda r: f"{r['backbone']} at {r['height']}x{r['width']}")


if __name__ == "__main__":
    sys.exit(main())
