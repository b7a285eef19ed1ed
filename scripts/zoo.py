#!/usr/bin/env python3
"""The attention zoo study: what each token mixer costs and what it buys, measured here.

    python scripts/zoo.py --out runs/zoo-study --jobs 2     # the full study (make zoo: docs/zoo.md)
    python scripts/zoo.py --out /tmp/zoo --quick            # all three parts end to end, tiny (CI)
    python scripts/zoo.py --out runs/zoo-study --parts scaling --mixers na full linear

Three parts, each writing OUT/<part>.{json,csv} (and a figure):

1. scaling: each mixer of `models.mixers.MIXERS` alone at NAT-Tiny's stage-1 width (dim 64, 2 heads,
   windows 7), forward + backward of a (1, side, side, 64) map at side 16, 32, 64, 128, in interleaved
   rounds through the repo's harness (`engine.bench`); per size the time, the peak-RSS increase, the
   ratio to `full` (fused SDPA) round by round, and per mixer the log-log slope of time vs tokens over
   32^2..128^2 (1 = linear, 2 = quadratic). LRA's speed/memory table, against a fused baseline.
2. accuracy: every mixer in one small NAT backbone under one recipe (configs/zoo.yaml) on the
   embedded shapes task (configs/zoo_shapes.yaml: rewards locality) and the embedded long-range
   Pathfinder-like task (configs/zoo_pathfinder.yaml: needs it); `train.py` runs each (mixer, seed)
   as a subprocess. Final-epoch val top-1, mean and range over seeds, params, FLOPs
   (`models.count_flops`), train img/s. A difference counts only when it exceeds the noise: the
   seed range, and at least two binomial standard errors of the val set.
3. patterns: one PNG, a panel per mixer: on a 14x14 map, which input positions a centre query and a
   corner query read, as |d out[query] / d x| (exact for every mechanism: a linear or low-rank mixer
   reads everywhere, and the panel shows it). Stage-1 mixers of the seed-0 pathfinder models when
   the accuracy part has trained them (learned/random patterns as trained), else freshly built ones.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from configs import ConfigError  # noqa: E402
from engine import bench, compare  # noqa: E402

# Mixer names of the zoo in the order the tables list them: the baseline, the exact local ones, the
# sparse global ones, then the approximations. Mixers registered later are appended.
ORDER = (
    "full",
    "na",
    "dilated",
    "sasa",
    "window",
    "shifted_window",
    "halo",
    "global",
    "longformer",
    "bigbird",
    "reformer",
    "sinkhorn",
    "linformer",
    "compressed",
    "linear",
    "performer",
    "synthesizer_dense",
    "synthesizer_random",
)
BASELINE = "full"
LOCAL = ("na", "dilated", "sasa", "window", "shifted_window", "halo")  # no global reach in one layer
EXACT_LOCAL = ("sasa", "window", "shifted_window", "halo")  # NA's rivals at equal window size
LINEAR_COST = (
    "na", "dilated", "window", "shifted_window", "halo", "sasa", "global", "longformer", "bigbird",
    "linformer", "compressed", "linear", "performer",
)  # fmt: skip
NEAR_LINEAR = ("reformer", "sinkhorn")
HEADLINE = ("na", "full")  # mixers that get --headline-seeds seeds
TASKS = {"shapes": "configs/zoo_shapes.yaml", "pathfinder": "configs/zoo_pathfinder.yaml"}
RECIPE = "configs/zoo.yaml"

STAGE1 = dict(dim=64, num_heads=2, kernel_size=7)  # NAT-Tiny stage 1
SIDES = (16, 32, 64, 128)
SLOPE_FROM = 32  # the slope is fitted over sides >= this (small maps are overhead-bound)
PATTERN_SIDE = 14

QUICK = dict(
    sides=(8, 16),
    rounds=2,
    mixers_accuracy=("na", "full"),
    overrides=(
        "sched.epochs=1",
        "sched.warmup_epochs=0",
        "train.batch_size=8",
        "data.pathfinder.train_per_class=8",
        "data.pathfinder.val_per_class=4",
        "data.pathfinder.image_size=32",
        "data.pathfinder.dot_radius=3.0",
        "data.synthetic.num_classes=3",
        "data.synthetic.train_per_class=6",
        "data.synthetic.val_per_class=4",
        "data.synthetic.image_size=32",
        "data.img_size=32",
    ),
)


class UsageError(Exception):
    """A user mistake: printed as one `error:` line, exit 2."""


def registered_mixers() -> list[str]:
    import models  # noqa: F401  (registers every mixer family)
    from models.mixers import MIXERS

    return [m for m in ORDER if m in MIXERS] + sorted(set(MIXERS) - set(ORDER))


def check_mixers(names: list[str], available: list[str]) -> list[str]:
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UsageError(f"unknown mixer(s) {', '.join(unknown)}; registered: {', '.join(available)}")
    return names


def window_options(name: str, kernel_size: int) -> dict:
    """Options that give an exact local mixer sizing its own windows the key extent of NA's
    `kernel_size` window: NAT passes `kernel_size` only to mixers that take one (na, dilated, sasa,
    global, longformer), so Swin windows and HaloNet blocks would keep their defaults (7; 7 + halo 3
    = 13 keys wide) and the study would compare different reaches. HaloNet: block k - 2, halo 1."""
    if name in ("window", "shifted_window"):
        return {"window_size": kernel_size}
    if name == "halo":
        return {"block_size": kernel_size - 2, "halo": 1}
    return {}


def stage1_mixer(name: str, seed: int = 0) -> torch.nn.Module:
    """Mixer `name` as a NAT-Tiny stage-1 block would build it (dim 64, 2 heads, window 7)."""
    from models.mixers import build_mixer

    torch.manual_seed(seed)
    k = STAGE1["kernel_size"]
    return build_mixer(
        name, STAGE1["dim"], STAGE1["num_heads"], kernel_size=k, options=window_options(name, k)
    )


def task_config(task: str, overrides=()) -> dict:
    """The study's recipe with `task`'s overlay and `overrides`: what train.py will run."""
    from configs import load_config

    return load_config([REPO / RECIPE, REPO / TASKS[task]], overrides)


def window_overrides(mixer: str, task: str, overrides: list[str]) -> list[str]:
    """train.py overrides giving `mixer` the backbone's window per stage (`window_options`)."""
    import json

    kernel_sizes = task_config(task, overrides)["model"]["kwargs"]["kernel_size"]
    if isinstance(kernel_sizes, int):  # one window for every stage
        options = window_options(mixer, kernel_sizes)
    else:
        options = [window_options(mixer, k) for k in kernel_sizes]
    return [f"model.kwargs.mixer_kwargs={json.dumps(options)}"] if any(options) else []


