"""The zoo's part 2, accuracy: every mixer in one small NAT backbone under one recipe, on the shapes
and pathfinder tasks; `train.py` runs each (task, mixer, seed) as a subprocess (`engine.compare.train`),
finished runs are reused only when trained with the same settings (`check_reusable`), unfinished ones
(a stopped study's) trained again.

Pathfinder is read as escape rates: a run escaped the chance plateau when its far-pair top-1 clears
the one-sided binomial noise of its val set (`escaped`, the one definition); per mixer the rate with
its Wilson interval (`wilson_interval`), the escaped runs' top-1 and the near-pair score. Shapes: top-1
mean and range over seeds. Every claim against `na` follows `versus` (intervals separate, or no
claim), and `reading` writes the claims from the table. Writes OUT/accuracy.{json,md,csv},
OUT/escape.png and the runs under OUT/accuracy/.
"""

from __future__ import annotations

import csv
import math
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from engine import bench, compare
from engine.zoo.study import (
    ESCAPE_LEVEL,
    FAMILIES,
    FAMILY_COLOURS,
    HEADLINE,
    INTERVAL_Z,
    LOCAL,
    ORDER,
    RECIPE,
    REPO,
    SEPARATE_MIN_SEEDS,
    TASKS,
    UsageError,
    mixer_override,
    task_config,
    window_overrides,
)


def percent_interval(interval: tuple[float, float]) -> str:
    return f"{100 * interval[0]:.0f}-{100 * interval[1]:.0f}%"


def accuracy_markdown(result: dict) -> str:
    """The pathfinder table (escape rates), the shapes table (top-1 over seeds), the failed runs, and
    the reading generated from them (`reading`)."""
    lines = []
    rows = [t for t in result["table"] if t["task"] == "pathfinder"]
    if rows:
        threshold, images = rows[0]["escape_threshold"], rows[0]["val_images"]
        rule = f"{images} val images are too few to tell an escape from the plateau"
        if threshold is not None:
            rule = f"a run escaped the plateau when far-pair top-1 >= {threshold:.2f}% of {images} val images"
        lines += [
            f"Pathfinder: {rule} (chance + one-sided binomial tail {ESCAPE_LEVEL}); escape rate with its "
            "95% Wilson interval; vs na: 'beats' / 'trails' only where the intervals do not overlap.",
            "",
        ]
        header = ["mixer", "runs", "escaped", "escape rate (95% CI)", "escaped top-1 mean (min-max)",
                  "near pairs", "vs na", "all runs' top-1", "params", "MACs", "img/s"]  # fmt: skip
        cells = []
        for t in rows:
            out = "-" if t["escaped"] == 0 else (
                f"{t['escaped_top1_mean']:.1f} ({t['escaped_top1_min']:.1f}-{t['escaped_top1_max']:.1f})"
            )  # fmt: skip
            rate = f"{100 * t['escape_rate']:.0f}% ({percent_interval(t['escape_interval'])})"
            cells.append(
                [
                    t["mixer"],
                    t["seeds"],
                    *((t["escaped"], rate) if threshold is not None else ("-", "-")),
                    out,
                    f"{t['near_top1']:.1f}",
                    t.get("vs_na") or "",
                    " ".join(f"{x:.1f}" for x in t["top1"]),
                    *cost_cells(t),
                ]
            )
        lines += bench.markdown_table(header, cells, "lrrrrrllrrr")
    rows = [t for t in result["table"] if t["task"] != "pathfinder"]
    for task in dict.fromkeys(t["task"] for t in rows):
        header = ["mixer", "seeds", "top-1 mean (min-max)", "vs na (mean)", "vs na",
                  "params", "MACs", "img/s"]  # fmt: skip
        cells = [
            [
                t["mixer"],
                t["seeds"],
                f"{t['top1_mean']:.1f} ({t['top1_min']:.1f}-{t['top1_max']:.1f})",
                bench.fmt(t.get("top1_vs_na"), "+.1f"),
                "" if t["mixer"] == "na" else (t.get("vs_na") or no_verdict(t, rows)),
                *cost_cells(t),
            ]
            for t in rows
            if t["task"] == task
        ]
        lines += [
            "",
            f"{task.capitalize()}: final top-1 over seeds; vs na: 'beats' / 'trails' only where the seed "
            f"ranges do not overlap, with >= {SEPARATE_MIN_SEEDS} seeds each.",
            "",
            *bench.markdown_table(header, cells, "lrrrlrrr"),
        ]
    lines += [f"- {label}: error: {why}" for label, why in result["errors"].items()]
    return "\n".join([*lines, "", *reading(result["table"])])


