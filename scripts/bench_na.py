#!/usr/bin/env python
"""Benchmark the NA operator: each backend vs a naive gather, dense attention and Swin windows.

Times forward and forward+backward of one attention call (q, k, v of shape (B, S, S, heads, D), plus
the relative position bias where the method has one) for several map sizes S, side by side in one
run (interleaved rounds through engine.bench: each round times every method once), and prints ratios
against the first method (default `cpp`, the CPU default). Writes CSV and a log-log plot of time vs
tokens.

    python scripts/bench_na.py                      # the full CPU sweep, 14^2 ... 224^2
    python scripts/bench_na.py --sizes 56 --tiles 4 6 8 10 14   # tile-size sweep of the torch backend
    python scripts/bench_na.py --methods cpp --dtype float32 bfloat16 --qkv-views   # bf16 vs fp32, as in NAT
    python scripts/bench_na.py --quick              # seconds; checks the script end to end
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import bench_na  # noqa: E402
from engine.bench import positive_int  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[14, 28, 56, 112, 224])
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--heads", type=positive_int, default=2)
    parser.add_argument("--head-dim", type=positive_int, default=32)
    parser.add_argument("--kernel-size", type=positive_int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["cpp", "torch", "naive", "window", "dense", "natten", "flex"],
        help="ratios are taken against the first",
    )
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument(
        "--tiles", type=int, nargs="*", default=[], help="also time the torch backend at these tiles"
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16"],
        help="q, k, v dtypes (bias stays float32): each method at each, labelled method:dtype after the 1st",
    )
    parser.add_argument(
        "--qkv-views",
        action="store_true",
        help="q, k, v as slices of one (B, S, S, 3, heads, D) tensor, as in NAT",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--out", type=Path, default=Path("output/bench_na"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the script runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.warmup, args.repeats = [14, 28], 2, 1, 1
    if problem := bench_na.argument_error(args):
        parser.error(problem)
    return bench_na.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
