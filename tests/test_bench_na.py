"""scripts/bench_na.py end to end in quick mode (no timing assertions: speed lives in the benchmark)."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_na_quick_writes_table_csv_and_plot(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts/bench_na.py"), "--quick", "--out", str(tmp_path)]
    cmd += ["--methods", "cpp", "torch", "naive", "window", "dense", "natten", "--tiles", "7"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "time / cpp time" in result.stdout
    assert "skipped (natten has no backward on CPU" in result.stdout
    rows = list(csv.DictReader(open(tmp_path / "bench_na.csv")))
    methods = {r["method"] for r in rows}
    assert {"cpp", "torch", "naive", "window", "dense", "natten", "torch:tile7"} <= methods
    assert all(float(r["median_s"]) > 0 for r in rows)
    assert (tmp_path / "bench_na.png").stat().st_size > 1000


def test_bench_na_dtypes_time_each_method_at_each_dtype(tmp_path):
    """`--dtype float32 bfloat16`: bf16 rows labelled `cpp:bfloat16`, ratios against fp32 `cpp`."""
    cmd = [sys.executable, str(ROOT / "scripts/bench_na.py"), "--quick", "--out", str(tmp_path)]
    cmd += [
        "--methods",
        "cpp",
        "window",
        "--dtype",
        "float32",
        "bfloat16",
        "--modes",
        "fwd+bwd",
        "--qkv-views",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "dtype float32 bfloat16, q/k/v views of one qkv tensor" in result.stdout
    rows = list(csv.DictReader(open(tmp_path / "bench_na.csv")))
    assert {r["method"] for r in rows} == {"cpp", "window", "cpp:bfloat16", "window:bfloat16"}
    header = result.stdout.split("time / cpp time")[1].splitlines()[1].split()
    assert header == ["size", "cpp", "window", "cpp:bfloat16", "window:bfloat16"]
