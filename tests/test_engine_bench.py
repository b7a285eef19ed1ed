"""engine/bench.py, the benchmark harness: round order, error handling, statistics against
hand-computed values, memory against a known allocation, and the result files read back."""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import bench  # noqa: E402


def recording_steps(names, log):
    return {name: (lambda name=name: log.append(name)) for name in names}


def test_interleaved_rounds_warm_up_then_rotate_the_order_each_round():
    log: list[str] = []
    times = bench.interleaved_rounds(recording_steps("abc", log), rounds=4, warmup=2)
    warm, timed = log[:6], log[6:]
    assert warm == ["a", "a", "b", "b", "c", "c"]
    assert timed == list("abcbcacababc")  # round r starts at step r mod 3
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in times.values() for t in v)


def test_interleaved_rounds_times_iters_calls_per_entry():
    log: list[str] = []
    nap = lambda: (log.append("x"), time.sleep(0.005))
    times = bench.interleaved_rounds({"nap": nap}, rounds=2, warmup=0, iters=3)
    assert len(log) == 6
    assert all(t >= 3 * 0.005 for t in times["nap"])


def test_interleaved_rounds_drops_a_failing_step_only_when_asked():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:  # warm-up, round 0, then fails in round 1
            raise RuntimeError("boom")

    steps = {"ok": lambda: None, "flaky": flaky}
    errors: dict[str, BaseException] = {}
    times = bench.interleaved_rounds(steps, rounds=3, warmup=1, errors=errors)
    assert list(times) == ["ok"] and len(times["ok"]) == 3
    assert isinstance(errors["flaky"], RuntimeError)
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="boom"):
        bench.interleaved_rounds(steps, rounds=3, warmup=1)


def test_spread_ratios_and_slope_against_hand_computed_values():
    assert bench.spread([5.0, 1.0, 3.0, 2.0, 4.0]) == dict(median=3.0, q1=2.0, q3=4.0, min=1.0, max=5.0)
    assert bench.spread([1.0, 2.0, 9.0]) == dict(median=2.0, q1=1.0, q3=9.0, min=1.0, max=9.0)
    assert bench.round_ratios([2.0, 3.0, 4.0], [1.0, 0.0, 8.0]) == [2.0, 0.5]  # round 1: no reference
    xs = [1.0, 10.0, 100.0]
    assert bench.loglog_slope(xs, [7 * x**1.5 for x in xs]) == pytest.approx(1.5)
    assert bench.loglog_slope([3.0, 3.0], [1.0, 2.0]) is None


def test_loglog_slope_recovers_powers():
    xs = [224**2, 320**2, 448**2, 1024**2]
    assert bench.loglog_slope(xs, [3.0 * x for x in xs]) == pytest.approx(1.0)
    assert bench.loglog_slope(xs, [0.5 * x**2 for x in xs]) == pytest.approx(2.0)
    assert bench.loglog_slope(xs, [x + x**2 / 1e5 for x in xs]) == pytest.approx(
        statistics.linear_regression([math.log(x) for x in xs], [math.log(x + x**2 / 1e5) for x in xs]).slope
    )
    assert bench.loglog_slope([5.0], [1.0]) is None


def test_spread_matches_statistics():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    s = bench.spread(values)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"]) == (3.0, 1.0, 5.0, q1, q3)
    assert bench.spread([2.0, 4.0]) == dict(median=3.0, q1=2.0, q3=4.0, min=2.0, max=4.0)


