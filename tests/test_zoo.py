"""scripts/zoo.py (engine/zoo) end to end (--quick): the files it writes say what the mechanisms are.

The reference for the pattern part is each mechanism's definition: a 7x7 neighborhood reads exactly
49 of the 196 positions of a 14x14 map, full and linear attention read all of them."""

import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from engine.zoo import accuracy, parse_seeds, study

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
    assert table[("pathfinder", "full")]["top1_vs_na"] == pytest.approx(
        table[("pathfinder", "full")]["top1_mean"] - table[("pathfinder", "na")]["top1_mean"]
    )
    # 8 val images are too few to tell an escape from the val draw (P(8 of 8 by chance) = 1/256), and
    # one run each cannot separate two escape rates
    for mixer in ("full", "na"):
        row = table[("pathfinder", mixer)]
        assert row["escape_threshold"] is None and row["escaped"] == 0 and row["val_images"] == 8
    assert table[("pathfinder", "full")]["vs_na"] is None  # no escape to compare
    report = (tmp_path / "accuracy.md").read_text()
    assert "| na | 1 | - | - | - |" in report and "8 val images are too few to tell an escape" in report
    assert table[("shapes", "full")]["vs_na"] is None  # one seed each: seed ranges not compared
    assert Image.open(tmp_path / "escape.png").size[0] > 200
    # full attention has no relative-position table: fewer parameters than NA in the same backbone
    assert table[("shapes", "full")]["params"] < table[("shapes", "na")]["params"]
    assert acc["full_study_estimate"]["train_seconds"] > 0
    assert acc["full_study_estimate"]["seeds"] == {"shapes": 1, "pathfinder": 1}
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


def test_wilson_interval_against_hand_computed_values():
    """95% Wilson score intervals, worked by hand from p' = (p + z^2/2n) / (1 + z^2/n) +- ...: 0 of n
    has the closed form (0, z^2 / (n + z^2)), n of n its mirror; 3 of 4 worked through the formula."""
    z2 = 1.959964**2
    assert accuracy.wilson_interval(0, 6) == (0.0, pytest.approx(z2 / (6 + z2)))  # (0, 0.3902)
    assert accuracy.wilson_interval(6, 6) == (pytest.approx(6 / (6 + z2)), 1.0)  # (0.6098, 1)
    assert accuracy.wilson_interval(3, 4) == pytest.approx((0.3006, 0.9544), abs=1e-4)
    with pytest.raises(ValueError, match="at least one trial"):
        accuracy.wilson_interval(0, 0)


def binomial_tail(n: int, k: int) -> float:
    """P(X >= k), X ~ Binomial(n, 1/2), in float64 through log-gamma: the test's own reference."""
    return sum(math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) - n * math.log(2))
               for j in range(k, n + 1))  # fmt: skip


def test_escape_rule_at_its_boundary():
    """Escaped = far-pair top-1 at or above the smallest count whose chance tail is <= the level. By
    hand for 10 images at 0.05: P(X >= 9) = 11/1024 = 0.011, P(X >= 8) = 56/1024 = 0.055, so 9 of 10."""
    assert accuracy.escape_count(10, 0.05) == 9
    assert accuracy.escaped(90.0, 10, 0.05) and not accuracy.escaped(80.0, 10, 0.05)
    k = accuracy.escape_count(400)  # the study's val set at the study's level (0.001)
    assert binomial_tail(400, k) <= study.ESCAPE_LEVEL < binomial_tail(400, k - 1)
    assert k == 232  # 58.0%
    assert accuracy.escaped(58.0, 400) and not accuracy.escaped(57.75, 400)
    assert accuracy.escaped(57.999, 400)  # a top-1 rounded in summary.csv still counts as 232 right
    assert accuracy.escape_count(8) is None and not accuracy.escaped(100.0, 8)  # P(8 of 8) = 1/256


def synthetic_runs(task: str, mixer: str, top1: list[float], **extra) -> list[dict]:
    return [
        dict(task=task, mixer=mixer, seed=s, top1=t, train_img_per_sec=100.0, wall_s=1.0, **extra)
        for s, t in enumerate(top1)
    ]