# ------------------------------------------------------------------------------------------------
# 1. Scaling


def repeated(step, n: int):
    """`step` called `n` times (one timed sample of a short step)."""

    def run():
        for _ in range(n):
            step()

    return run


def scaling(
    mixers: list[str], sides, rounds: int, warmup: int, max_step_s: float, min_sample_s: float, out: Path
) -> dict:
    """Forward + backward time and peak memory of each mixer alone, per map side; ratios to full."""
    rows, dropped, errors, repeats = [], {}, {}, {}
    modules = {name: stage1_mixer(name) for name in mixers}
    for side in sides:
        steps = {}
        for name, module in modules.items():
            if name in dropped or name in errors:
                continue
            x = torch.randn(1, side, side, STAGE1["dim"], requires_grad=True)

            def step(module=module, x=x):
                module.zero_grad(set_to_none=True)
                x.grad = None
                module(x).sum().backward()

            try:  # a first call (JIT builds, caches), then one probe: a mixer over budget is dropped
                step()
                probe = bench.time_call(step)
            except Exception as e:  # noqa: BLE001 (recorded per mixer: one failure must not stop the rest)
                errors[name] = f"side {side}: {type(e).__name__}: {e}"
                continue
            if probe > max_step_s and name != BASELINE:  # every ratio needs the baseline
                dropped[name] = f"one step at side {side} took {probe:.1f} s > --max-step-s {max_step_s}"
                continue
            # Short steps are repeated up to `min_sample_s` per timed sample: on a shared machine a
            # single ms-long call can land on a preemption (tens of ms) and its median is noise.
            repeats[name] = max(1, math.ceil(min_sample_s / max(probe, 1e-6)))
            steps[name] = step
        timed = {name: repeated(steps[name], repeats[name]) for name in steps}
        failed: dict[str, BaseException] = {}
        times = bench.interleaved_rounds(timed, rounds=rounds, warmup=warmup, errors=failed)
        times = {name: [t / repeats[name] for t in ts] for name, ts in times.items()}  # per call
        errors.update({n: f"side {side}: {type(e).__name__}: {e}" for n, e in failed.items()})
        for name, ts in times.items():
            stats = bench.spread(ts)
            row = dict(
                mixer=name,
                side=side,
                tokens=side * side,
                rounds=len(ts),
                calls_per_sample=repeats[name],
                **{f"s_{k}": v for k, v in stats.items()},
            )
            row["peak_mb"] = bench.peak_memory_mb(steps[name], "cpu")
            if BASELINE in times:
                ratios = bench.round_ratios(times[BASELINE], ts)  # full's time / this mixer's: speed-up
                row["speedup_vs_full"] = statistics.median(ratios)
                row["speedup_q1"], row["speedup_q3"] = bench.spread(ratios)["q1"], bench.spread(ratios)["q3"]
            rows.append(row)
        for name in steps:
            memory_ratio(rows, name, side)
        print(f"  scaling: side {side} done ({len(times)} mixers)", flush=True)
    slopes = {}
    for name in mixers:
        pts = [(r["tokens"], r["s_median"]) for r in rows if r["mixer"] == name and r["side"] >= SLOPE_FROM]
        if len(pts) < 2:  # quick runs: fit what there is
            pts = [(r["tokens"], r["s_median"]) for r in rows if r["mixer"] == name]
        slopes[name] = bench.loglog_slope(*zip(*pts, strict=True)) if len(pts) >= 2 else None
    result = dict(
        environment=bench.environment(),
        settings=dict(
            stage1=STAGE1,
            sides=list(sides),
            rounds=rounds,
            warmup=warmup,
            min_sample_s=min_sample_s,
            batch=1,
            slope_from=SLOPE_FROM,
        ),
        memory=bench.memory_kind("cpu"),
        rows=rows,
        slopes=slopes,
        dropped=dropped,
        errors=errors,
    )
    result["targets"] = scaling_targets(result)
    bench.write_json(result, out / "scaling.json")
    (out / "scaling.md").write_text(scaling_markdown(result) + "\n")
    bench.write_csv([dict(r, slope=slopes.get(r["mixer"])) for r in rows], out / "scaling.csv")
    panels = [
        [
            ("forward+backward time (s), dim 64, 2 heads", series(rows, "s_median")),
            ("peak RSS increase (MiB)", series(rows, "peak_mb")),
        ]
    ]
    bench.plot_panels(panels, out / "scaling.png", xlabel="tokens", ylabel="", loglog=True, slope_guides="N")
    return result


