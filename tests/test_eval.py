"""eval.py through its command line: JSON contents, EMA / resolution options, foreign checkpoints, errors."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from test_train import run_cli, write_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("eval")
    cfg = write_config(work / "tiny.yaml", work / "data", sched={"epochs": 1, "warmup_epochs": 0})
    run_cli("train.py", "-c", cfg, "--output", work / "runs", "--experiment", "r", check=0)
    return work, work / "runs" / "r"


def test_eval_json_matches_training_validation(trained):
    work, run = trained
    p = run_cli("eval.py", run / "model_best.pth.tar", "-o", work / "e.json", check=0)
    assert "top-1" in p.stdout and "wrote" in p.stdout
    r = json.loads((work / "e.json").read_text())
    for key in ("top1", "top5", "loss", "img_per_sec", "per_class", "param_count", "input_size", "model"):
        assert key in r, key
    assert r["model"] == "nat_mini" and r["weights"] == "model"
    assert r["dataset"]["num_images"] == 6 and r["dataset"]["num_classes"] == 3
    assert sum(v["count"] for v in r["per_class"].values()) == 6
    per_class_mean = sum(v["top1"] * v["count"] for v in r["per_class"].values()) / 6
    assert per_class_mean == pytest.approx(r["top1"], abs=1e-3)
    # same transform and weights as training's own validation -> same numbers
    row = list(csv.DictReader((run / "summary.csv").open()))[-1]
    assert r["top1"] == pytest.approx(float(row["eval_top1"]), abs=1e-3)
    assert r["loss"] == pytest.approx(float(row["eval_loss"]), abs=1e-4)


def test_eval_ema_and_resolution_options(trained):
    work, run = trained
    run_cli("eval.py", run / "last.pth.tar", "--use-ema", "--img-size", "48", "--crop-pct", "1.0", check=0)
    r = json.loads((run / "last-eval-ema.json").read_text())
    assert r["weights"] == "ema" and r["input_size"] == [3, 48, 48] and r["crop_pct"] == 1.0


def test_mismatched_checkpoint_is_one_error_line(trained):
    _, run = trained
    p = run_cli("eval.py", run / "model_best.pth.tar", "--model", "nat_tiny")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not match model 'nat_tiny'" in lines[0], p.stderr
    p = run_cli("eval.py", run / "model_best.pth.tar", "--num-classes", "7")
    assert p.returncode == 2 and "classifier" in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_missing_or_unreadable_checkpoint(trained):
    work, _ = trained
    p = run_cli("eval.py", work / "nope.pth")
    assert p.returncode == 2 and p.stderr.startswith("error: checkpoint") and "not found" in p.stderr
    (work / "junk.pth").write_text("junk")
    p = run_cli("eval.py", work / "junk.pth", "--model", "nat_mini", "--data-dir", work / "data")
    assert p.returncode == 2 and "cannot read checkpoint" in p.stderr and "Traceback" not in p.stderr


def test_timm_state_dict_with_1k_head_on_a_wnid_subset(trained):
    """A plain timm state_dict of a 1000-class model, scored on 2 ImageNet classes: logits restricted."""
    import timm

    work, _ = trained
    root = work / "wnid"
    for src, wnid in (("disk", "n01440764"), ("square", "n02102040")):
        shutil.copytree(work / "data" / "val" / src, root / "val" / wnid)
    model = timm.create_model("resnet10t", num_classes=1000)
    torch.save(model.state_dict(), work / "resnet.pth")
    p = run_cli(
        "eval.py",
        work / "resnet.pth",
        "--model",
        "resnet10t",
        "--data-dir",
        root,
        "--img-size",
        "32",
        "-j",
        "0",
        "-o",
        work / "r.json",
        check=0,
    )
    r = json.loads((work / "r.json").read_text())
    assert r["dataset"]["num_classes"] == 2 and set(r["per_class"]) == {"n01440764", "n02102040"}
    assert "resnet10t" in p.stdout
    p = run_cli("eval.py", work / "resnet.pth", "--model", "resnet10t")
    assert p.returncode == 2 and "--data-dir" in p.stderr