def cost_cells(t: dict) -> list[str]:
    return [
        bench.fmt(t.get("params") and t["params"] / 1e3, ".0f") + "k",
        bench.fmt(t.get("flops") and t["flops"] / 1e6, ".1f") + "M",
        f"{t['train_img_per_sec']:.0f}",
    ]


def evidence(t: dict) -> str:
    """A mixer's row as the reading cites it: its escape rate and interval, or its seed range."""
    if "escape_interval" in t:
        return f"{t['mixer']} {t['escaped']}/{t['seeds']} ({percent_interval(t['escape_interval'])})"
    return f"{t['mixer']} {t['top1_min']:.1f}-{t['top1_max']:.1f} ({t['seeds']} seeds)"


def reading(table: list[dict]) -> list[str]:
    """The reading, generated from the table by the comparison rule (`versus`): a mixer is said to beat
    or trail `na` only where the intervals separate; every other one is listed as overlapping."""
    lines = ["Reading (generated by engine.zoo.accuracy.reading from the tables above):", ""]
    for task in dict.fromkeys(t["task"] for t in table):
        rows = [t for t in table if t["task"] == task]
        na = next((t for t in rows if t["mixer"] == "na"), None)
        if na is None:
            lines.append(f"- {task}: no `na` runs, nothing compared.")
            continue
        if "escape_interval" in na and na["escape_threshold"] is None:
            images = na["val_images"]
            lines.append(f"- {task}: {images} val images are too few to tell an escape: nothing compared.")
            continue
        what = "escape rate, escaped runs / runs" if "escape_interval" in na else "top-1 range over seeds"
        verdicts = {"beats": [], "trails": [], "overlaps": [], None: []}
        for t in rows:
            if t is not na:
                verdicts[t.get("vs_na")].append(evidence(t))
        lines.append(f"- {task} ({what}; {evidence(na)}):")
        for verdict, label in (
            ("beats", "beat na (intervals separate)"),
            ("trails", "trail na (intervals separate)"),
            ("overlaps", "overlap na: no claim either way"),
            (None, f"not compared (fewer than {SEPARATE_MIN_SEEDS} seeds)"),
        ):
            if verdicts[verdict]:
                lines.append(f"  - {label}: {', '.join(verdicts[verdict])}.")
        if "escape_interval" in na:
            never = [t["mixer"] for t in rows if t["escaped"] == 0]
            always = [t["mixer"] for t in rows if t["escaped"] == t["seeds"]]
            lines += [
                f"  - escaped in every run: {', '.join(always) or 'none'}; "
                f"in no run: {', '.join(never) or 'none'}.",
                "  - near pairs (side by side) / far pairs (val) top-1, escaped runs only: "
                + (
                    ", ".join(
                        f"{t['mixer']} {t['escaped_near_top1']:.0f} / {t['escaped_top1_mean']:.0f}"
                        for t in rows
                        if t["escaped"]
                    )
                    or "no run escaped"
                )
                + ".",
            ]
    return lines


# ------------------------------------------------------------------------------------------------
# 2. Accuracy


def run_dir_of(out: Path, task: str, mixer: str, seed: int) -> Path:
    return out / "accuracy" / task / f"{mixer}-s{seed}"


def run_overrides(task: str, mixer: str, seed: int, overrides: list[str]) -> list[str]:
    """train.py overrides of one study run: the mixer, its window sizes, the seed, then the user's."""
    own = [mixer_override(mixer, task, overrides), f"train.seed={seed}", "train.progress=off"]
    return [*own, *window_overrides(mixer, task, overrides), *overrides]


def is_finished(run_dir: Path) -> bool:
    """Whether a run folder holds a whole run: train.py writes summary.csv and last.pth.tar after every
    epoch, so a stopped study leaves runs with both and fewer epochs than their config's."""
    import yaml

    files = [run_dir / name for name in ("summary.csv", "last.pth.tar", "config.yaml")]
    if not all(f.is_file() for f in files):
        return False
    epochs = yaml.safe_load(files[2].read_text())["sched"]["epochs"]
    return len(list(csv.DictReader(files[0].open()))) >= epochs


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
        if run_dir.exists():  # a stopped study's run: train.py would refuse its folder
            say(f"  accuracy: {task}/{mixer}-s{seed}: an unfinished run in {run_dir}, trained again")
            shutil.rmtree(run_dir)
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
        val_images=val_images(run_dir),
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