def scaling_markdown(result: dict) -> str:
    """Per mixer: time per size (ms), speed-up over full per size, peak memory at the largest size
    (and vs full), slope; then the drops and errors."""
    rows, sides = result["rows"], result["settings"]["sides"]
    at = {(r["mixer"], r["side"]): r for r in rows}
    largest = sides[-1]
    header = ["mixer", *[f"{s}² ms (x full)" for s in sides], f"MiB @{largest}² (x full)", "slope"]
    cells = []
    for name, slope in result["slopes"].items():
        line = [name]
        for side in sides:
            r = at.get((name, side))
            line.append(
                "-"
                if r is None
                else f"{1e3 * r['s_median']:.1f} ({bench.fmt(r.get('speedup_vs_full'), '.2f')})"
            )
        r = at.get((name, largest))
        memory = "-" if r is None else f"{r['peak_mb']:.0f} ({bench.fmt(r.get('memory_vs_full'), '.2f')})"
        cells.append([*line, memory, bench.fmt(slope, ".2f")])
    lines = bench.markdown_table(header, cells, "l" + "r" * (len(header) - 1))
    lines += [f"- {name}: not timed further: {why}" for name, why in result["dropped"].items()]
    lines += [f"- {name}: error: {why}" for name, why in result["errors"].items()]
    return "\n".join(lines)


def accuracy_markdown(result: dict) -> str:
    header = [
        "task",
        "mixer",
        "seeds",
        "top-1 mean (min-max)",
        "near pairs",
        "vs na",
        "> noise?",
        "params",
        "MACs",
        "img/s",
    ]
    cells = []
    for t in result["table"]:
        real = {True: "yes", False: "no", None: "-"}[t.get("real")]
        cells.append(
            [
                t["task"],
                t["mixer"],
                t["seeds"],
                f"{t['top1_mean']:.1f} ({t['top1_min']:.1f}-{t['top1_max']:.1f})",
                bench.fmt(t.get("near_top1"), ".1f"),
                bench.fmt(t.get("vs_na"), "+.1f"),
                real if t["mixer"] != "na" else "",
                bench.fmt(t.get("params") and t["params"] / 1e3, ".0f") + "k",
                bench.fmt(t.get("flops") and t["flops"] / 1e6, ".1f") + "M",
                f"{t['train_img_per_sec']:.0f}",
            ]
        )
    lines = bench.markdown_table(header, cells, "llrrrrlrrr")
    lines += [f"- {label}: error: {why}" for label, why in result["errors"].items()]
    return "\n".join(lines)


def memory_ratio(rows: list[dict], name: str, side: int) -> None:
    row = next((r for r in rows if r["mixer"] == name and r["side"] == side), None)
    base = next((r for r in rows if r["mixer"] == BASELINE and r["side"] == side), None)
    if row and base and base["peak_mb"] > 0 and not math.isnan(row["peak_mb"]):
        row["memory_vs_full"] = row["peak_mb"] / base["peak_mb"]


