"""The demo pipeline (`make demo`): NAT vs Swin vs ConvNeXt trained under one recipe on the embedded
synthetic shapes dataset, sized for a small CPU.

Owns the demo's models (MODELS: configs/demo_{nat,swin,convnext}.yaml), the speed probe and the ETA
built on it (`probe_train_speed`, `images_per_epoch`, ETA_OVERHEAD, ETA_STARTUP_IMAGES), the learning
curves (val top-1 vs images seen: `learning_curves`, `write_learning_curves`) and the five-step run,
`run(args)`, the command behind scripts/demo.py. Training, evaluation and the table are engine/compare.py's.
"""

from __future__ import annotations

import csv
import sys
import time
from datetime import datetime
from pathlib import Path

import configs
from engine import compare
from engine.errors import EXIT_ERROR

REPO = Path(__file__).resolve().parents[1]

MODELS = {
    "nat": "configs/demo_nat.yaml",
    "swin": "configs/demo_swin.yaml",
    "convnext": "configs/demo_convnext.yaml",
}
# ETA = ETA_OVERHEAD x (images seen + ETA_STARTUP_IMAGES) / probed step speed, summed over models. The
# probe times the model's training step only; the factor adds data loading/augmentation (workers: 0, in
# the training process) and the per-epoch evaluation. Measured: 2.7 on a quiet 2-core Intel Xeon
# (AVX-512; a fresh-clone `make demo`: the ETA said 1.7 min at 2.2, training + eval took 2.1), 2.4 on
# a 2-core box under load 11. 2.5 keeps both within ~10%.
# Starting train.py and eval.py (torch/timm imports), checkpoint writes and the FLOP count cost about as
# much as ETA_STARTUP_IMAGES training images, on a slow CPU as on a fast one.
ETA_OVERHEAD = 2.5
ETA_STARTUP_IMAGES = 3000
PROBE_STEPS = 3


def images_per_epoch(cfg: dict) -> int:
    """Training images one epoch feeds the model (train.py drops the last partial batch)."""
    s, bs = cfg["data"]["synthetic"], cfg["train"]["batch_size"]
    return s["num_classes"] * s["train_per_class"] // bs * bs


