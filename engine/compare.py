"""Comparing models under one recipe: each config trained by train.py and scored by eval.py (both as
subprocesses: the CLI is the interface), then one side-by-side table.

Owns the comparison run and its outputs: `compare(...)` trains and evaluates every config into
OUT/<label>/ and gathers one result row each (top-1, top-5, params, FLOPs, train and eval img/s, train
time; a failed model gets an `error` and the rest go on), `write_outputs` writes OUT/comparison.{md,csv,json}.
`run(args)` is the command behind scripts/compare.py; scripts/demo.py's pipeline (engine/demo.py) uses
`compare` and `write_outputs`.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from engine.errors import EXIT_ERROR

REPO = Path(__file__).resolve().parents[1]


def find_config(path) -> Path:
    """A config path as given (relative to the current folder), else relative to the repo."""
    p = Path(path)
    return p.resolve() if p.is_file() else (REPO / p).resolve()


def label_of(config: str) -> str:
    return Path(config).stem


def train(
    label, model_cfg, common, overrides, out, nproc=1, quiet=False, quiet_stderr=False, threads=None
) -> float:
    """Train `model_cfg` (+ `common` configs, `overrides`) into out/label with train.py; its wall time (s).

    `quiet` hides train.py's stdout; `quiet_stderr` its stderr too, whose last line then goes into the
    error of a failed run. `threads` sets the run's OMP_NUM_THREADS (runs side by side: one each)."""
    cmd = [str(REPO / "train.py"), "-c", str(model_cfg)]
    for c in common:
        cmd += ["-c", str(c)]
    cmd += ["--output", str(out), "--experiment", label]
    if overrides:
        cmd += ["--set", *overrides]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *cmd,
        ]
    else:
        cmd = [sys.executable, *cmd]
    t0 = time.perf_counter()
    stdout = subprocess.DEVNULL if quiet else None
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        cmd, cwd=REPO, stdout=stdout, stderr=subprocess.PIPE if quiet_stderr else None, text=True, env=env
    )
    if proc.returncode != 0:
        tail = "".join(f" {line}" for line in (proc.stderr or "").strip().splitlines()[-1:])
        raise RuntimeError(
            f"training {label} failed (exit {proc.returncode}){tail}; see {out / label / 'train.log'}"
        )
    return time.perf_counter() - t0


def evaluate(run_dir: Path, batch_size: int = 64, extra=()) -> dict:
    out = run_dir / "eval.json"
    cmd = [
        sys.executable,
        str(REPO / "eval.py"),
        str(run_dir / "model_best.pth.tar"),
        "-o",
        str(out),
        "--quiet",
        "-b",
        str(batch_size),
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"eval of {run_dir} failed: {proc.stderr.strip()}")
    return json.loads(out.read_text())


def run_model(run_dir: Path) -> tuple:
    """(a run's model, built from its best checkpoint's arch, classes and kwargs; its eval input size)."""
    from engine.checkpoint import load_checkpoint
    from engine.factory import create_model

    ck = load_checkpoint(run_dir / "model_best.pth.tar")
    model = create_model(ck["arch"], ck["num_classes"], {"kwargs": ck.get("model_kwargs") or {}})
    return model, tuple(ck["data_config"]["input_size"])


def model_flops(model, size: tuple) -> int:
    """Multiply-adds of one (1, *size) input: models.flops (NA at its true cost), else torch's counter."""
    import torch

    try:
        from models.flops import count_flops as na_flops

        return int(na_flops(model, size))
    except ImportError:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.eval()(torch.zeros(1, *size))
        return counter.get_total_flops() // 2


def count_flops(run_dir: Path) -> int | None:
    """Multiply-adds of a run's model at its eval resolution."""
    return model_flops(*run_model(run_dir))


def train_throughput(run_dir: Path) -> float | None:
    """Median train img/s over epochs (the first is left out when there are more: warm-up)."""
    path = run_dir / "summary.csv"
    if not path.is_file():
        return None
    values = [float(r["train_img_per_sec"]) for r in csv.DictReader(path.open())]
    if len(values) > 1:
        values = values[1:]
    return statistics.median(values) if values else None


def fmt_count(n: float | None, unit="") -> str:
    if n is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


