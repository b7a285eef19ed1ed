"""scripts/zoo.py (engine/zoo) end to end (--quick): the files it writes say what the mechanisms are.

The reference for the pattern part is each mechanism's definition: a 7x7 neighborhood reads exactly
49 of the 196 positions of a 14x14 map, full and linear attention read all of them."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from engine.zoo import accuracy, study

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "scripts" / "zoo.py"


def zoo_cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(ZOO), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def run_zoo(out, *args, timeout=600):
    proc = zoo_cli("--out", str(out), "--quick", *args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bad_arguments_get_one_error_line(tmp_path):
    proc = zoo_cli("--out", str(tmp_path), "--mixers", "na", "nosuchmixer")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "unknown mixer(s) nosuchmixer" in proc.stderr and "registered:" in proc.stderr
    proc = zoo_cli("--out", str(tmp_path), "--jobs", "0")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --rounds, --seeds, --headline-seeds and --jobs must be >= 1"
    )
    proc = zoo_cli("--out", str(tmp_path), "--parts", "accuracy", "--set", "optim.lr_typo=1")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "optim.lr_typo" in proc.stderr and not (tmp_path / "accuracy").exists()


def test_quick_study_end_to_end(tmp_path):
    """All three parts: scaling rows and targets; tiny training runs of na and full on both tasks, two
    side by side, and their table; patterns drawn from the trained pathfinder models."""
    run_zoo(tmp_path, "--mixers", "full", "na", "linear", "--jobs", "2")
    scaling = json.loads((tmp_path / "scaling.json").read_text())
    assert not scaling["errors"] and not scaling["dropped"]
    rows = {(r["mixer"], r["side"]): r for r in scaling["rows"]}
    assert set(rows) == {(m, s) for m in ("full", "na", "linear") for s in (8, 16)}
    for (_, side), r in rows.items():
        assert r["tokens"] == side * side and r["rounds"] == 2
        assert 0 < r["s_min"] <= r["s_median"] <= r["s_max"]
        assert r["speedup_vs_full"] > 0
    assert all(rows[("full", s)]["speedup_vs_full"] == 1.0 for s in (8, 16))  # full / full, round by round
    assert set(scaling["slopes"]) == {"full", "na", "linear"}
    assert scaling["environment"]["cpu"] and scaling["settings"]["stage1"]["dim"] == 64
    targets = {t["target"] for t in scaling["targets"]}
    assert "na: time slope <= 1.15" in targets and "linear: >= 4x faster than full at 16^2" in targets
    with (tmp_path / "scaling.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    assert Image.open(tmp_path / "scaling.png").size[0] > 200
    acc = json.loads((tmp_path / "accuracy.json").read_text())
    assert not acc["errors"]
    assert {(r["task"], r["mixer"]) for r in acc["runs"]} == {
        (t, m) for t in ("shapes", "pathfinder") for m in ("full", "na")
    }
    for r in acc["runs"]:
        assert 0 <= r["top1"] <= 100 and r["epochs"] == 1 and r["train_img_per_sec"] > 0
        assert r["params"] > 0 and r["flops"] > 0
        assert (0 <= r["near_top1"] <= 100) if r["task"] == "pathfinder" else "near_top1" not in r
    table = {(t["task"], t["mixer"]): t for t in acc["table"]}
    assert table[("pathfinder", "full")]["vs_na"] == pytest.approx(
        table[("pathfinder", "full")]["top1_mean"] - table[("pathfinder", "na")]["top1_mean"]
    )
    # one seed each here: no seed range, so no difference is called real or not
    assert table[("pathfinder", "full")]["noise"] is None and table[("pathfinder", "full")]["real"] is None
    # full attention has no relative-position table: fewer parameters than NA in the same backbone
    assert table[("shapes", "full")]["params"] < table[("shapes", "na")]["params"]
    assert acc["full_study_estimate"]["train_seconds"] > 0
    patterns = json.loads((tmp_path / "patterns.json").read_text())["mixers"]
    assert patterns["na"]["source"].startswith("trained") and patterns["linear"]["source"] == "initialised"
    assert patterns["na"]["reach_centre"] == pytest.approx(25 / 196)  # the zoo backbone's stage-1 window 5
    assert patterns["na"]["reach_corner"] == pytest.approx(25 / 196)  # NA's window shifts at borders
    assert patterns["full"]["reach_centre"] == patterns["full"]["reach_corner"] == 1.0
    assert patterns["linear"]["reach_centre"] == 1.0
    assert Image.open(tmp_path / "patterns.png").size[0] > 200
    # the trained models' centre token reads the whole 32 px image through its stacked layers
    for field in (patterns[m]["model_receptive_field"] for m in ("na", "full")):
        assert field["readable_share"] == 1.0 and field["image_px"] == 32 and field["images"] == 8
        assert 0 < field["radius90_px"] < 32 * 2**0.5
    assert patterns["linear"]["model_receptive_field"] is None  # not trained: --quick trains na and full
    # finished runs are reused when trained with the settings asked for now (none differs) ...
    for task, mixer in ((t, m) for t in ("shapes", "pathfinder") for m in ("full", "na")):
        quick = [*study.QUICK["overrides"], f"data.root={tmp_path / 'data' / task}"]
        run_dir = tmp_path / "accuracy" / task / f"{mixer}-s0"
        assert accuracy.changed_settings(run_dir, task, mixer, 0, quick) == []
        changed = accuracy.changed_settings(run_dir, task, mixer, 0, [*quick, "sched.epochs=2"])
        assert changed == ["sched.epochs"]
    # ... and otherwise stop the study with one error line, nothing lost
    before = (tmp_path / "accuracy" / "shapes" / "na-s0" / "last.pth.tar").stat().st_mtime_ns
    proc = zoo_cli("--out", str(tmp_path), "--quick", "--parts", "accuracy", "--set", "optim.lr=1e-4")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "4 finished run(s)" in proc.stderr and "optim.lr" in proc.stderr and "another --out" in proc.stderr
    assert (tmp_path / "accuracy" / "shapes" / "na-s0" / "last.pth.tar").stat().st_mtime_ns == before


def test_scaling_plot_styles_tell_every_mixer_apart():
    """Every registered mixer has a family (the plot's colours, the tables' order), and each gets its
    own (colour, marker): 18 series, none drawn like another."""
    from engine.zoo.scaling import mixer_styles

    assert study.registered_mixers() == list(study.ORDER) and len(study.ORDER) == 18
    styles = mixer_styles()
    assert set(styles) == set(study.ORDER)
    looks = {(s["color"], s["marker"]) for s in styles.values()}
    assert len(looks) == len(study.ORDER)
    assert {styles[m]["color"] for m in study.FAMILIES["local"]}.isdisjoint(
        styles[m]["color"] for m in study.FAMILIES["sparse"]
    )
