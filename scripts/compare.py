#!/usr/bin/env python3
"""Train several models under one recipe, evaluate each best checkpoint, print a side-by-side table.

    # NAT vs Swin vs ConvNeXt (tiny) on ImageNet-100, same recipe, 8 GPUs each:
    python scripts/compare.py configs/nat_tiny.yaml configs/swin_tiny.yaml configs/convnext_tiny.yaml \\
        --common configs/imagenet100.yaml --data-dir /data/imagenet --nproc 8 --out runs/in100
    # just re-evaluate and tabulate finished runs:
    python scripts/compare.py configs/nat_tiny.yaml configs/swin_tiny.yaml --out runs/in100 --skip-train

Each model config is trained with `train.py -c MODEL.yaml [-c COMMON.yaml] --set ...` into
OUT/<label>/ (label = config name), then `eval.py` scores OUT/<label>/model_best.pth.tar. The table
(top-1, top-5, params, FLOPs, train img/s, eval img/s, train time) is printed and written to
OUT/comparison.{md,csv,json}; TensorBoard: `tensorboard --logdir OUT`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import compare  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="one model config per model to compare")
    p.add_argument("--common", action="append", default=[], help="config applied to every model (subset)")
    p.add_argument("--data-dir", help="= --set data.root=DIR")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every run")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--skip-train", action="store_true", help="reuse finished runs in --out")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun, DDP)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    return compare.run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
