"""eval.py through its command line: JSON contents, EMA / resolution options, foreign checkpoints, errors."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
import yaml
from test_train import load_entry_point, run_cli, write_config


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


def test_an_unreadable_val_image_is_left_out_not_replaced(trained, tmp_path, capsys):
    """timm's dataset reads the next image in an unreadable one's place (right for a training epoch);
    scoring it would count that neighbour twice and its class once too often."""
    work, run = trained
    shutil.copytree(work / "data" / "val", tmp_path / "val")
    classes = sorted(p.name for p in (tmp_path / "val").iterdir())
    (tmp_path / "val" / classes[0] / "zz_broken.png").write_bytes(b"not an image")  # sorts last in its class
    out = tmp_path / "e.json"
    args = [str(run / "model_best.pth.tar"), "--data-dir", str(tmp_path), "--dataset", "folder", "-j", "0"]
    assert load_entry_point("eval.py").main([*args, "-o", str(out)]) == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert r["dataset"]["unreadable_images_skipped"] == 1 and r["dataset"]["num_images"] == 6
    assert {c: v["count"] for c, v in r["per_class"].items()} == {c: 2 for c in classes}
    run_cli("eval.py", run / "model_best.pth.tar", "-o", tmp_path / "clean.json", check=0)
    clean = json.loads((tmp_path / "clean.json").read_text())
    assert r["top1"] == clean["top1"] and r["loss"] == pytest.approx(clean["loss"], abs=1e-6)


def test_training_validation_leaves_an_unreadable_val_image_out_as_eval_does(trained, tmp_path):
    """Training's validation scored the neighbour timm reads in an unreadable image's place, so with a
    damaged val set its numbers were not eval.py's on the same checkpoint and data."""
    work, _ = trained
    shutil.copytree(work / "data", tmp_path / "data")
    classes = sorted(p.name for p in (tmp_path / "data" / "val").iterdir())
    (tmp_path / "data" / "val" / classes[0] / "zz_broken.png").write_bytes(b"not an image")
    cfg = write_config(
        tmp_path / "folder.yaml",
        tmp_path / "data",
        data={"dataset": "folder"},
        sched={"epochs": 1, "warmup_epochs": 0},
    )
    run_cli("train.py", "-c", cfg, "--output", tmp_path / "runs", "--experiment", "r", check=0)
    row = list(csv.DictReader((tmp_path / "runs" / "r" / "summary.csv").open()))[-1]
    args = ["--data-dir", tmp_path / "data", "--dataset", "folder", "-j", "0", "-o", tmp_path / "e.json"]
    run_cli("eval.py", tmp_path / "runs" / "r" / "last.pth.tar", *args, check=0)
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["dataset"]["num_images"] == 6 and r["dataset"]["unreadable_images_skipped"] == 1
    assert float(row["eval_top1"]) == pytest.approx(r["top1"], abs=1e-3)
    assert float(row["eval_loss"]) == pytest.approx(r["loss"], abs=1e-4)


def test_a_subset_checkpoint_is_scored_by_its_class_names_in_another_folder(trained, tmp_path, caplog):
    """A run trained on data.num_classes=2 of 3 folders: on its own data eval.py equals training's
    validation, quietly; on a folder holding one of its classes and one other, that class is scored
    (the subset was drawn again from the new folder's classes, and failed)."""
    work, _ = trained
    cfg = write_config(
        tmp_path / "subset.yaml",
        work / "data",
        data={"dataset": "folder", "num_classes": 2, "seed": 3},
        sched={"epochs": 1, "warmup_epochs": 0},
    )
    run_cli("train.py", "-c", cfg, "--output", tmp_path / "runs", "--experiment", "s", check=0)
    run = tmp_path / "runs" / "s"
    trained_classes = (run / "classes.txt").read_text().split()
    row = list(csv.DictReader((run / "summary.csv").open()))[-1]
    evaluate = load_entry_point("eval.py")
    with caplog.at_level("WARNING"):
        assert evaluate.main([str(run / "last.pth.tar"), "-j", "0", "-o", str(tmp_path / "own.json")]) == 0
    own = json.loads((tmp_path / "own.json").read_text())
    assert sorted(own["per_class"]) == sorted(trained_classes) and not caplog.records
    assert own["top1"] == pytest.approx(float(row["eval_top1"]), abs=1e-3)
    other = sorted(set(p.name for p in (work / "data" / "val").iterdir()) - set(trained_classes))[0]
    for name in (trained_classes[1], other):
        shutil.copytree(work / "data" / "val" / name, tmp_path / "mixed" / "val" / name)
    args = ["--data-dir", str(tmp_path / "mixed"), "-j", "0", "-o", str(tmp_path / "mixed.json")]
    assert evaluate.main([str(run / "last.pth.tar"), *args]) == 0
    assert list(json.loads((tmp_path / "mixed.json").read_text())["per_class"]) == [trained_classes[1]]


