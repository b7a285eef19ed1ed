#!/usr/bin/env python3
"""Evaluate a checkpoint on a dataset or subset: top-1, top-5, loss, img/s, per-class accuracy -> JSON.

    python eval.py runs/<run>/model_best.pth.tar                       # ours: model, classes, data known
    python eval.py runs/<run>/model_best.pth.tar --use-ema --img-size 256 --crop-pct 1.0
    python eval.py nat_mini.pth --model nat_mini --data-dir /data/imagenet   # official NAT/DiNAT file
    python eval.py swin.pth --model swin_tiny_patch4_window7_224 --data-dir /data/imagenet \\
        --class-list imagenet100.txt                                   # a 1k model on a subset

Our training checkpoints carry the architecture (and its kwargs), the class names, the data settings
and the eval transform; weights from scripts/export_weights.py carry all but the dataset (give
--data-dir); anything else needs --model and --data-dir. Dataset classes are matched to the model's
outputs by name: the checkpoint's class list, or ImageNet-1k wnid order for a 1000-class model;
integer-named folders (ImageNetV2's 0..999) stand for output indices. A val folder holding only some
of the classes is scored on those (logits restricted to them, said in the output); --class-list FILE
picks a subset.
"""

from __future__ import annotations

import argparse
import sys

from configs import CHOICES
from engine.bench import int_at_least, positive_int
from engine.evaluate import run


def crop_fraction(text: str) -> float:
    """--crop-pct: a fraction > 0 (0 fell back to timm's default crop without a word)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (a fraction of the image, e.g. 0.875), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Evaluate a checkpoint (ours, timm's, or an official NAT/DiNAT file).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("checkpoint", help="checkpoint file (or a run folder: its model_best.pth.tar)")
    p.add_argument("--model", help="timm model name (default: the checkpoint's arch)")
    p.add_argument(
        "--model-kwargs", default=None, help="YAML dict of timm.create_model kwargs (over the checkpoint's)"
    )
    p.add_argument("--num-classes", type=positive_int, help="model outputs (default: from the checkpoint)")
    p.add_argument("-c", "--config", action="append", default=[], help="take the data section from configs")
    p.add_argument("--data-dir", help="dataset root (default: the checkpoint's)")
    p.add_argument("--dataset", help="folder | synthetic | timm reader name")
    p.add_argument("--split", default=None, help="split folder to evaluate (default: data.val_split)")
    p.add_argument("--class-list", help="file of class names making the subset")
    p.add_argument("--max-per-class", type=positive_int, help="cap images per class")
    p.add_argument("--img-size", type=positive_int, help="eval resolution (default: the training one)")
    p.add_argument("--crop-pct", type=crop_fraction, help="center-crop fraction (default: the training one)")
    p.add_argument(
        "--interpolation",
        choices=[c for c in CHOICES["data.interpolation"] if c],
        help="resize interpolation (default: the training one)",
    )
    p.add_argument("-b", "--batch-size", type=positive_int, default=64)
    p.add_argument(
        "-j", "--workers", type=int_at_least(0), default=None, help="DataLoader workers (0: in process)"
    )
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--amp", action="store_true", help="bfloat16 autocast (GPU; CPU: fast with AMX / AVX512-BF16)"
    )
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--output",
        "-o",
        help="JSON file (default: <checkpoint>-eval[-ema].json; RUN/eval[-ema].json for a run folder)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-class table")
    return p


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
