"""The zoo's part 2, accuracy: every mixer in one small NAT backbone under one recipe, on the shapes
and pathfinder tasks; `train.py` runs each (task, mixer, seed) as a subprocess (`engine.compare.train`),
finished runs are reused only when trained with the same settings (`check_reusable`). The table: final
top-1 (mean, range over seeds), near-pair top-1, params, FLOPs, train img/s, and whether a difference to
`na` exceeds the noise. Writes OUT/accuracy.{json,md,csv} and the runs under OUT/accuracy/.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from engine import bench, compare
from engine.zoo.study import (
    HEADLINE,
    LOCAL,
    ORDER,
    RECIPE,
    REPO,
    TASKS,
    UsageError,
    task_config,
    window_overrides,
)


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
