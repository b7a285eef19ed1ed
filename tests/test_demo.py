"""`make demo`'s pipeline end to end at toy size (scripts/demo.py -> engine/demo.py: data, speed probe,
training, eval.py, table, learning curves), the learning curves against the runs' own summary.csv, and
the demo models' sizes (the recipe's fairness claim)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image
from test_train import run_cli

import configs
from engine import demo

REPO = Path(__file__).resolve().parents[1]

EPOCHS, BATCH, PER_CLASS, CLASSES = 2, 8, 6, 4
LABELS = {"nat": "demo_nat", "swin": "demo_swin", "convnext": "demo_convnext"}


def run_toy_demo(tmp: Path, models: list[str]):
    """The real demo.py on 4 classes x 6 images (batch 8, 2 epochs): seconds per model, not minutes."""
    overrides = [
        f"data.root={tmp / 'data'}",
        f"data.synthetic={{num_classes: {CLASSES}, train_per_class: {PER_CLASS}, val_per_class: 2}}",
        f"train.batch_size={BATCH}",
        "train.progress=off",
    ]
    out = tmp / "out"
    proc = run_cli(
        REPO / "scripts" / "demo.py",
        "--out",
        out,
        "--epochs",
        EPOCHS,
        "--models",
        *models,
        "--set",
        *overrides,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, out


def check_outputs(proc, out: Path, labels: list[str]):
    assert "ETA" in proc.stdout and "learning curves" in proc.stdout
    results = json.loads((out / "comparison.json").read_text())
    assert [r["label"] for r in results] == labels
    table = (out / "comparison.md").read_text()
    with (out / "comparison.csv").open() as f:  # numbers, not the table's rounded text
        assert [(r["label"], float(r["top1"]), int(r["flops"])) for r in csv.DictReader(f)] == [
            (r["label"], r["top1"], r["flops"]) for r in results
        ]
    with (out / "learning_curves.csv").open() as f:
        curve = list(csv.DictReader(f))
    per_epoch = CLASSES * PER_CLASS // BATCH * BATCH
    for r in results:
        run = Path(r["run_dir"])
        assert "error" not in r, r
        assert r["top1"] == json.loads((run / "eval.json").read_text())["top1"]
        assert f"| {r['label']} ({r['arch']}) |" in table
        assert any((run / "tb").glob("events.out.tfevents.*"))
        with (run / "summary.csv").open() as f:
            summary = list(csv.DictReader(f))
        assert len(summary) == EPOCHS
        mine = [row for row in curve if row["model"] == r["label"]]
        assert [int(row["images_seen"]) for row in mine] == [per_epoch * (e + 1) for e in range(EPOCHS)]
        assert [float(row["val_top1"]) for row in mine] == pytest.approx(
            [float(s["eval_top1"]) for s in summary], abs=0.005
        )
    with Image.open(out / "learning_curves.png") as img:
        assert img.format == "PNG" and img.size == (640, 420)


def test_demo_pipeline_end_to_end(tmp_path):
    """CI's tiny run: one model through every stage (the three-model run is the slow test below)."""
    proc, out = run_toy_demo(tmp_path, ["nat"])
    check_outputs(proc, out, ["demo_nat"])


@pytest.mark.slow
def test_demo_all_three_models_end_to_end(tmp_path):
    proc, out = run_toy_demo(tmp_path, list(LABELS))
    check_outputs(proc, out, list(LABELS.values()))


def test_demo_models_are_the_same_size_and_train_under_the_shared_recipe():
    """Each demo config builds its model under the shared recipe (demo.yaml) and takes training steps
    (the speed probe); parameter counts are within 15% of each other (~0.5M): a like-for-like table."""
    import timm

    import models  # noqa: F401

    cfgs = {m: configs.load_config([REPO / path]) for m, path in demo.MODELS.items()}
    recipe = {k: v for k, v in cfgs["nat"].items() if k != "model"}
    params = {}
    for m, cfg in cfgs.items():
        assert {k: v for k, v in cfg.items() if k != "model"} == recipe, f"{m} changes the recipe"
        kwargs = cfg["model"]["kwargs"]
        params[m] = sum(
            p.numel() for p in timm.create_model(cfg["model"]["name"], num_classes=10, **kwargs).parameters()
        )
        assert demo.probe_train_speed(cfg, num_classes=10) > 0
    assert max(params.values()) / min(params.values()) < 1.15, params
    assert all(4e5 < n < 6e5 for n in params.values()), params


def test_images_per_epoch_drops_the_last_partial_batch():
    cfg = {"data": {"synthetic": {"num_classes": 10, "train_per_class": 300}}, "train": {"batch_size": 64}}
    assert demo.images_per_epoch(cfg) == 2944  # 46 full batches of 64 out of 3000


def load_demo_script():
    """scripts/demo.py loaded by path (nothing imports an entry point by name) to call its `main`."""
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_bad_setting_is_one_error_line(tmp_path, capsys):
    assert (
        load_demo_script().main(
            ["--out", str(tmp_path), "--set", f"data.root={tmp_path / 'd'}", "data.synthetic.polarity=dark"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "polarity='dark'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_compare_into_a_folder_with_runs_stops_before_touching_it(tmp_path, capsys):
    """Training refuses a folder that holds a run: without --skip-train the command says so first,
    instead of failing each model and writing a table of dashes over the finished one."""
    from test_train import load_entry_point

    (tmp_path / "demo_nat").mkdir()
    (tmp_path / "demo_nat" / "last.pth.tar").write_bytes(b"a finished run")
    (tmp_path / "comparison.md").write_text("the finished table")
    compare = load_entry_point("scripts/compare.py")
    assert compare.main(["configs/demo_nat.yaml", "configs/demo_swin.yaml", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "demo_nat already holds a run" in err[0] and "--skip-train" in err[0]
    assert (tmp_path / "comparison.md").read_text() == "the finished table"