def test_reading_claims_only_separated_intervals(tmp_path):
    """On made-up runs whose intervals are known by hand (0 of 6: 0-39%; 5 of 6: 44-97%; 4 of 6:
    30-90%): 5 of 6 beats na's 0 of 6, 4 of 6 overlaps it; with na at 6 of 6, 0 of 6 trails. Shapes:
    separate seed ranges with 3 seeds each beat / trail, touching ones overlap, 2 seeds are not compared."""
    far = dict(near_top1=90.0, val_images=400)
    runs = [
        *synthetic_runs("pathfinder", "na", [50.0, 50.0, 44.5, 50.0, 57.75, 50.0], **far),
        *synthetic_runs("pathfinder", "full", [99.0, 100.0, 98.0, 99.5, 100.0, 58.0], **far),
        *synthetic_runs("pathfinder", "dilated", [91.0, 50.0, 94.0, 88.0, 93.0, 90.0], **far),
        *synthetic_runs("pathfinder", "sasa", [92.0, 97.0, 50.0, 50.0, 90.0, 95.0], **far),
        *synthetic_runs("shapes", "na", [50.0, 55.0, 60.0], val_images=500),
        *synthetic_runs("shapes", "linear", [61.0, 70.0, 65.0], val_images=500),
        *synthetic_runs("shapes", "window", [40.0, 49.0, 45.0], val_images=500),
        *synthetic_runs("shapes", "halo", [60.0, 70.0, 65.0], val_images=500),
        *synthetic_runs("shapes", "sasa", [80.0, 90.0], val_images=500),
    ]
    table = {(t["task"], t["mixer"]): t for t in accuracy.summarize(runs)}
    na, full = table[("pathfinder", "na")], table[("pathfinder", "full")]
    assert (na["escaped"], full["escaped"]) == (0, 6)  # 57.75 is 231 of 400: one short
    assert full["escaped_top1_min"] == 58.0 and full["escaped_top1_mean"] == pytest.approx(554.5 / 6)
    assert table[("pathfinder", "dilated")]["escaped_top1_mean"] == pytest.approx(91.2)
    verdicts = {key: t.get("vs_na") for key, t in table.items()}
    assert verdicts == {
        ("pathfinder", "na"): None,
        ("pathfinder", "full"): "beats",
        ("pathfinder", "dilated"): "beats",
        ("pathfinder", "sasa"): "overlaps",
        ("shapes", "na"): None,
        ("shapes", "linear"): "beats",
        ("shapes", "window"): "trails",
        ("shapes", "halo"): "overlaps",  # 60.0 touches na's 60.0
        ("shapes", "sasa"): None,
    }
    assert accuracy.accuracy_targets(list(table.values()))[0]["met"] is True
    # the target names a mixer that beats na, not one with a higher rate on fewer seeds (1 of 1)
    lucky = dict(table[("pathfinder", "sasa")], mixer="sinkhorn", seeds=1, escaped=1, escape_rate=1.0)
    lucky.update(vs_na="overlaps", escaped_top1_mean=99.0)
    (target,) = accuracy.accuracy_targets([*table.values(), lucky])
    assert target["met"] is True and "(full)" in target["target"]
    # a shapes table without na: its rows say so, not "< 3 seeds"
    shapes_only = [r for r in runs if r["task"] == "shapes" and r["mixer"] == "window"]
    no_na = accuracy.summarize(shapes_only)
    assert "| window | 3 | 44.7 (40.0-49.0) | - | no na runs |" in accuracy.accuracy_markdown(
        dict(table=no_na, errors={})
    )
    text = accuracy.accuracy_markdown(dict(table=list(table.values()), errors={}))
    assert "beat na (intervals separate): full 6/6 (61-100%), dilated 5/6 (44-97%)." in text
    assert "overlap na: no claim either way: sasa 4/6 (30-90%)." in text
    assert "trail na (intervals separate): window 40.0-49.0 (3 seeds)." in text
    assert "not compared (fewer than 3 seeds): sasa 80.0-90.0 (2 seeds)." in text
    assert "| sasa | 6 | 4 | 67% (30-90%) | 93.5 (90.0-97.0) |" in text
    # na at 6 of 6: a mixer that never escaped trails it
    flipped = synthetic_runs("pathfinder", "na", [99.0] * 6, **far) + [
        r for r in runs if r["task"] == "pathfinder" and r["mixer"] != "na"
    ] + synthetic_runs("pathfinder", "window", [50.0] * 6, **far)  # fmt: skip
    assert {t["mixer"]: t.get("vs_na") for t in accuracy.summarize(flipped)}["window"] == "trails"
    # the figure: every pathfinder row drawn, nothing without them
    assert accuracy.plot_escape(list(table.values()), tmp_path / "escape.png") == tmp_path / "escape.png"
    assert Image.open(tmp_path / "escape.png").size[0] > 400
    shapes_only = [t for t in table.values() if t["task"] == "shapes"]
    assert accuracy.plot_escape(shapes_only, tmp_path / "none.png") is None
    # a study of one mixer without na (a window sweep): drawn without matplotlib's empty-legend warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = [table[("pathfinder", "dilated")]]
        assert accuracy.plot_escape(one, tmp_path / "one.png") == tmp_path / "one.png"


