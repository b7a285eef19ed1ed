"""The attention zoo study behind scripts/zoo.py: what each token mixer costs and what it buys.

`run(args)` is the script's command: it checks the arguments and the finished runs it would reuse
before any work, then runs the parts asked for, each writing OUT/<part>.json and a figure
(scaling and accuracy: .csv and .md too):
`engine.zoo.scaling` (time and memory against tokens), `engine.zoo.accuracy` (training every mixer
on two tasks) and `engine.zoo.patterns` (where a query reads). What the study is (mixers, groups,
tasks, sizes, --quick) is `engine.zoo.study`'s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from configs import ConfigError
from engine.zoo import accuracy, patterns, scaling
from engine.zoo.study import QUICK, UsageError, check_mixers, registered_mixers


def run(args: argparse.Namespace) -> int:
    """The study (`args`: scripts/zoo.py's arguments): 0 when every part ran clean, 1 when a mixer or
    run failed (the tables leave it out), 2 on a bad argument (one `error:` line, before any work)."""
    try:
        if args.headline_seeds is None:
            args.headline_seeds = 1 if args.quick else 2
        available = registered_mixers()
        mixers = check_mixers(args.mixers or available, available)
        seeds = parse_seeds(args.seeds, args.tasks, mixers)
        if min(args.rounds, *seeds.values(), args.headline_seeds, args.jobs) < 1:
            raise UsageError("--rounds, --seeds, --headline-seeds and --jobs must be >= 1")
        if any(s < 1 for s in args.sides):
            raise UsageError(f"--sides must be positive, got {args.sides}")
        if args.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
        out = Path(args.out).resolve()  # train.py runs in REPO: relative paths would land there
        sides, rounds, overrides = args.sides, args.rounds, list(args.set)
        accuracy_mixers = mixers
        if args.quick:
            sides, rounds = QUICK["sides"], QUICK["rounds"]
            accuracy_mixers = [m for m in mixers if m in QUICK["mixers_accuracy"]] or mixers[:2]
            overrides = [*QUICK["overrides"], *overrides]
        task_overrides = {task: list(overrides) for task in args.tasks}
        if args.quick:  # tiny data sets of their own, not the study's
            task_overrides = {t: [*o, f"data.root={out / 'data' / t}"] for t, o in task_overrides.items()}
        if "accuracy" in args.parts:  # before anything runs: a bad --set or stale runs stop it here
            plan = accuracy.accuracy_plan(accuracy_mixers, task_overrides, seeds, args.headline_seeds)
            accuracy.check_reusable(plan, task_overrides, out)
    except (UsageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    failed = {}
    if "scaling" in args.parts:
        print(f"scaling: {len(mixers)} mixers, sides {list(sides)}, {rounds} rounds", flush=True)
        min_sample_s = 0.01 if args.quick else args.min_sample_s
        res = scaling.scaling(mixers, sides, rounds, args.warmup, args.max_step_s, min_sample_s, out)
        print_targets(res["targets"])
        failed["scaling"] = len(res["errors"])
    if "accuracy" in args.parts:
        res = accuracy.accuracy(
            plan, task_overrides, seeds, args.headline_seeds, out, not args.verbose, args.jobs
        )
        print_targets(res["targets"])
        failed["accuracy"] = len(res["errors"])
    if "patterns" in args.parts:
        res = patterns.patterns(mixers, out)
        print(f"patterns: {out / 'patterns.png'}")
    print(f"done in {time.perf_counter() - t0:.0f} s: {out}")
    if any(failed.values()):
        parts = ", ".join(f"{n} in {part}" for part, n in failed.items() if n)
        print(f"error: {parts} failed (see {out}/<part>.md); the tables leave them out", file=sys.stderr)
        return 1
    return 0


def parse_seeds(values: list[str], tasks: list[str], mixers: list[str]) -> dict[str, int]:
    """--seeds as {task: seeds, "task/mixer": seeds}: `N` for every task, `TASK=N` for one,
    `TASK/MIXER=N` for one mixer on one task (later values win), e.g. `6 shapes=3 pathfinder/na=18`.
    A `task/mixer` count is that mixer's, headline or not (`accuracy.runs_per_mixer`)."""
    seeds = {}
    for value in values:
        key, _, count = value.rpartition("=")
        task, _, mixer = key.partition("/")
        if task and task not in tasks:
            raise UsageError(f"--seeds {value}: {task!r} is not among --tasks ({', '.join(tasks)})")
        if mixer and mixer not in mixers:
            raise UsageError(f"--seeds {value}: {mixer!r} is not among the study's mixers")
        try:
            n = int(count)
        except ValueError:
            raise UsageError(f"--seeds {value}: give N, TASK=N or TASK/MIXER=N with an integer N") from None
        seeds.update({key: n} if mixer else {t: n for t in ([task] if task else tasks)})
    return {**{t: 1 for t in tasks}, **seeds}


def print_targets(checks: list[dict]) -> None:
    for c in checks:
        mark = {True: "met", False: "NOT met", None: "n/a"}[c["met"]]
        value = "-" if c["value"] is None else f"{c['value']:.2f}"
        print(f"  [{mark}] {c['target']}: {value}")