def ckpt_data(run) -> dict:
    """The data section a run trained with (what a -c config for its dataset would hold)."""
    return yaml.safe_load((run / "config.yaml").read_text())["data"]


def test_a_val_folder_of_no_trained_class_is_left_out_as_training_left_it(trained, tmp_path, caplog):
    work, run = trained
    shutil.copytree(work / "data" / "val", tmp_path / "val")
    classes = sorted(p.name for p in (tmp_path / "val").iterdir())
    shutil.copytree(tmp_path / "val" / classes[0], tmp_path / "val" / "zz_not_trained")
    out = tmp_path / "e.json"
    args = [str(run / "model_best.pth.tar"), "--data-dir", str(tmp_path), "--dataset", "folder", "-j", "0"]
    assert load_entry_point("eval.py").main([*args, "-o", str(out)]) == 0
    r = json.loads(out.read_text())
    assert sorted(r["per_class"]) == classes and r["dataset"]["num_images"] == 6
    assert any("not among the checkpoint's classes (e.g. 'zz_not_trained')" in m for m in caplog.messages)


def test_eval_ema_and_resolution_options(trained):
    work, run = trained
    # --use-ema scores the EMA weights: training's own validation of them, not of the model's
    run_cli("eval.py", run / "last.pth.tar", "--use-ema", "-o", work / "ema.json", check=0)
    r = json.loads((work / "ema.json").read_text())
    row = list(csv.DictReader((run / "summary.csv").open()))[-1]
    assert abs(float(row["eval_ema_loss"]) - float(row["eval_loss"])) > 1e-3  # the two can be told apart
    assert r["weights"] == "ema" and r["loss"] == pytest.approx(float(row["eval_ema_loss"]), abs=1e-4)
    assert r["top1"] == pytest.approx(float(row["eval_ema_top1"]), abs=1e-3)
    run_cli("eval.py", run / "last.pth.tar", "--use-ema", "--img-size", "48", "--crop-pct", "1.0", check=0)
    r = json.loads((run / "last-eval-ema.json").read_text())
    assert r["weights"] == "ema" and r["input_size"] == [3, 48, 48] and r["crop_pct"] == 1.0
    # a -c config's transform goes over the checkpoint's own (the data it names too), flags over both
    config = work / "c40.yaml"
    config.write_text(yaml.safe_dump({"data": {**ckpt_data(run), "img_size": 40, "crop_pct": 0.5}}))
    run_cli("eval.py", run / "last.pth.tar", "-c", config, "-o", work / "c40.json", check=0)
    r = json.loads((work / "c40.json").read_text())
    assert r["input_size"] == [3, 40, 40] and r["crop_pct"] == 0.5


@pytest.mark.parametrize(
    "flag", [["-b", "0"], ["--crop-pct", "0"], ["-j", "-1"], ["--max-per-class", "0"], ["--num-classes", "0"]]
)
def test_out_of_range_arguments_are_refused_before_anything_runs(flag, capsys):
    """-b 0 was a ValueError traceback from the loader; --crop-pct 0 scored with timm's default crop."""
    with pytest.raises(SystemExit) as exit_info:
        load_entry_point("eval.py").build_parser().parse_args(["run", *flag])
    assert exit_info.value.code == 2 and f"argument {flag[0]}" in capsys.readouterr().err


def test_mismatched_checkpoint_is_one_error_line(trained):
    _, run = trained
    # the file names its model: another one is refused, even DiNAT, whose weights have NAT's shapes
    for other in ("nat_tiny", "dinat_mini"):
        p = run_cli("eval.py", run / "model_best.pth.tar", "--model", other)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert (
            len(lines) == 1 and f"holds nat_mini weights (its saved settings say so), not {other}" in lines[0]
        )
    p = run_cli("eval.py", run / "model_best.pth.tar", "--num-classes", "7")
    assert p.returncode == 2 and "classifier" in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_missing_or_unreadable_checkpoint(trained):
    work, _ = trained
    p = run_cli("eval.py", work / "nope.pth")
    assert p.returncode == 2 and p.stderr.startswith("error: checkpoint") and "not found" in p.stderr
    (work / "junk.pth").write_text("junk")
    p = run_cli("eval.py", work / "junk.pth", "--model", "nat_mini", "--data-dir", work / "data")
    assert p.returncode == 2 and "cannot read checkpoint" in p.stderr and "Traceback" not in p.stderr
    _, run = trained  # a wrong --data-dir is named as the eval folder (it was "train folder ... the config")
    p = run_cli("eval.py", run / "last.pth.tar", "--data-dir", work / "nowhere", "--dataset", "folder")
    expected = f"error: eval folder {work / 'nowhere' / 'val'} does not exist; check --data-dir and --split"
    assert p.returncode == 2 and p.stderr.strip() == expected, p.stderr


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