def test_seeds_apply_to_every_mixer():
    """--seeds N for every task, TASK=N for one, TASK/MIXER=N for one mixer there; every mixer gets
    its task's, the headline mixers at least --headline-seeds, a mixer named on its own exactly its own."""
    tasks, mixers = ["pathfinder", "shapes"], ["na", "dilated", "full"]
    assert parse_seeds(["6", "shapes=3"], tasks, mixers) == {"pathfinder": 6, "shapes": 3}
    assert parse_seeds(["1"], tasks, mixers) == {"pathfinder": 1, "shapes": 1}
    with pytest.raises(
        study.UsageError, match=r"^--seeds pathfinder=x: give N, TASK=N or TASK/MIXER=N with an"
    ):
        parse_seeds(["pathfinder=x"], tasks, mixers)
    with pytest.raises(study.UsageError, match=r"^--seeds imagenet=6: 'imagenet' is not among --tasks"):
        parse_seeds(["imagenet=6"], tasks, mixers)
    with pytest.raises(
        study.UsageError, match=r"^--seeds shapes/window=4: 'window' is not among the study's"
    ):
        parse_seeds(["shapes/window=4"], tasks, mixers)
    seeds = parse_seeds(["pathfinder=6", "shapes=3", "pathfinder/dilated=18", "shapes/na=2"], tasks, mixers)
    plan = accuracy.accuracy_plan(mixers, {t: [] for t in tasks}, seeds, 4)
    count = {(t, m): sum(1 for p in plan if p[:2] == (t, m)) for t in tasks for m in mixers}
    assert count == {
        ("pathfinder", "na"): 6,
        ("pathfinder", "dilated"): 18,
        ("pathfinder", "full"): 6,
        ("shapes", "na"): 2,
        ("shapes", "dilated"): 3,
        ("shapes", "full"): 4,
    }
    assert [s for t, m, s in plan if (t, m) == ("pathfinder", "dilated")] == list(range(18))
    assert plan[0][0] == "pathfinder"  # the heavier task first


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
def test_bigbird_window_covers_na_extent(kernel_size):
    """BigBird with `window_options` (random blocks and global token off): the keys a centre query of a
    16x16 map reads cover NA's kernel_size^2 window around it, in the smallest 3 x 3-block square
    that does (3b >= k): at most (k + 2)^2 keys, where the default 7 x 7 blocks read all 256."""
    import torch

    from models.mixers import build_mixer

    options = {**study.window_options("bigbird", kernel_size), "num_random": 0, "num_global": 0}
    torch.manual_seed(0)
    mixer = build_mixer("bigbird", 8, 1, kernel_size=kernel_size, options=options)
    x = torch.randn(1, 16, 16, 8, requires_grad=True)
    mixer(x)[0, 7, 7].sum().backward()
    reach = x.grad.abs().sum(-1)[0] > 0
    r = kernel_size // 2
    assert reach[7 - r : 8 + r, 7 - r : 8 + r].all()
    block = options["block_size"]
    assert reach.sum() == (3 * block) ** 2 and 3 * block - kernel_size < 3


def test_a_stopped_runs_folder_is_not_taken_for_a_finished_run(tmp_path):
    """train.py writes summary.csv and last.pth.tar after every epoch: a run counts as finished only
    with as many summary rows as its config's epochs."""
    (tmp_path / "config.yaml").write_text("sched: {epochs: 2}\n")
    (tmp_path / "last.pth.tar").write_bytes(b"")
    (tmp_path / "summary.csv").write_text("epoch,eval_top1\n0,50.0\n")
    assert not accuracy.is_finished(tmp_path)
    (tmp_path / "summary.csv").write_text("epoch,eval_top1\n0,50.0\n1,61.0\n")
    assert accuracy.is_finished(tmp_path)
    (tmp_path / "last.pth.tar").unlink()
    assert not accuracy.is_finished(tmp_path)