def escape_count(images: int, level: float = ESCAPE_LEVEL) -> int | None:
    """Right answers out of `images` far pairs at or above which a pathfinder run counts as escaped
    from the chance plateau: the smallest k with P(X >= k) <= `level`, X ~ Binomial(images, 1/2) (a
    model answering independently of the class on a balanced val set). None when no k qualifies (a
    val set too small to tell, as --quick's 8 images: P(X = 8) = 1/256)."""
    tail = 0
    for k in range(images, -1, -1):  # P(X >= k) grows as k falls: stop before it passes `level`
        tail += math.comb(images, k)
        if tail > level * 2**images:
            return None if k == images else k + 1
    return 0  # level >= 1: every run counts


def escaped(top1: float, images: int, level: float = ESCAPE_LEVEL) -> bool:
    """The zoo's one definition of a run that left the plateau (`escape_count`), used by every table,
    reading and figure; `top1` in points, compared as a count of right answers (58.0 of 400: 232)."""
    k = escape_count(images, level)
    return k is not None and round(top1 * images / 100) >= k


def wilson_interval(successes: int, trials: int, z: float = INTERVAL_Z) -> tuple[float, float]:
    """Wilson score interval of a rate `successes / trials` (95% at the default z): unlike the normal
    one it stays inside [0, 1] and is not zero-width at 0 or all of `trials` (0 of 6: 0 to 0.39)."""
    if trials < 1:
        raise ValueError(f"a rate needs at least one trial, got {trials}")
    p, z2 = successes / trials, z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    # exact ends at 0 and all successes (the float sum lands a hair off them)
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == trials else centre + half)


def versus(interval: tuple[float, float], reference: tuple[float, float]) -> str:
    """The comparison rule of every zoo claim against `na`: 'beats' or 'trails' only where the two
    intervals do not overlap, else 'overlaps' (no claim)."""
    if interval[0] > reference[1]:
        return "beats"
    if interval[1] < reference[0]:
        return "trails"
    return "overlaps"


def summarize(runs: list[dict]) -> list[dict]:
    """Per (task, mixer): final top-1 over seeds (mean, range), costs, and the comparison with `na`.

    Pathfinder (rows with a near-pair score): escaped runs (`escaped`), their rate with its Wilson
    interval, the escaped runs' far-pair top-1 (mean, range), near pairs, and `vs_na` by `versus` on
    the escape-rate intervals (None where the val set is too small to tell an escape). Shapes: `vs_na`
    by `versus` on the seed ranges, where both mixers have `SEPARATE_MIN_SEEDS` seeds (with 3 each, two
    equally good mixers separate by chance with probability 2 / 20), else None."""
    table = []
    for task in dict.fromkeys(r["task"] for r in runs):
        rows = []
        for mixer in dict.fromkeys(r["mixer"] for r in runs if r["task"] == task):
            rs = [r for r in runs if r["task"] == task and r["mixer"] == mixer]
            tops = [x["top1"] for x in rs]
            row = dict(
                task=task,
                mixer=mixer,
                seeds=len(rs),
                top1=tops,
                top1_mean=statistics.mean(tops),
                top1_min=min(tops),
                top1_max=max(tops),
                params=rs[0].get("params"),
                flops=rs[0].get("flops"),
                train_img_per_sec=statistics.median(x["train_img_per_sec"] for x in rs),
                wall_s=sum(x["wall_s"] or 0 for x in rs),
            )
            if all("near_top1" in x for x in rs):
                images = rs[0]["val_images"]
                k = escape_count(images)
                left = [x for x in rs if escaped(x["top1"], images)]
                out = [x["top1"] for x in left]
                row.update(
                    near_top1=statistics.mean(x["near_top1"] for x in rs),
                    val_images=images,
                    escape_threshold=None if k is None else 100 * k / images,
                    escaped=len(out),
                    escape_rate=len(out) / len(rs),
                    escape_interval=wilson_interval(len(out), len(rs)),
                    escaped_top1_mean=statistics.mean(out) if out else None,
                    escaped_top1_min=min(out, default=None),
                    escaped_top1_max=max(out, default=None),
                    escaped_near_top1=statistics.mean(x["near_top1"] for x in left) if left else None,
                )
            rows.append(row)
        na = next((t for t in rows if t["mixer"] == "na"), None)
        for t in rows:
            if na is None or t is na:
                continue
            t["top1_vs_na"] = t["top1_mean"] - na["top1_mean"]
            if "escape_interval" in t:  # no escape to compare where the val set is too small to tell one
                untellable = t["escape_threshold"] is None
                t["vs_na"] = None if untellable else versus(t["escape_interval"], na["escape_interval"])
            elif min(t["seeds"], na["seeds"]) >= SEPARATE_MIN_SEEDS:
                t["vs_na"] = versus((t["top1_min"], t["top1_max"]), (na["top1_min"], na["top1_max"]))
            else:
                t["vs_na"] = None
        table += rows
    return table


