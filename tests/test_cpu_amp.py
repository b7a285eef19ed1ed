"""`--amp` on CPU: bfloat16 autocast in train.py and eval.py, and the precision recorded.

The entry points run in-process (load_entry_point): a subprocess each would spend most of these
tests' time importing torch and timm."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from test_train import load_entry_point, write_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One epoch of the tiny recipe twice: as configured (float32 on CPU) and with --amp."""
    work = tmp_path_factory.mktemp("cpu_amp")
    # deterministic off: in-process, torch.use_deterministic_algorithms would outlive the run
    cfg = write_config(
        work / "tiny.yaml",
        work / "data",
        sched={"epochs": 1, "warmup_epochs": 0},
        train={"deterministic": False},
    )
    train = load_entry_point("train.py").main
    for name, flags in (("fp32", []), ("bf16", ["--amp"])):
        assert train(["-c", str(cfg), "--output", str(work / "runs"), "--experiment", name, *flags]) == 0
    return work, cfg


def _losses(run_dir) -> list[float]:
    rows = csv.DictReader((run_dir / "summary.csv").open())
    return [float(r[key]) for r in rows for key in ("train_loss", "eval_loss")]


def test_amp_on_cpu_trains_in_bfloat16_and_says_so(runs):
    work, _ = runs
    fp32, bf16 = work / "runs" / "fp32", work / "runs" / "bf16"
    assert "precision: float32 on cpu" in (fp32 / "train.log").read_text()
    assert "precision: bfloat16 autocast on cpu" in (bf16 / "train.log").read_text()
    assert yaml.safe_load((bf16 / "config.yaml").read_text())["train"]["amp"] is True
    assert yaml.safe_load((fp32 / "config.yaml").read_text())["train"]["amp"] is None
    # Same seed, data and steps: bf16 rounding must move the losses (they were bit-identical when
    # --amp was ignored on CPU), but not far.
    a, b = _losses(fp32), _losses(bf16)
    assert a != b
    assert all(abs(x - y) < 0.05 * abs(x) for x, y in zip(a, b, strict=True)), (a, b)
    weights = torch.load(bf16 / "last.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}


def test_eval_amp_on_cpu_records_bfloat16(runs):
    work, _ = runs
    evaluate = load_entry_point("eval.py").main
    out = {}
    for name, flags in (("fp32", []), ("bf16", ["--amp"])):
        assert (
            evaluate([str(work / "runs" / "fp32" / "last.pth.tar"), "-o", str(work / f"{name}.json"), *flags])
            == 0
        )
        out[name] = json.loads((work / f"{name}.json").read_text())
    assert (out["fp32"]["precision"], out["bf16"]["precision"]) == ("float32", "bfloat16 autocast")
    assert out["fp32"]["loss"] != out["bf16"]["loss"]
    assert abs(out["fp32"]["loss"] - out["bf16"]["loss"]) < 0.05 * out["fp32"]["loss"]


def test_float16_amp_on_cpu_is_one_error_line(runs, capsys):
    work, cfg = runs
    train = load_entry_point("train.py").main
    assert train(["-c", str(cfg), "--output", str(work / "runs"), "--amp", "--amp-dtype", "float16"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "float16 autocast runs on GPUs only" in lines[0], lines