def test_the_swin_row_alternates_plain_and_shifted_windows_and_reads_the_whole_image():
    """Swin alternates W-MSA and SW-MSA blocks; shifted windows in every block (the row before session
    24) reach only part of the image. The row's config, built as train.py builds it: every stage
    alternates, at NA's window, and the last stage's centre token reads every input pixel."""
    import timm
    import torch

    import models  # noqa: F401  (registers the family)
    from models.mixers import MIXERS

    cfg = study.task_config("pathfinder", accuracy.run_overrides("pathfinder", "shifted_window", 0, []))
    model = timm.create_model(cfg["model"]["name"], num_classes=2, **cfg["model"]["kwargs"]).eval()
    kinds = [[type(b.attn) for b in stage.blocks] for stage in model.stages]
    assert kinds == [[MIXERS["window"], MIXERS["shifted_window"]]] * 2
    assert [stage.blocks[1].attn.window_size for stage in model.stages] == [5, 3]  # NA's kernel sizes
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    features = model.forward_features(x)  # (1, 8, 8, C), LayerNorm'd: a plain channel sum is constant
    (features[0, 4, 4] * torch.randn(features.shape[-1])).sum().backward()
    assert (x.grad.abs().sum(1)[0] > 0).float().mean() == 1.0


@pytest.mark.parametrize(
    "answer, expected", [("right", 100.0), ("inverted", 0.0), ("always connected", 50.0)]
)
def test_near_pair_top1_scores_against_the_rendered_label_in_the_runs_class_order(
    tmp_path, monkeypatch, answer, expected
):
    """The near-pair score renders fresh near-pair images (near=True, seeds apart from train and
    val) and counts the model's answers against each image's label in the run's classes.txt order.
    The rendering is replaced by images that carry their label in their brightness, so a model that
    reads it is an oracle: it scores 100, its inverse 0, a constant answer 50."""
    import numpy as np
    import torch

    import data.pathfinder

    near_flags, seeds = [], []

    def labelled_image(connected, size, rng, *style, near):
        near_flags.append(near)
        seeds.append(int(rng.integers(1 << 30)))
        return np.full((size, size, 3), 255 if connected else 0, np.uint8)

    class Reader(torch.nn.Module):  # classes.txt below lists "disconnected" first
        def forward(self, x):
            bright = (x.mean((1, 2, 3)) > 0).float()
            connected = {"right": bright, "inverted": 1 - bright, "always connected": torch.ones_like(bright)}
            return torch.stack([1 - connected[answer], connected[answer]], 1)

    opts = dict(seed=3, image_size=8, num_curves=2, colour_curves=True, min_dot_distance=4, palette=None)
    cfg = {"data": {"mean": [0.5] * 3, "std": [0.25] * 3, "pathfinder": dict(opts, dot_radius=1)}}
    (tmp_path / "classes.txt").write_text("disconnected\nconnected\n")
    monkeypatch.setattr(data.pathfinder, "render_pathfinder", labelled_image)
    monkeypatch.setattr(accuracy, "trained_model", lambda run_dir: (Reader(), cfg))
    assert accuracy.near_pair_top1(tmp_path, per_class=6) == expected
    assert near_flags == [True] * 12 and len(set(seeds)) == 12  # a fresh image each, all near pairs


def test_scaling_table_says_where_a_slope_left_sizes_out_and_a_missing_linear_mixer_misses_its_target():
    """A mixer not timed at every size (dropped as too slow, or failed) has its slope fitted on the sizes
    it has: the table names them. A linear-cost mixer not timed at the largest size, where full was,
    has not met '>= 4x faster than full' (it was n/a)."""
    from engine.zoo import scaling

    def row(mixer, side, ms):
        return dict(mixer=mixer, side=side, tokens=side * side, s_median=ms / 1e3, peak_mb=1.0)

    rows = [row("full", s, 0.01 * s**2) for s in (16, 32, 64, 128)]
    rows += [row("na", s, 0.1 * s) for s in (16, 32, 64, 128)]
    rows += [row("performer", s, 0.1 * s) for s in (16, 32, 64)]  # not timed at 128
    slopes = {"full": 2.0, "na": 1.0, "performer": 1.0}
    result = dict(rows=rows, slopes=slopes, dropped={"performer": "too slow"}, errors={})
    result.update(settings=dict(sides=[16, 32, 64, 128], slope_from=32))
    result["slope_sides"] = {"full": [32, 64, 128], "na": [32, 64, 128], "performer": [32, 64]}
    table = scaling.scaling_markdown(result)
    assert "| 1.00 (32², 64²) |" in table and "| 1.00 |" in table  # na: the whole range, unmarked
    targets = {t["target"]: t["met"] for t in scaling.scaling_targets(result)}
    assert targets["performer: >= 4x faster than full at 128^2"] is False