COLUMNS = ["model", "top-1", "top-5", "params", "MACs", "train img/s", "eval img/s", "train time"]


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        rows.append(
            [
                r["label"] + (f" ({r['arch']})" if r.get("arch") else ""),
                f"{r['top1']:.1f}" if r.get("top1") is not None else "-",
                f"{r['top5']:.1f}" if r.get("top5") is not None else "-",
                fmt_count(r.get("params")),
                fmt_count(r.get("flops")),
                f"{r['train_img_per_sec']:.0f}" if r.get("train_img_per_sec") else "-",
                f"{r['eval_img_per_sec']:.0f}" if r.get("eval_img_per_sec") else "-",
                f"{r['train_time_s'] / 60:.1f} min" if r.get("train_time_s") else "-",
            ]
        )
    return rows


def markdown(results: list[dict]) -> str:
    rows = table_rows(results)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# comparison.csv: the results' numbers as measured (the table's rounded, unit-suffixed text is for reading)
CSV_FIELDS = [
    "label",
    "arch",
    "top1",
    "top5",
    "eval_loss",
    "params",
    "flops",
    "train_img_per_sec",
    "eval_img_per_sec",
    "train_time_s",
    "config",
    "run_dir",
    "error",
]


def write_outputs(out: Path, results: list[dict]) -> str:
    from engine.bench import write_csv

    md = markdown(results)
    (out / "comparison.md").write_text(md + "\n")
    (out / "comparison.json").write_text(json.dumps(results, indent=1) + "\n")
    write_csv(results, out / "comparison.csv", CSV_FIELDS)
    return md


def compare(
    model_cfgs,
    common=(),
    overrides=(),
    out="runs/compare",
    skip_train=False,
    nproc=1,
    eval_batch_size=64,
    quiet=False,
) -> list[dict]:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [find_config(c) for c in common]
    results = []
    for cfg in map(find_config, model_cfgs):
        label = label_of(cfg)
        run_dir = out / label
        row = {"label": label, "config": str(cfg), "run_dir": str(run_dir)}
        try:
            if not (skip_train and (run_dir / "model_best.pth.tar").is_file()):
                print(f"\n=== training {label} ({cfg}) -> {run_dir}", flush=True)
                row["train_time_s"] = train(label, cfg, common, overrides, out, nproc, quiet)
            print(f"=== evaluating {label}", flush=True)
            ev = evaluate(run_dir, eval_batch_size)
            row.update(
                arch=ev["model"],
                top1=ev["top1"],
                top5=ev["top5"],
                params=ev["param_count"],
                eval_img_per_sec=ev["img_per_sec"],
                eval_loss=ev["loss"],
            )
            row["flops"] = count_flops(run_dir)
            row["train_img_per_sec"] = train_throughput(run_dir)
        except Exception as e:  # keep going: the table says which model failed
            row["error"] = str(e)
            print(f"!!! {label}: {e}", file=sys.stderr, flush=True)
        results.append(row)
    return results


def run(args) -> int:
    """The compare command (scripts/compare.py's arguments): every config must exist (else one
    `error:` line, exit 2); then compare, write and print the table. Exit 1 when a model failed."""
    overrides = list(args.set) + ([f"data.root={args.data_dir}"] if args.data_dir else [])
    for c in [*args.configs, *args.common]:
        if not Path(c).is_file() and not (REPO / c).is_file():
            print(f"error: config '{c}' not found; see {REPO / 'configs'}", file=sys.stderr)
            return EXIT_ERROR
    taken = [label_of(find_config(c)) for c in args.configs]
    taken = [label for label in taken if (Path(args.out) / label / "last.pth.tar").exists()]
    if taken and not args.skip_train:  # training would refuse them one by one, after the others
        print(
            f"error: {Path(args.out) / taken[0]} already holds a run ({len(taken)} of the models do); "
            "--skip-train reuses finished runs, or give another --out",
            file=sys.stderr,
        )
        return EXIT_ERROR
    results = compare(
        args.configs, args.common, overrides, args.out, args.skip_train, args.nproc, args.eval_batch_size
    )
    md = write_outputs(Path(args.out), results)
    print("\n" + md)
    print(f"\ntables: {Path(args.out) / 'comparison.md'}; TensorBoard: tensorboard --logdir {args.out}")
    return 1 if any("error" in r for r in results) else 0
