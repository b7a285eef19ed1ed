#!/usr/bin/env python
"""Sort ImageNet's flat validation folder into class folders (val/<wnid>/*.JPEG) for the folder reader.

Examples:
  # Kaggle / ImageNet localization download: LOC_val_solution.csv
  python scripts/prepare_imagenet_val.py datasets/imagenet/val --labels LOC_val_solution.csv --dry-run
  python scripts/prepare_imagenet_val.py datasets/imagenet/val --labels LOC_val_solution.csv
  # "filename wnid" lines, symlinked into a new folder (originals untouched)
  python scripts/prepare_imagenet_val.py flat_val --labels val_labels.txt --out imagenet/val --mode symlink
  # devkit ground truth (one ILSVRC2012_ID per line) + a synset map in ILSVRC2012_ID order
  python scripts/prepare_imagenet_val.py flat_val --labels ILSVRC2012_validation_ground_truth.txt \\
      --synsets synsets_in_devkit_order.txt
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.errors import DataError  # noqa: E402
from data.imagenet import __doc__ as FORMATS  # noqa: E402
from data.imagenet import check_sort_mode, execute_val_sort, plan_val_sort, read_val_labels  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Label file formats and safety rules (from data/imagenet.py):\n"
        + FORMATS.split("\n", 1)[1]
        + "\n"
        + __doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("val_dir", help="folder holding the flat ILSVRC2012_val_*.JPEG files")
    add(
        "--labels",
        required=True,
        help="labels file: LOC_val_solution.csv, 'filename wnid' lines, or one integer label per line "
        "(format detected from the content)",
    )
    add("--synsets", help="synset map for integer labels: one wnid per line, in label order")
    add(
        "--label-base",
        type=int,
        default=1,
        choices=(0, 1),
        help="number of the synset map's first line for integer labels (default 1)",
    )
    add("--out", help="where to create <wnid>/ folders (default: inside VAL_DIR)")
    add(
        "--mode",
        choices=("move", "symlink", "copy"),
        default="move",
        help="move the files (default), symlink to them (needs --out), or copy them",
    )
    add("--dry-run", action="store_true", help="check and print the plan, change nothing")
    add("--allow-missing", action="store_true", help="sort what is there even if labelled images are absent")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        labels = read_val_labels(args.labels, args.synsets, args.label_base)
        plan = plan_val_sort(args.val_dir, labels, args.out, allow_missing=args.allow_missing)
        print(plan.summary())
        if plan.unlabelled:
            n, first = len(plan.unlabelled), plan.unlabelled[0]
            print(f"warning: {n} images have no label and stay where they are, e.g. {first}")
        check_sort_mode(plan, args.mode)
        if args.dry_run:
            for src, dst in plan.todo[:5]:
                print(f"would {args.mode} {src} -> {dst}")
            for path, dst in plan.resort[:5]:
                print(f"would move {path} -> {dst}")
            print("dry run: nothing changed")
            return 0
        n = execute_val_sort(plan, mode=args.mode, log=print)
        verb = {"move": "moved", "symlink": "symlinked", "copy": "copied"}[args.mode]
        resorted = f", {len(plan.resort)} moved to their labels' class folders" if plan.resort else ""
        print(f"done: {n} images {verb} into {plan.out_dir}{resorted}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