def probe_train_speed(cfg: dict, num_classes: int) -> float:
    """Training images/s of `cfg`'s model on this CPU: PROBE_STEPS timed AdamW steps after a warm-up one,
    on random images at the config's batch size and resolution (no data loading)."""
    import timm
    import torch

    import models  # noqa: F401  (registers nat_*)

    m = cfg["model"]
    model = timm.create_model(
        m["name"], num_classes=num_classes, drop_path_rate=m["drop_path_rate"], **(m["kwargs"] or {})
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bs, size = cfg["train"]["batch_size"], cfg["data"]["img_size"]
    images, target = torch.randn(bs, 3, size, size), torch.randint(0, num_classes, (bs,))
    start = 0.0
    for step in range(PROBE_STEPS + 1):
        if step == 1:
            start = time.perf_counter()
        torch.nn.functional.cross_entropy(model(images), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return bs * PROBE_STEPS / (time.perf_counter() - start)


def learning_curves(results: list[dict], per_epoch: int) -> dict[str, list[tuple[int, float]]]:
    """{label: [(images seen, val top-1), ...]} from each run's summary.csv (one row per epoch)."""
    curves = {}
    for r in results:
        path = Path(r["run_dir"]) / "summary.csv"
        if not path.is_file():
            continue
        rows = [row for row in csv.DictReader(path.open()) if row.get("eval_top1")]
        # summary.csv counts epochs from 1: epoch N's row is after N epochs of images
        curves[r["label"]] = [(int(row["epoch"]) * per_epoch, float(row["eval_top1"])) for row in rows]
    return curves


def write_learning_curves(out: Path, curves: dict, chance: float, title: str) -> Path:
    """OUT/learning_curves.csv (model, images_seen, val_top1) and OUT/learning_curves.png; returns the PNG."""
    with (out / "learning_curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "images_seen", "val_top1"])
        for label, points in curves.items():
            w.writerows([label, n, f"{top1:.2f}"] for n, top1 in points)
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for label, points in curves.items():
        xs, ys = zip(*points, strict=True) if points else ((), ())
        ax.plot([x / 1000 for x in xs], ys, marker="o", label=label)
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.0f}%)")
    ax.set_xlabel("training images seen (thousands)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    png = out / "learning_curves.png"
    fig.savefig(png)
    plt.close(fig)
    return png


def run(args) -> int:
    """The demo command (scripts/demo.py's arguments: out, epochs, set, models): data, speed probe and ETA,
    training and evaluation, table and learning curves. Exit 2 after one `error:` line for a bad setting,
    1 when a model failed."""
    t0 = time.perf_counter()
    out = Path(args.out or REPO / "runs" / "demo" / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    overrides = list(args.set) + ([f"sched.epochs={args.epochs}"] if args.epochs else [])
    try:
        cfgs = {m: configs.load_config([REPO / MODELS[m]], overrides) for m in args.models}
    except configs.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    cfg = next(iter(cfgs.values()))  # the recipe and data are the same for all (demo.yaml)

    from data import DataError, generate_synthetic_dataset

    d = cfg["data"]
    root = Path(d["root"]) if Path(d["root"]).is_absolute() else REPO / d["root"]
    s = d["synthetic"]
    print(
        f"[1/5] synthetic dataset: {s['num_classes']} classes x {s['train_per_class']} train / "
        f"{s['val_per_class']} val images, {s['image_size']} px, polarity {s['polarity']} -> {root}",
        flush=True,
    )
    try:
        generate_synthetic_dataset(root, **s)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"      ready ({time.perf_counter() - t0:.0f} s)", flush=True)

    epochs, per_epoch = cfg["sched"]["epochs"], images_per_epoch(cfg)
    seen = epochs * per_epoch
    speeds = {m: probe_train_speed(c, s["num_classes"]) for m, c in cfgs.items()}
    eta = sum(ETA_OVERHEAD * (seen + ETA_STARTUP_IMAGES) / v for v in speeds.values())
    print(
        "[2/5] speed probe (model step only): "
        + ", ".join(f"{m} {v:.0f} img/s" for m, v in speeds.items())
        + f" -> ETA {eta / 60:.1f} min for training and evaluation",
        flush=True,
    )
    print(
        f"[3/5] training {', '.join(args.models)}: {epochs} epochs x {per_epoch} images = {seen} images seen "
        f"each (same recipe: configs/demo.yaml) -> {out}",
        flush=True,
    )
    t_train = time.perf_counter()
    results = compare.compare(
        [REPO / MODELS[m] for m in args.models], overrides=overrides, out=out, quiet=False
    )
    print(
        f"[4/5] evaluated each best checkpoint with eval.py (eval.json in each run folder); "
        f"{(time.perf_counter() - t_train) / 60:.1f} min (ETA said {eta / 60:.1f})",
        flush=True,
    )
    md = compare.write_outputs(out, results)
    chance = 100.0 / s["num_classes"]
    task = f"{s['num_classes']}-class synthetic shapes, {s['image_size']} px"
    png = write_learning_curves(out, learning_curves(results, per_epoch), chance, task)
    print(f"[5/5] results on {task} (chance = {chance:.0f}% top-1):\n")
    print(md)
    print(f"\ntable: {out / 'comparison.md'}")
    print(f"learning curves (val top-1 vs images seen): {png}")
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {out}")
    print(f"total time: {(time.perf_counter() - t0) / 60:.1f} min")
    failed = [r["label"] for r in results if "error" in r]
    if failed:
        print(f"error: {', '.join(failed)} failed (see above)", file=sys.stderr)
        return 1
    return 0
