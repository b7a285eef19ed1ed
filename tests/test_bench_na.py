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
