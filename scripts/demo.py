#!/usr/bin/env python3
"""`make demo`: NAT vs Swin vs ConvNeXt, one recipe, on a 2-core CPU in a few minutes.

1. generates the embedded synthetic shapes dataset (10 classes, 32 px, light shapes on dark
   backgrounds; no download),
2. times a few training steps of each model on this CPU and prints the ETA,
3. trains a small NAT and a same-size Swin and ConvNeXt with configs/demo.yaml's recipe
   (configs/demo_{nat,swin,convnext}.yaml: the models only), evaluating each epoch,
4. evaluates each best checkpoint with eval.py,
5. prints the side-by-side table (top-1, top-5, params, FLOPs, train img/s, eval img/s), writes the
   learning curves (val top-1 vs images seen, all models on one plot: OUT/learning_curves.png and
   .csv) and says where the TensorBoard logs are.

The workload is fixed (same seed -> same numbers on one machine), sized so the slowest machine we
know (2-vCPU Zen 1, AVX2 only) finishes within 10 minutes including the first set-up; the ETA
scales it by this CPU's measured speed. A machine busy with other work should run
`OMP_NUM_THREADS=1 make demo` (two OpenMP threads sharing one core crawl).

Options: --out DIR (default runs/demo/<date-time>), --epochs N, --set KEY=VALUE (any config key,
applied to all three), --models nat swin (a subset).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import demo  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--models", nargs="+", default=list(demo.MODELS), choices=list(demo.MODELS))
    return demo.run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