def plot_escape(table: list[dict], path: Path) -> Path | None:
    """The pathfinder rows as a figure, mixers grouped by family (`FAMILIES`, `FAMILY_COLOURS`): above,
    each mixer's escape rate with its 95% Wilson interval (na's interval shaded across: a mixer beats
    or trails na only where its bar clears the band); below, every run's far-pair top-1 (filled:
    escaped, hollow: not) against the escape threshold. None when there are no pathfinder rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {t["mixer"]: t for t in table if t["task"] == "pathfinder"}
    if not rows:
        return None
    groups = [(f, [m for m in ms if m in rows]) for f, ms in FAMILIES.items()]
    groups = [(f, ms) for f, ms in groups if ms]
    groups += [("other", [m for m in rows if not any(m in ms for _, ms in groups)])]
    x, positions, colours = 0.0, {}, {}
    for family, members in groups:
        for m in members:
            positions[m], colours[m] = x, FAMILY_COLOURS.get(family, "gray")
            x += 1
        x += 0.6  # a gap between families
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.5 * x + 2), 6.4), sharex=True)
    na = rows.get("na")
    if na is not None:
        lo, hi = na["escape_interval"]
        top.axhspan(100 * lo, 100 * hi, color="tab:blue", alpha=0.12, lw=0, label="na's 95% interval")
    for m, t in rows.items():
        lo, hi = t["escape_interval"]
        rate = 100 * t["escape_rate"]
        top.errorbar(
            positions[m], rate, yerr=[[rate - 100 * lo], [100 * hi - rate]], fmt="o", color=colours[m],
            capsize=3, ms=6, lw=1.5,
        )  # fmt: skip
        top.annotate(f"{t['escaped']}/{t['seeds']}", (positions[m], 100 * hi), xytext=(0, 3),
                     textcoords="offset points", ha="center", fontsize=7)  # fmt: skip
        jitter = [0.12 * (i - (t["seeds"] - 1) / 2) / max(1, t["seeds"] / 4) for i in range(t["seeds"])]
        for dx, top1 in zip(jitter, t["top1"], strict=True):
            out = escaped(top1, t["val_images"])
            bottom.plot(positions[m] + dx, top1, "o", ms=4.5, color=colours[m],
                        mfc=colours[m] if out else "white")  # fmt: skip
    top.set_ylim(-5, 122)
    top.set_yticks(range(0, 101, 20))
    top.set_ylabel("escape rate (%), 95% Wilson", fontsize=9)
    top.set_title("Pathfinder: runs that left the chance plateau, per mixer", fontsize=10)
    threshold = next(iter(rows.values()))["escape_threshold"]
    if threshold is not None:
        bottom.axhline(threshold, color="gray", ls="--", lw=0.8, label=f"escaped: >= {threshold:.1f}%")
    bottom.axhline(50, color="gray", ls=":", lw=0.8, label="chance")
    bottom.set_ylim(min(35.0, *(min(t["top1"]) - 3 for t in rows.values())), 103)
    bottom.set_ylabel("far-pair top-1 per run (%)", fontsize=9)
    bottom.set_xticks([positions[m] for m in rows], list(rows), rotation=45, ha="right", fontsize=8)
    for ax in (top, bottom):
        ax.grid(True, axis="y", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    for family, members in groups:
        if members:
            centre = (positions[members[0]] + positions[members[-1]]) / 2
            top.text(centre, 119, family, ha="center", va="top", fontsize=8,
                     color=FAMILY_COLOURS.get(family, "gray"), fontweight="bold")  # fmt: skip
    for ax in (top, bottom):  # outside, right: a legend inside would cover a family's runs
        if ax.get_legend_handles_labels()[0]:  # the top one has a label only where `na` ran
            ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def no_verdict(row: dict, table: list[dict]) -> str:
    """Why a shapes row has no 'beats' / 'trails' / 'overlaps' against `na`."""
    if not any(t["task"] == row["task"] and t["mixer"] == "na" for t in table):
        return "no na runs"
    return f"< {SEPARATE_MIN_SEEDS} seeds"


def accuracy_targets(table: list[dict]) -> list[dict]:
    """Pathfinder: a global-reach mixer beats `na` by the interval rule. The one named: one that beats
    it, else the surest escaper (its interval's lower end, not its rate: 1 of 1 is no evidence). n/a
    when the seeds could not separate them even if every run of one escaped and none of the other
    (fewer than 4 runs each at 95%)."""
    rows = [t for t in table if t["task"] == "pathfinder"]
    na = next((t for t in rows if t["mixer"] == "na"), None)
    global_reach = [t for t in rows if t["mixer"] not in LOCAL]
    if na is None or not global_reach:
        return []
    beats = [t for t in global_reach if t["vs_na"] == "beats"]
    best = max(
        beats or global_reach,
        key=lambda t: (wilson_interval(t["escaped"], t["seeds"])[0], t["escaped_top1_mean"] or 0),
    )
    separable = (
        best["escape_threshold"] is not None
        and wilson_interval(best["seeds"], best["seeds"])[0] > wilson_interval(0, na["seeds"])[1]
    )
    return [
        dict(
            target=f"pathfinder: best global-reach mixer ({best['mixer']}) escapes more often than na "
            "(95% Wilson intervals separate)",
            value=best["escape_rate"] - na["escape_rate"],
            met=best["vs_na"] == "beats" if separable else None,
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
    mixers: list[str], overrides: dict[str, list[str]], seeds: dict[str, int], headline_seeds: int
) -> list[tuple[str, str, int]]:
    """Every (task, mixer, seed) to train, `runs_per_mixer` seeds each; the heaviest task first (with
    runs side by side, a slow run started last would finish alone)."""
    tasks = sorted(overrides, key=lambda t: -task_work(task_config(t, overrides[t])))
    return [
        (task, mixer, seed)
        for task in tasks
        for mixer in mixers
        for seed in range(runs_per_mixer(task, mixer, seeds, headline_seeds))
    ]


def runs_per_mixer(task: str, mixer: str, seeds: dict[str, int], headline_seeds: int) -> int:
    """Seeds of `mixer` on `task`: its own count (`seeds["task/mixer"]`), else the task's, at least
    `headline_seeds` for the `HEADLINE` mixers (`engine.zoo.parse_seeds` makes `seeds`)."""
    if (own := seeds.get(f"{task}/{mixer}")) is not None:
        return own
    n = seeds.get(task, 1)
    return max(n, headline_seeds) if mixer in HEADLINE else n


def accuracy(
    plan: list[tuple[str, str, int]],
    overrides: dict[str, list[str]],
    seeds: dict[str, int],
    headline_seeds: int,
    out: Path,
    quiet: bool,
    jobs: int = 1,
) -> dict:
    """Train every (task, mixer, seed) of `plan` (`overrides`: task -> train.py overrides) that `out`
    does not hold yet (the caller has run `check_reusable` on the plan), `jobs` runs side by side
    with an equal share of the cores each (a small model uses one core better than two threads do)."""
    threads = max(1, bench.usable_cpus() // jobs) if jobs > 1 else None
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
        full_study_estimate=full_study_estimate(runs, seeds, headline_seeds, jobs),
    )
    bench.write_json(result, out / "accuracy.json")
    (out / "accuracy.md").write_text(accuracy_markdown(result) + "\n")
    plot_escape(table, out / "escape.png")
    bench.write_csv(table, out / "accuracy.csv")
    return result


def task_images(cfg: dict) -> float:
    """Images one epoch of a task's run passes through the model, val counted as a third (no backward)."""
    return generated_images(cfg["data"], "train") + generated_images(cfg["data"], "val") / 3


def task_work(cfg: dict) -> float:
    """Pixels a task's run pushes through the model: epochs x images x image area."""
    return cfg["sched"]["epochs"] * task_images(cfg) * cfg["data"]["img_size"] ** 2


def full_study_estimate(
    runs: list[dict], seeds: dict[str, int], headline_seeds: int, jobs: int
) -> dict | None:
    """Seconds the study of every mixer at these seeds per task (`runs_per_mixer`), with the default
    recipe, would train at these runs' measured img/s (unmeasured mixers at the median speed): images
    per run from the configs, epochs x (train + val), start-up and near pairs not counted; in wall
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
            n = runs_per_mixer(task, mixer, seeds, headline_seeds)
            seconds += n * cfg["sched"]["epochs"] * images / speeds.get((task, mixer), median)
        per_task[task] = seconds
        total += seconds
    return dict(
        seeds={**{task: 1 for task in TASKS}, **seeds},
        headline_seeds=headline_seeds,
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