def test_cpu_peak_memory_sees_a_known_allocation():
    mib = 64
    step = lambda: torch.ones(mib * 2**20 // 4).sum()  # 64 MiB of float32, touched
    measured = bench.peak_memory_mb(step, torch.device("cpu"))
    assert mib * 0.9 <= measured <= mib * 2, measured
    assert bench.memory_kind("cpu") == "cpu_rss_delta"


def test_result_files_read_back(tmp_path):
    rows = [dict(model="a", img_s=1.5), dict(model="b", error="OOM")]
    bench.write_csv(rows, tmp_path / "all.csv")
    with (tmp_path / "all.csv").open() as f:
        assert list(csv.DictReader(f)) == [
            {"model": "a", "img_s": "1.5", "error": ""},
            {"model": "b", "img_s": "", "error": "OOM"},
        ]
    bench.write_csv(rows, tmp_path / "some.csv", fields=["model"])
    assert (tmp_path / "some.csv").read_text().split() == ["model", "a", "b"]
    bench.write_json(dict(path=tmp_path, env=bench.environment()), tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["path"] == str(tmp_path) and loaded["env"]["torch"] == torch.__version__
    table = bench.markdown_table(["model", "img/s"], [["a", "1.50"]], "lr")
    assert table == ["| model | img/s |", "|---|---:|", "| a | 1.50 |"]


def test_plot_panels_draws_every_series_in_every_panel(tmp_path):
    """Each series is drawn in its tab10 colour (blue, orange) in both panels: the image's left and
    right halves each hold both colours."""
    from PIL import Image

    series = {"lin": [(1, 1.0), (10, 10.0)], "quad": [(1, 1.0), (10, 100.0)]}
    path = bench.plot_panels([[("p", series), ("q", series)]], tmp_path / "p.png", "x", "y", True, "x")
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    half = rgb.size[0] // 2
    for box in ((0, 0, half, rgb.size[1]), (half, 0, rgb.size[0], rgb.size[1])):
        pixels = list(rgb.crop(box).getdata())
        for colour in ((31, 119, 180), (255, 127, 14)):  # tab10's first two
            near = [p for p in pixels if max(abs(a - b) for a, b in zip(p, colour, strict=True)) < 16]
            assert len(near) > 50, (box, colour)


def test_plot_panels_grouped_legend_goes_outside_the_panels(tmp_path):
    """Same panels: the grouped legend widens the image (it sits to the right of the panels, over no
    data) and a label's own style is drawn (a pure red line: tab10 has no pure red)."""
    from PIL import Image

    series = {f"s{i}": [(1, 1.0 + i), (10, 10.0 + i)] for i in range(12)}
    panels = [[("p", series), ("q", series)]]
    inside = bench.plot_panels(panels, tmp_path / "inside.png", "x", "y", True, "x")
    outside = bench.plot_panels(
        panels,
        tmp_path / "outside.png",
        "x",
        "y",
        True,
        "x",
        styles={"s0": dict(color=(1.0, 0.0, 0.0), marker="s", lw=3)},
        legend_groups={"first": ["s0", "s1"], "rest": [f"s{i}" for i in range(2, 12)]},
    )
    with Image.open(inside) as a, Image.open(outside) as b:
        assert b.size[0] > a.size[0] + 50
        red = sum(1 for r, g, bl, *_ in b.convert("RGB").getdata() if r > 240 and g < 20 and bl < 20)
        assert red > 100
        red_inside = sum(1 for r, g, bl, *_ in a.convert("RGB").getdata() if r > 240 and g < 20 and bl < 20)
        assert red_inside == 0


def test_script_arguments_fail_up_front_with_one_line(tmp_path):
    """Counts below 1 (a ZeroDivisionError or IndexError mid-run before) and an --out that can't be
    written (found after the whole measurement before) are refused before any work."""
    import argparse

    for bad in ("0", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.positive_int(bad)
    assert bench.positive_int("3") == 3
    (tmp_path / "file").write_text("")
    assert "give --out somewhere writable" in bench.writable_folder(tmp_path / "file" / "out")
    assert bench.writable_folder(tmp_path / "new" / "out") is None and (tmp_path / "new" / "out").is_dir()
    from engine import bench_na

    args = argparse.Namespace(
        methods=["cpp", "foo"],
        kernel_size=7,
        sizes=[14],
        modes=["fwd"],
        dtype=["float32"],
        tiles=[],
        warmup=1,
    )
    assert bench_na.argument_error(args).startswith("unknown method 'foo'")
    # a tile label is a method only with its --tiles (it crashed later); tiles and warm-up in range
    for methods, tiles, warmup, error in (
        (["cpp", "torch:tile4"], [], 1, "unknown method 'torch:tile4'"),
        (["cpp", "cpp:bfloat16"], [], 1, "unknown method 'cpp:bfloat16'"),
        (["cpp"], [0], 1, "--tiles must be >= 1"),
        (["cpp"], [4], -1, "--warmup >= 0"),
    ):
        bad = argparse.Namespace(**dict(vars(args), methods=methods, tiles=tiles, warmup=warmup))
        assert error in bench_na.argument_error(bad), (methods, tiles, warmup)
