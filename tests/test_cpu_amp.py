"""`--amp` on CPU: bfloat16 autocast in train.py and eval.py, and the precision recorded.

The entry points run in-process (load_entry_point): a subprocess each would spend most of these
tests' time importing torch and timm."""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path

import pytest
import torch
import yaml
from test_train import load_entry_point, write_config

from engine.precision import NO_BF16_UNITS, cpu_bf16_units


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
    assert all(x != y for x, y in zip(a, b, strict=True)), (a, b)  # every epoch's train and val loss
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


def test_cpu_bf16_units_agree_with_cpuinfo():
    """engine.precision.cpu_bf16_units (ATen's checks) against the kernel's own flags in /proc/cpuinfo."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not cpuinfo.exists():
        pytest.skip("needs Linux on x86_64")
    flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()}
    units = cpu_bf16_units()
    assert (units != "none") == bool(flags & {"amx_bf16", "avx512_bf16"}), (units, sorted(flags))
    if units == "AMX-BF16":
        assert "amx_bf16" in flags


def test_amp_on_cpu_without_bf16_units_warns(runs, monkeypatch, capsys):
    """Where oneDNN would emulate bf16, --amp still runs but says to drop it, and the float32 log
    line stops suggesting it."""
    work, cfg = runs
    import engine.precision

    monkeypatch.setattr(engine.precision, "cpu_bf16_units", lambda: "none")
    train = load_entry_point("train.py").main
    for name, flags in (("fp32-emulated", []), ("bf16-emulated", ["--amp"])):
        assert train(["-c", str(cfg), "--output", str(work / "runs"), "--experiment", name, *flags]) == 0
    fp32_log = (work / "runs" / "fp32-emulated" / "train.log").read_text()
    bf16_log = (work / "runs" / "bf16-emulated" / "train.log").read_text()
    assert "precision: float32 on cpu (bf16 units: none)" in fp32_log and "--amp" not in fp32_log
    assert "precision: bfloat16 autocast on cpu (bf16 units: none)" in bf16_log
    assert f"warning: {NO_BF16_UNITS}; drop --amp" in bf16_log
    capsys.readouterr()
    evaluate = load_entry_point("eval.py").main
    checkpoint = str(work / "runs" / "fp32" / "last.pth.tar")
    assert evaluate([checkpoint, "-o", str(work / "emulated.json"), "--amp"]) == 0
    printed = capsys.readouterr()  # stderr in eval.py's own process; here where train.py set logging
    assert f"warning: {NO_BF16_UNITS}; drop --amp" in printed.err + printed.out
    assert json.loads((work / "emulated.json").read_text())["precision"] == "bfloat16 autocast"