def series(rows: list[dict], key: str) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get(key) is not None and not math.isnan(r[key]) and r[key] > 0:
            out.setdefault(r["mixer"], []).append((r["tokens"], r[key]))
    return out


def scaling_targets(result: dict) -> list[dict]:
    """The issue's targets, checked on this run's numbers (None where a mixer or size is missing)."""
    rows, slopes = result["rows"], result["slopes"]
    largest = max((r["side"] for r in rows), default=None)
    at_largest = {r["mixer"]: r for r in rows if r["side"] == largest}
    checks = []
    for name in slopes:
        limit = 1.15 if name in LINEAR_COST else 1.3 if name in NEAR_LINEAR else None
        if limit is None:
            continue
        slope = slopes[name]
        checks.append(
            dict(
                target=f"{name}: time slope <= {limit}",
                value=slope,
                met=None if slope is None else slope <= limit,
            )
        )
        if name in LINEAR_COST:
            speedup = at_largest.get(name, {}).get("speedup_vs_full")
            checks.append(
                dict(
                    target=f"{name}: >= 4x faster than full at {largest}^2",
                    value=speedup,
                    met=None if speedup is None else speedup >= 4,
                )
            )
    na = at_largest.get("na", {}).get("s_median")
    for rival in EXACT_LOCAL:
        other = at_largest.get(rival, {}).get("s_median")
        if na and other:
            checks.append(
                dict(
                    target=f"na faster than {rival} at {largest}^2 (time ratio {rival}/na)",
                    value=other / na,
                    met=other > na,
                )
            )
    return checks


# ------------------------------------------------------------------------------------------------
# 2. Accuracy


def run_dir_of(out: Path, task: str, mixer: str, seed: int) -> Path:
    return out / "accuracy" / task / f"{mixer}-s{seed}"


def run_overrides(task: str, mixer: str, seed: int, overrides: list[str]) -> list[str]:
    """train.py overrides of one study run: the mixer, its window sizes, the seed, then the user's."""
    own = [f"model.kwargs.mixer={mixer}", f"train.seed={seed}", "train.progress=off"]
    return [*own, *window_overrides(mixer, task, overrides), *overrides]


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "summary.csv").is_file() and (run_dir / "last.pth.tar").is_file()


def changed_settings(run_dir: Path, task: str, mixer: str, seed: int, overrides: list[str]) -> list[str]:
    """The config keys in which a finished run's config.yaml differs from what this study would train
    now (a changed recipe, task file or --set): such a run must not be reused as if it were this one."""
    import yaml

    from configs import dump_config, flat

    saved = flat(yaml.safe_load((run_dir / "config.yaml").read_text()))
    wanted = flat(yaml.safe_load(dump_config(task_config(task, run_overrides(task, mixer, seed, overrides)))))
    where = ("train.output", "train.experiment")  # set by the run folder itself
    return sorted(k for k in saved.keys() | wanted.keys() if k not in where and saved.get(k) != wanted.get(k))


def check_reusable(plan: list[tuple[str, str, int]], overrides: dict[str, list[str]], out: Path) -> None:
    """Raise one UsageError when finished runs in `out` were trained with other settings than the plan's."""
    stale = {}
    for task, mixer, seed in plan:
        run_dir = run_dir_of(out, task, mixer, seed)
        if is_finished(run_dir) and (keys := changed_settings(run_dir, task, mixer, seed, overrides[task])):
            stale[run_dir] = keys
    if stale:
        run_dir, keys = next(iter(stale.items()))
        raise UsageError(
            f"{len(stale)} finished run(s) in {out / 'accuracy'} were trained with other settings "
            f"(e.g. {run_dir.relative_to(out)}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}); "
            "give another --out, or delete those runs to retrain them"
        )


def train_run(
    out: Path, task: str, mixer: str, seed: int, overrides: list[str], quiet: bool, threads: int | None = None
) -> dict:
    """One `train.py` run (`engine.compare.train`: a subprocess), or a finished one reused (its
    settings checked first by `check_reusable`); its result from summary.csv."""
    run_dir = run_dir_of(out, task, mixer, seed)
    if not is_finished(run_dir):
        wall_s = compare.train(
            run_dir.name,
            REPO / RECIPE,
            [REPO / TASKS[task]],
            run_overrides(task, mixer, seed, overrides),
            run_dir.parent,
            quiet=quiet,
            quiet_stderr=quiet,
            threads=threads,
        )
        (run_dir / "wall_s.txt").write_text(f"{wall_s:.1f}\n")
    epochs = list(csv.DictReader((run_dir / "summary.csv").open()))
    return dict(
        task=task,
        mixer=mixer,
        seed=seed,
        top1=float(epochs[-1]["eval_top1"]),
        best_top1=max(float(e["eval_top1"]) for e in epochs),
        epochs=len(epochs),
        train_img_per_sec=compare.train_throughput(run_dir),
        wall_s=float((run_dir / "wall_s.txt").read_text()) if (run_dir / "wall_s.txt").is_file() else None,
        run_dir=str(run_dir),
    )


