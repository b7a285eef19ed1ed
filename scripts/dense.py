#!/usr/bin/env python3
"""Detection (Mask R-CNN / FCOS) or semantic segmentation (UPerNet) over any timm backbone.

    # the embedded shapes scene task, NAT from a classification run of train.py (make demo's:
    # runs/demo/<date-time>/demo_nat):
    python scripts/dense.py --task detection --config configs/dense_detection.yaml --pretrained RUN
    python scripts/dense.py --task segmentation --config configs/dense_segmentation.yaml --quick
    python scripts/dense.py --resume runs/dense/RUN        # continue a stopped run
    python scripts/dense.py --draw runs/dense/RUN          # RUN/predictions.png: boxes, masks on val images
    python scripts/dense.py --evaluate runs/dense/RUN --scales 0.5 0.75 1 1.25 1.5 1.75 --flip  # MS test
    python scripts/dense.py --report runs/dense-compare    # table, learning curves of its runs

Real data: data.layout=folders with data.root and the COCO (instances_*.json) / ADE20K-style
(images/, annotations/) paths under it; see engine/dense_config.py's DEFAULTS for every key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import dense  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=dense.TASKS, help="required unless --resume")
    p.add_argument("--config", action="append", help="YAML config (repeat to compose)")
    p.add_argument("--backbone", help="= backbone.name=NAME (any timm model with features_only)")
    p.add_argument("--pretrained", help="= backbone.checkpoint=PATH: a classification checkpoint of train.py")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last epoch")
    p.add_argument("--draw", metavar="RUN", help="draw a finished run's predictions on val images")
    p.add_argument(
        "--evaluate",
        metavar="RUN",
        help="score a finished run's best weights on its val split (RUN/evaluation.json)",
    )
    p.add_argument(
        "--scales",
        nargs="+",
        type=float,
        default=[1.0],
        help="with --evaluate, segmentation: the input rescaled by each, softmax averaged (mmseg's "
        "multi-scale test: 0.5 0.75 1 1.25 1.5 1.75 with --flip)",
    )
    p.add_argument(
        "--flip", action="store_true", help="with --evaluate, segmentation: mirrored inputs averaged too"
    )
    p.add_argument(
        "--report",
        metavar="DIR",
        help="tabulate and plot the finished runs under DIR (runs named <task>-<label>-s<seed>, "
        "e.g. train.experiment=detection-nat-s0, are grouped by label over seeds; others are a row each)",
    )
    p.add_argument(
        "--speed-rounds", type=int, default=0, help="with --report: also time the runs side by side"
    )
    p.add_argument("--quick", action="store_true", help="a tiny run end to end (CI): 48 images, 2 epochs")
    p.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    args = p.parse_args(argv)
    modes = [f"--{m}" for m in ("resume", "draw", "report", "evaluate") if getattr(args, m)]
    if not (args.task or modes):
        p.error("--task detection|segmentation is required (or --resume / --draw / --report / --evaluate)")
    if len(modes) > 1:
        p.error(f"{' and '.join(modes)}: give one of them at a time")
    settings = {"--task": args.task, "--config": args.config, "--backbone": args.backbone}
    settings |= {"--pretrained": args.pretrained, "--set": args.set, "--quick": args.quick}
    new_run = [flag for flag, value in settings.items() if value]
    if modes and new_run:
        p.error(
            f"{modes[0]} takes a run as it was configured; {', '.join(new_run)} would not apply "
            "(start a new run for other settings)"
        )
    if (args.scales != [1.0] or args.flip) and "--evaluate" not in modes:
        p.error("--scales and --flip go with --evaluate RUN")
    if any(not 0.25 <= s <= 4 for s in args.scales):
        p.error(f"--scales must be between 0.25 and 4, got {args.scales}")
    if args.speed_rounds and "--report" not in modes:
        p.error("--speed-rounds goes with --report DIR")
    return dense.run(args)


if __name__ == "__main__":
    sys.exit(main())
