#!/usr/bin/env python3
"""The attention zoo study: what each token mixer costs and what it buys, measured here.

    python scripts/zoo.py --out runs/zoo-study --jobs 2     # the full study (make zoo: docs/zoo.md)
    python scripts/zoo.py --out /tmp/zoo --quick            # all three parts end to end, tiny (CI)
    python scripts/zoo.py --out runs/zoo-study --parts scaling --mixers na full linear
    python scripts/zoo.py --out runs/zoo-seeds --parts accuracy patterns --seeds pathfinder=6 shapes=3

Three parts, each writing OUT/<part>.json and a figure (scaling, accuracy: .csv and .md too):

1. scaling: each mixer of `models.mixers.MIXERS` alone at NAT-Tiny's stage-1 width (dim 64, 2 heads,
   windows 7), forward + backward of a (1, side, side, 64) map at side 16, 32, 64, 128, in interleaved
   rounds through the repo's harness (`engine.bench`); per size the time, the peak-RSS increase, the
   ratio to `full` (fused SDPA) round by round, and per mixer the log-log slope of time vs tokens over
   32^2..128^2 (1 = linear, 2 = quadratic). LRA's speed/memory table, against a fused baseline.
2. accuracy: every mixer in one small NAT backbone under one recipe (configs/zoo.yaml) on the
   embedded shapes task (configs/zoo_shapes.yaml: rewards locality) and the embedded long-range
   Pathfinder-like task (configs/zoo_pathfinder.yaml: needs it); `train.py` runs each (mixer, seed)
   as a subprocess. Final-epoch val top-1, mean and range over seeds, params, FLOPs
   (`models.count_flops`), train img/s. Pathfinder as escape rates (runs whose far-pair top-1 clears
   the val set's one-sided binomial noise) with 95% Wilson intervals; a mixer beats or trails `na`
   only where the intervals separate (figure: escape.png).
3. patterns: one PNG, a panel per mixer: on a 14x14 map, which input positions a centre query and a
   corner query read, as |d out[query] / d x| (exact for every mechanism: a linear or low-rank mixer
   reads everywhere, and the panel shows it). Stage-1 mixers of the seed-0 pathfinder models when
   the accuracy part has trained them (learned/random patterns as trained), else freshly built ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import zoo  # noqa: E402
from engine.zoo.study import HEADLINE, SIDES, TASKS  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/zoo-study", help="output folder")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["scaling", "accuracy", "patterns"],
        choices=["scaling", "accuracy", "patterns"],
    )
    p.add_argument("--mixers", nargs="+", help="mixers to study (default: every registered one)")
    p.add_argument("--quick", action="store_true", help="all parts, tiny: seconds (CI)")
    p.add_argument("--sides", nargs="+", type=int, default=list(SIDES), help="scaling: map sides")
    p.add_argument("--rounds", type=int, default=3, help="scaling: interleaved timing rounds")
    p.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="scaling: untimed calls per mixer and size (after a first call and a probe)",
    )
    p.add_argument(
        "--max-step-s", type=float, default=30.0, help="scaling: drop a mixer whose step is slower"
    )
    p.add_argument(
        "--min-sample-s", type=float, default=0.3, help="scaling: repeat short steps up to this per sample"
    )
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument(
        "--seeds",
        nargs="+",
        default=["1"],
        metavar="[TASK[/MIXER]=]N",
        help="accuracy: seeds of every mixer, for every task (N) or one (TASK=N), or of one mixer on one "
        "task (TASK/MIXER=N): e.g. pathfinder=6 shapes=3 pathfinder/dilated=18",
    )
    p.add_argument(
        "--headline-seeds",
        type=int,
        help=f"accuracy: at least this many seeds for {', '.join(HEADLINE)} (default 2; --quick: 1)",
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="accuracy: training runs side by side (2 on a 2-core CPU)"
    )
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="accuracy: train.py overrides")
    p.add_argument("--verbose", action="store_true", help="show train.py's output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return zoo.run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