def model_input(pixels, data: dict) -> torch.Tensor:
    """(N, H, W, 3) uint8 images -> the model's (N, 3, H, W) input, normalised as in the run's eval."""
    import numpy as np

    mean, std = torch.tensor(data["mean"]).view(3, 1, 1), torch.tensor(data["std"]).view(3, 1, 1)
    return (torch.tensor(np.stack(pixels)).permute(0, 3, 1, 2) / 255 - mean) / std


def near_pair_top1(run_dir: Path, per_class: int = 100) -> float:
    """Top-1 of a trained pathfinder run on `2 x per_class` fresh images whose dots sit side by side
    (the training curriculum's near pairs, never in val): did the model learn the colour comparison
    at all? Val (far pairs only) then says whether it carries the comparison across the image."""
    import numpy as np

    from data.pathfinder import render_pathfinder

    model, cfg = trained_model(run_dir)
    data, opts = cfg["data"], cfg["data"]["pathfinder"]
    classes = (run_dir / "classes.txt").read_text().split()
    images, labels = [], []
    for i in range(2 * per_class):
        connected = bool(i % 2)
        rng = np.random.default_rng([opts["seed"], 2, i])  # split index 2: neither train (0) nor val (1)
        images.append(
            render_pathfinder(
                connected,
                opts["image_size"],
                rng,
                opts["num_curves"],
                opts["colour_curves"],
                opts["min_dot_distance"],
                opts["palette"],
                opts["dot_radius"],
                near=True,
            )
        )
        labels.append(classes.index("connected" if connected else "disconnected"))
    x = model_input(images, data)
    with torch.no_grad():
        predicted = model(x).argmax(-1)
    return round(100.0 * float((predicted == torch.tensor(labels)).float().mean()), 2)


def model_cost(run_dir: Path) -> dict:
    """Params and multiply-adds (`models.count_flops`) of a run's model at its input size."""
    model, size = compare.run_model(run_dir)
    return dict(params=sum(p.numel() for p in model.parameters()), flops=compare.model_flops(model, size))


def generated_images(data: dict, split: str) -> int:
    """Images in the `split` ('train' / 'val') of a generated task, from the generator options in a
    config's `data` section (synthetic shapes: num_classes; pathfinder: always 2 classes)."""
    options = data[data["dataset"]]
    return options.get("num_classes", 2) * options[f"{split}_per_class"]


def val_images(run_dir: Path) -> int:
    """Size of a run's val set, from its config."""
    import yaml

    return generated_images(yaml.safe_load((run_dir / "config.yaml").read_text())["data"], "val")


def sampling_noise(images: int) -> float:
    """Two binomial standard errors of a top-1 near 50% on `images` val images, in points: a single
    run's top-1 moves that much from the val draw alone, so no smaller difference is called real."""
    return 2 * 100 * math.sqrt(0.25 / images)


def summarize(runs: list[dict]) -> list[dict]:
    """Per (task, mixer): mean and range of final top-1 over seeds, costs, and whether the difference
    to `na` exceeds the noise: the largest seed range among that task's multi-seed mixers, and never
    less than the val set's sampling noise (a 0-point seed range, e.g. every seed at chance, would
    otherwise call any difference real)."""
    table = []
    for task in dict.fromkeys(r["task"] for r in runs):
        group = [r for r in runs if r["task"] == task]
        by_mixer: dict[str, list[dict]] = {}
        for r in group:
            by_mixer.setdefault(r["mixer"], []).append(r)
        seed_range = max(
            (
                max(x["top1"] for x in rs) - min(x["top1"] for x in rs)
                for rs in by_mixer.values()
                if len(rs) > 1
            ),
            default=None,
        )
        noise = (
            None
            if seed_range is None
            else max(seed_range, sampling_noise(val_images(Path(group[0]["run_dir"]))))
        )
        for mixer, rs in by_mixer.items():
            tops = [x["top1"] for x in rs]
            table.append(
                dict(
                    task=task,
                    mixer=mixer,
                    seeds=len(rs),
                    top1_mean=statistics.mean(tops),
                    top1_min=min(tops),
                    top1_max=max(tops),
                    top1_range=max(tops) - min(tops),
                    seed_range=seed_range,
                    noise=noise,
                    params=rs[0].get("params"),
                    flops=rs[0].get("flops"),
                    near_top1=(
                        statistics.mean(x["near_top1"] for x in rs)
                        if all("near_top1" in x for x in rs)
                        else None
                    ),
                    train_img_per_sec=statistics.median(x["train_img_per_sec"] for x in rs),
                    wall_s=sum(x["wall_s"] or 0 for x in rs),
                )
            )
        na = next((t for t in table if t["task"] == task and t["mixer"] == "na"), None)
        for t in table:
            if t["task"] == task and na is not None and t is not na:
                t["vs_na"] = t["top1_mean"] - na["top1_mean"]
                t["real"] = None if noise is None else abs(t["vs_na"]) > noise
    return table