def test_exported_weights_keep_their_settings_for_eval(trained, tmp_path, capsys):
    """Exported weights (.safetensors and .pth) score like their checkpoint with no --model /
    --model-kwargs: the file says which model, classes and transform (here 32 px, not timm's 224)."""
    work, run = trained
    export = load_entry_point("scripts/export_weights.py")
    evaluate = load_entry_point("eval.py")
    assert evaluate.main([str(run / "model_best.pth.tar"), "-o", str(tmp_path / "ref.json"), "-j", "0"]) == 0
    ref = json.loads((tmp_path / "ref.json").read_text())
    for name in ("w.safetensors", "w.pth"):
        assert export.main([str(run / "model_best.pth.tar"), str(tmp_path / name)]) == 0
        args = [
            str(tmp_path / name),
            "--data-dir",
            str(work / "data"),
            "-j",
            "0",
            "-o",
            str(tmp_path / "e.json"),
        ]
        assert evaluate.main(args) == 0, capsys.readouterr().err
        r = json.loads((tmp_path / "e.json").read_text())
        assert r["input_size"] == ref["input_size"] == [3, 32, 32], name
        assert r["top1"] == ref["top1"] and r["loss"] == pytest.approx(ref["loss"], abs=1e-6), name
        assert r["per_class"].keys() == ref["per_class"].keys()
    capsys.readouterr()
    assert evaluate.main([str(tmp_path / "w.pth")]) == 2  # no dataset in exported weights: say so
    assert "not its dataset" in capsys.readouterr().err


def test_outputs_past_the_named_classes_stay_scored_as_training_scored_them():
    """model.num_classes above the dataset's: training scores argmax over every output (the extra ones
    are never a target), so eval.py on the same classes must too; only a subset of the named classes
    is scored among its own outputs."""
    from engine.evaluate import class_index_map

    names = ["a", "b", "c"]
    assert class_index_map(names, names, 50) is None  # all 50 outputs, targets 0..2
    assert class_index_map(["c", "a", "b"], names, 5) == [2, 0, 1, 3, 4]
    assert class_index_map(["a", "c"], names, 50) == [0, 2]


def test_subset_and_integer_named_val_folders(trained, tmp_path, capsys):
    """A val folder with some of the classes scores those (and says so); ImageNetV2-style folders
    named by output index score like the named ones; the ImageNet-val hint only for a flat folder."""
    work, run = trained
    evaluate = load_entry_point("eval.py")
    classes = torch.load(run / "model_best.pth.tar", weights_only=True)["classes"]
    for i, name in enumerate(classes):
        shutil.copytree(work / "data" / "val" / name, tmp_path / "int" / "val" / str(i))
    shutil.copytree(work / "data" / "val" / classes[2], tmp_path / "sub" / "val" / classes[2])
    shutil.copytree(work / "data" / "val" / classes[0], tmp_path / "sub" / "val" / classes[0])
    results = {}
    for which in ("int", "sub"):
        out = tmp_path / f"{which}.json"
        args = [
            str(run / "model_best.pth.tar"),
            "--data-dir",
            str(tmp_path / which),
            "--dataset",
            "folder",
            "-j",
            "0",
            "-o",
            str(out),
        ]
        assert evaluate.main(args) == 0, capsys.readouterr().err
        results[which] = json.loads(out.read_text()), capsys.readouterr().out
    assert evaluate.main([str(run / "model_best.pth.tar"), "-j", "0", "-o", str(tmp_path / "all.json")]) == 0
    full = json.loads((tmp_path / "all.json").read_text())
    as_int, _ = results["int"]
    assert as_int["top1"] == full["top1"] and as_int["loss"] == pytest.approx(full["loss"], abs=1e-6)
    assert [as_int["per_class"][str(i)] for i in range(3)] == [full["per_class"][c] for c in classes]
    sub, printed = results["sub"]
    assert list(sub["per_class"]) == [classes[0], classes[2]] and sub["dataset"]["num_images"] == 4
    assert "2 of the model's 3 classes" in printed
    # a flat folder of images (ImageNet's official val layout): the sorting script is the hint
    flat = tmp_path / "flat" / "val"
    flat.mkdir(parents=True)
    for f in sorted((work / "data" / "val" / classes[0]).iterdir())[:2]:
        shutil.copy(f, flat / f.name)
    flat_args = ["--data-dir", str(tmp_path / "flat"), "--dataset", "folder"]
    assert evaluate.main([str(run / "model_best.pth.tar"), *flat_args]) == 2
    err = capsys.readouterr().err
    assert "prepare_imagenet_val.py" in err and "--class-list" in err, err


def test_default_workers_fit_the_cpus_this_process_may_use(monkeypatch):
    """Exported weights carry no data settings: the default 4 workers on a 2-CPU box made torch warn
    twice per run. Unset, they are capped at the CPUs; -j N is taken as given."""
    import argparse
    import os

    from engine.evaluate import data_settings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    flags = dict(config=None, data_dir="d", dataset=None, class_list=None, max_per_class=None, split=None)
    assert data_settings(argparse.Namespace(**flags, workers=None), {}, True)["workers"] == 2
    assert data_settings(argparse.Namespace(**flags, workers=6), {}, True)["workers"] == 6
