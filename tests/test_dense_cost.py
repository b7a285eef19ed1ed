"""The high-resolution cost study (engine/dense_cost.py, scripts/dense_cost.py): rows, slopes, tables,
the plot and the command line's errors. Timings are measured for real at tiny sizes; the slope and
table logic is checked on hand-made rows whose answers are known."""

import json

import pytest
import torch
from test_train import load_entry_point

from engine import dense_cost


def _row(name, side, seconds, peak, fpn=None):
    row = dict(backbone=name, height=side, width=side, pixels=side * side, median_s=seconds, min_s=seconds)
    row["cpu_s"] = seconds
    row.update(peak_mb=peak, ratio=1.0, reference="A")
    if fpn is not None:
        row["fpn_s"] = fpn
    return row


def test_slopes_of_linear_and_quadratic_costs():
    rows = []
    for side in (224, 512, 768, 1024):
        px = side * side
        rows.append(_row("A", side, 1e-6 * px, 1e-4 * px, fpn=1e-7 * px))  # linear in pixels
        rows.append(_row("B", side, 1e-12 * px**2, 3.0))  # quadratic time, constant memory
    rows.append(dict(_row("A", 0, 1.0, 1.0), height=800, width=1216, pixels=800 * 1216))  # not a square
    slope = dense_cost.slopes(rows)
    assert slope["A"]["time"] == pytest.approx(1.0) and slope["A"]["time_with_fpn"] == pytest.approx(1.0)
    assert slope["A"]["sizes"] == ["512^2", "768^2", "1024^2"]  # 224^2 and 800x1216 outside the range
    assert slope["B"]["time"] == pytest.approx(2.0) and slope["B"]["time_min"] == pytest.approx(2.0)
    assert slope["B"]["cpu"] == pytest.approx(2.0)
    assert slope["B"]["memory"] == pytest.approx(0.0, abs=1e-12) and slope["B"]["time_with_fpn"] is None
    table = dense_cost.markdown(rows, slope, "a CPU")
    assert "| A | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 512^2, 768^2, 1024^2 |" in table
    assert "| backbone | 224^2 | 512^2 | 768^2 | 1024^2 | 800x1216 |" in table


def test_measure_and_write_outputs(tmp_path):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    rows = dense_cost.measure(
        ["NAT-T", "ViT-S"], [(64, 64), (48, 80)], rounds=1, large_rounds=1, warmup=0, log=str
    )
    assert [(r["backbone"], r["height"], r["width"]) for r in rows] == [
        ("NAT-T", 64, 64),
        ("ViT-S", 64, 64),
        ("NAT-T", 48, 80),
        ("ViT-S", 48, 80),
    ]
    for r in rows:
        assert r["median_s"] > 0 and r["min_s"] <= r["median_s"] and r["peak_mb"] >= 0
        assert 0 < r["cpu_s"] <= 1.5 * r["median_s"]  # one thread: CPU time can't much exceed wall time
        assert r["reference"] == "NAT-T"
    assert torch.get_num_threads() == threads  # measured on one thread, the caller's setting restored
    assert all(r["ratio"] == 1.0 for r in rows if r["backbone"] == "NAT-T")
    for nat, vit in (rows[:2], rows[2:]):  # one round: the ratio is the two times' quotient, ViT-S / NAT-T
        assert vit["ratio"] == pytest.approx(vit["median_s"] / nat["median_s"], rel=1e-6)
        assert 0 < nat["fpn_s"] < nat["median_s"]  # the neck alone, timed apart: a fraction of the backbone
    assert all(("fpn_s" in r) == (r["backbone"] == "NAT-T") for r in rows)  # ViT-S: single scale, no neck
    dense_cost.write_outputs(rows, tmp_path)
    saved = json.loads((tmp_path / "dense_cost.json").read_text())
    assert len(saved["rows"]) == 4 and set(saved["slopes"]) == {"NAT-T", "ViT-S"}
    assert (tmp_path / "dense-cost.png").stat().st_size > 0
    assert "| NAT-T |" in (tmp_path / "dense_cost.md").read_text()
    # where the table's reference failed, a size's ratios are against the first backbone that ran there
    failed = dict(rows[2], error="out of memory")
    vit = dict(rows[3], reference="ViT-S", ratio=1.0)
    table = dense_cost.markdown([*rows[:2], failed, vit], {}, "cpu")
    ratios = table.split("time / NAT-T's")[1].split("\n\n")[1]
    assert "| ViT-S |" in ratios and "1.00 (/ ViT-S)" in ratios and f"{rows[1]['ratio']:.2f} |" in ratios


def test_bad_size_or_name_is_one_clear_error(capsys):
    with pytest.raises(ValueError, match=r"size '12x' must be a positive integer \(a square\) or HxW"):
        dense_cost.parse_size("12x")
    assert dense_cost.parse_size("800x1216") == (800, 1216) and dense_cost.parse_size("512") == (512, 512)
    script = load_entry_point("scripts/dense_cost.py")
    assert script.main(["--models", "NAT-T", "Swim-T"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown backbone(s) ['Swim-T']: choose from ['NAT-T'")
    assert script.main(["--sizes", "512", "0x3"]) == 2
    assert capsys.readouterr().err.startswith("error: size '0x3' must be a positive integer")


def test_a_failed_backbone_is_written_and_exits_1(tmp_path, monkeypatch, capsys):
    rows = [_row("NAT-T", 64, 0.1, 1.0), dict(backbone="ViT-S", height=64, width=64, error="out of memory")]
    monkeypatch.setattr(dense_cost, "measure", lambda *args: rows)
    script = load_entry_point("scripts/dense_cost.py")
    assert script.main(["--models", "NAT-T", "ViT-S", "--sizes", "64", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 1 of 2 measurements failed (ViT-S at 64x64: out of memory)")
    assert len(json.loads((tmp_path / "dense_cost.json").read_text())["rows"]) == 2