def accuracy_targets(table: list[dict]) -> list[dict]:
    rows = [t for t in table if t["task"] == "pathfinder"]
    na = next((t for t in rows if t["mixer"] == "na"), None)
    global_reach = [t for t in rows if t["mixer"] not in LOCAL]
    if na is None or not global_reach:
        return []
    best = max(global_reach, key=lambda t: t["top1_mean"])
    return [
        dict(
            target=f"pathfinder: best global-reach mixer ({best['mixer']}) beats na by > the noise",
            value=best["top1_mean"] - na["top1_mean"],
            noise=best["noise"],
            met=None if best["noise"] is None else best["top1_mean"] - na["top1_mean"] > best["noise"],
        )
    ]


def say(line: str, stream=None) -> None:
    """One whole line per write: runs side by side must not interleave their progress lines."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def prepare_data(overrides: dict[str, list[str]]) -> None:
    """Generate each task's data set once, before runs that may start side by side need it."""
    from data import build_datasets
    from engine.factory import data_build_config

    for task, task_overrides in overrides.items():
        data = data_build_config(task_config(task, task_overrides))
        build_datasets({**data, "root": str(REPO / data["root"])})  # train.py runs in REPO


def accuracy_plan(
    mixers: list[str], overrides: dict[str, list[str]], seeds: int, headline_seeds: int
) -> list[tuple[str, str, int]]:
    """Every (task, mixer, seed) to train, the heaviest task first: with runs side by side, a slow
    run started last would finish alone."""
    tasks = sorted(overrides, key=lambda t: -task_work(task_config(t, overrides[t])))
    return [
        (task, mixer, seed)
        for task in tasks
        for mixer in mixers
        for seed in range(headline_seeds if mixer in HEADLINE else seeds)
    ]


def accuracy(
    plan: list[tuple[str, str, int]],
    overrides: dict[str, list[str]],
    headline_seeds: int,
    out: Path,
    quiet: bool,
    jobs: int = 1,
) -> dict:
    """Train every (task, mixer, seed) of `plan` (`overrides`: task -> train.py overrides) that `out`
    does not hold yet (the caller has run `check_reusable` on the plan), `jobs` runs side by side
    with an equal share of the cores each (a small model uses one core better than two threads do)."""
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    prepare_data(overrides)

    def attempt(task: str, mixer: str, seed: int) -> dict | str:
        label = f"{task}/{mixer}-s{seed}"
        say(f"  accuracy: {label} ...")
        try:
            run = train_run(out, task, mixer, seed, overrides[task], quiet, threads)
            run.update(model_cost(Path(run["run_dir"])))
            if task == "pathfinder":
                run["near_top1"] = near_pair_top1(Path(run["run_dir"]))
        except Exception as e:  # noqa: BLE001 (the table says which run failed)
            say(f"  !!! {label}: {e}", sys.stderr)
            return str(e)
        say(f"  accuracy: {label}: top-1 {run['top1']:.1f}, {run['wall_s'] or 0:.0f} s")
        return run

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda p: attempt(*p), plan))
    runs = [r for r in results if isinstance(r, dict)]
    errors = {f"{t}/{m}-s{s}": r for (t, m, s), r in zip(plan, results, strict=True) if isinstance(r, str)}
    table = summarize(runs)
    result = dict(
        environment=bench.environment(),
        recipe=RECIPE,
        tasks={t: TASKS[t] for t in overrides},
        overrides=overrides,
        runs=runs,
        table=table,
        errors=errors,
        targets=accuracy_targets(table),
        full_study_estimate=full_study_estimate(runs, headline_seeds, jobs),
    )
    bench.write_json(result, out / "accuracy.json")
    (out / "accuracy.md").write_text(accuracy_markdown(result) + "\n")
    bench.write_csv(table, out / "accuracy.csv")
    return result


def task_images(cfg: dict) -> float:
    """Images one epoch of a task's run passes through the model, val counted as a third (no backward)."""
    return generated_images(cfg["data"], "train") + generated_images(cfg["data"], "val") / 3


def task_work(cfg: dict) -> float:
    """Pixels a task's run pushes through the model: epochs x images x image area."""
    return cfg["sched"]["epochs"] * task_images(cfg) * cfg["data"]["img_size"] ** 2


def full_study_estimate(runs: list[dict], headline_seeds: int, jobs: int) -> dict | None:
    """Seconds the default study's training would take at these runs' measured img/s (unmeasured
    mixers at the median speed): images per run from the configs, epochs x (train + val); in wall
    time about that over `jobs` runs side by side."""
    if not runs:
        return None
    speeds = {(r["task"], r["mixer"]): r["train_img_per_sec"] for r in runs}
    total, per_task = 0.0, {}
    for task in TASKS:
        cfg = task_config(task)
        images = task_images(cfg)
        task_speeds = [v for (t, _), v in speeds.items() if t == task] or list(speeds.values())
        median = statistics.median(task_speeds)
        seconds = 0.0
        for mixer in ORDER:
            n = headline_seeds if mixer in HEADLINE else 1
            seconds += n * cfg["sched"]["epochs"] * images / speeds.get((task, mixer), median)
        per_task[task] = seconds
        total += seconds
    return dict(
        train_seconds=total,
        wall_seconds=total / jobs,
        jobs=jobs,
        per_task=per_task,
        cpu=bench.cpu_name(),
        torch_threads=torch.get_num_threads(),
    )


# ------------------------------------------------------------------------------------------------
# 3. Patterns


def trained_model(run_dir: Path) -> tuple[torch.nn.Module, dict] | None:
    """(a run's model with its last weights, its config), or None when the run has no checkpoint."""
    import yaml

    import models  # noqa: F401  (registers nat_mini and the mixers with timm)
    from engine.checkpoint import extract_state_dict, load_checkpoint
    from engine.factory import create_model_for_checkpoint

    path = run_dir / "last.pth.tar"
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    model, _ = create_model_for_checkpoint(ckpt["arch"], ckpt, extract_state_dict(ckpt, path), path)
    return model.eval(), yaml.safe_load((run_dir / "config.yaml").read_text())


def trained_stage1_mixer(run_dir: Path) -> torch.nn.Module | None:
    """The first block's mixer of a trained run, or None when there is none."""
    trained = trained_model(run_dir)
    return None if trained is None else trained[0].stages[0].blocks[0].attn


def receptive_field(run_dir: Path, images: int = 16) -> dict | None:
    """Where a trained model's centre token (last stage, before pooling) reads the image, on the run's
    first val images: the share of pixels it can read at all (nonzero gradient) and the radius
    around the token's centre holding 90% of |d <token, u> / d pixels| (the effective field)."""
    import numpy as np
    from PIL import Image

    trained = trained_model(run_dir)
    if trained is None:
        return None
    model, cfg = trained
    data = cfg["data"]
    root = Path(data["root"]) if Path(data["root"]).is_absolute() else REPO / data["root"]
    every = sorted((root / "val").glob("*/*.png"))  # class folders in turn: both classes sampled
    paths = every[:: max(1, len(every) // images)][:images]
    x = model_input([np.asarray(Image.open(p).convert("RGB")) for p in paths], data).requires_grad_(True)
    tokens = model.forward_features(x)  # (B, h, w, C)
    h, w = tokens.shape[1:3]
    u = torch.randn(tokens.shape[-1], generator=torch.Generator().manual_seed(0))
    (tokens[:, h // 2, w // 2] @ u).sum().backward()
    reads = x.grad.abs().sum((0, 1))
    side = reads.shape[0]
    yy, xx = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    centre = ((h // 2 + 0.5) * side / h, (w // 2 + 0.5) * side / w)
    dist = torch.hypot(yy - centre[0], xx - centre[1]).flatten()
    order = dist.argsort()
    mass = reads.flatten()[order].cumsum(0) / reads.sum()
    return dict(
        images=len(paths),
        readable_share=float((reads > 0).float().mean()),
        radius90_px=float(dist[order][int((mass < 0.9).sum())]),
        image_px=side,
    )


def read_map(
    module: torch.nn.Module, query: tuple[int, int], dim: int, side: int = PATTERN_SIDE
) -> torch.Tensor:
    """(side, side) map of ||d <out[query], u> / d x[pos]||: where the query's output reads the input
    (u a fixed random direction, so no channel sums cancel). Exactly zero where it cannot read."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, side, side, dim, generator=gen, requires_grad=True)
    u = torch.randn(dim, generator=gen)
    module.eval()
    (module(x)[0, query[0], query[1]] @ u).backward()
    return x.grad[0].norm(dim=-1)


def patterns(mixers: list[str], out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = dict(centre=(PATTERN_SIDE // 2, PATTERN_SIDE // 2), corner=(0, 0))
    info, panels = {}, []
    for name in mixers:
        run_dir = run_dir_of(out, "pathfinder", name, 0)
        trained = trained_stage1_mixer(run_dir)
        module = trained if trained is not None else stage1_mixer(name)
        dim = module.qkv.in_features if hasattr(module, "qkv") else STAGE1["dim"]
        maps = {q: read_map(module, pos, dim) for q, pos in queries.items()}
        info[name] = dict(
            source="trained (pathfinder, seed 0, stage 1, block 0)" if trained is not None else "initialised",
            kernel_size=getattr(module, "kernel_size", None),
            **{f"reach_{q}": float((m > 1e-6 * m.max()).float().mean()) for q, m in maps.items()},
            model_receptive_field=receptive_field(run_dir),
        )
        # one RGB panel: centre query in red, corner query in blue, on a log scale over 4 decades so
        # that faint reads (global tokens, kernels) show; exact zeros stay black
        rgb = torch.zeros(PATTERN_SIDE, PATTERN_SIDE, 3)
        for channel, m in ((0, maps["centre"]), (2, maps["corner"])):
            rgb[..., channel] = (1 + torch.log10(m / m.max()).clamp(min=-4) / 4) * (m > 0)
        panels.append((name, rgb.numpy()))
    cols = min(6, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, rgb) in zip(axes.flat, panels, strict=False):
        ax.imshow(rgb, interpolation="nearest")
        for colour, (y, x) in zip(("white", "yellow"), queries.values(), strict=True):
            ax.plot(x, y, marker="x", color=colour, ms=5)
        tag = "" if info[name]["source"] == "initialised" else " (trained)"
        ax.set_title(f"{name}{tag}", fontsize=8)
    fig.suptitle(
        f"What a query reads on a {PATTERN_SIDE}x{PATTERN_SIDE} map (|d out[q] / d x|, log scale over "
        "4 decades): centre query red, corner query blue",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / "patterns.png", dpi=90)
    plt.close(fig)
    result = dict(side=PATTERN_SIDE, queries=queries, mixers=info)
    bench.write_json(result, out / "patterns.json")
    return result


# ------------------------------------------------------------------------------------------------


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
    p.add_argument("--seeds", type=int, default=1, help="accuracy: seeds per mixer")
    p.add_argument(
        "--headline-seeds",
        type=int,
        help=f"accuracy: seeds for {', '.join(HEADLINE)} (default 2; --quick: 1)",
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="accuracy: training runs side by side (2 on a 2-core CPU)"
    )
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="accuracy: train.py overrides")
    p.add_argument("--verbose", action="store_true", help="show train.py's output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.headline_seeds is None:
            args.headline_seeds = 1 if args.quick else 2
        if min(args.rounds, args.seeds, args.headline_seeds, args.jobs) < 1:
            raise UsageError("--rounds, --seeds, --headline-seeds and --jobs must be >= 1")
        if any(s < 1 for s in args.sides):
            raise UsageError(f"--sides must be positive, got {args.sides}")
        available = registered_mixers()
        mixers = check_mixers(args.mixers or available, available)
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
            plan = accuracy_plan(accuracy_mixers, task_overrides, args.seeds, args.headline_seeds)
            check_reusable(plan, task_overrides, out)
    except (UsageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    failed = {}
    if "scaling" in args.parts:
        print(f"scaling: {len(mixers)} mixers, sides {list(sides)}, {rounds} rounds", flush=True)
        min_sample_s = 0.01 if args.quick else args.min_sample_s
        res = scaling(mixers, sides, rounds, args.warmup, args.max_step_s, min_sample_s, out)
        print_targets(res["targets"])
        failed["scaling"] = len(res["errors"])
    if "accuracy" in args.parts:
        res = accuracy(plan, task_overrides, args.headline_seeds, out, not args.verbose, args.jobs)
        print_targets(res["targets"])
        failed["accuracy"] = len(res["errors"])
    if "patterns" in args.parts:
        res = patterns(mixers, out)
        print(f"patterns: {out / 'patterns.png'}")
    print(f"done in {time.perf_counter() - t0:.0f} s: {out}")
    if any(failed.values()):
        parts = ", ".join(f"{n} in {part}" for part, n in failed.items() if n)
        print(f"error: {parts} failed (see {out}/<part>.md); the tables leave them out", file=sys.stderr)
        return 1
    return 0


def print_targets(checks: list[dict]) -> None:
    for c in checks:
        mark = {True: "met", False: "NOT met", None: "n/a"}[c["met"]]
        value = "-" if c["value"] is None else f"{c['value']:.2f}"
        print(f"  [{mark}] {c['target']}: {value}")


if __name__ == "__main__":
    sys.exit(main())
