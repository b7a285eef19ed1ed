"""scripts/gpu_check.py --dry-run: the GPU check's sections run end to end on the CPU (tiny shapes,
Triton interpreted) and their verdicts are real: every backend's errors against the float64
reference, losses that fall, the backend that ran. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not importable: gpu_check checks the 'triton' backend")

from models.layers.backends.triton_na import triton_interpreting  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_sections_check_backends_and_train(tmp_path):
    gpu_check = load_script()
    if not triton_interpreting():  # a GPU machine: this process has Triton compiled
        pytest.skip("the dry run's CPU Triton needs TRITON_INTERPRET=1 from the start (the slow test)")
    status = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--sections", "operator", "train"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 0 and report["failed"] == [], report["failed"]
    rows = report["sections"]["operator"]
    checked = {(r["backend"], r["dtype"], r["rpb"]) for r in rows if r["status"] == "ok"}
    # the fused kernel, forward and every gradient, in both dtypes, with and without RPB
    for dtype in ("float32", "bfloat16"):
        for rpb in (True, False):
            assert ("triton", dtype, rpb) in checked
    triton_fp32 = next(r for r in rows if (r["backend"], r["dtype"], r["rpb"]) == ("triton", "float32", True))
    assert triton_fp32["checked"] == "forward+backward" and set(triton_fp32["errors"]) == {
        "out",
        "dq",
        "dk",
        "dv",
        "drpb",
    }
    assert max(triton_fp32["errors"].values()) < 1e-4
    # what can't run says why: natten has no RPB
    natten = next(r for r in rows if (r["backend"], r["rpb"]) == ("natten", True))
    assert natten["status"] == "skipped" and "relative position bias" in natten["reason"]
    train = {r["model"]: r for r in report["sections"]["train"]}
    assert set(train) == set(gpu_check.TRAIN_MODELS)
    assert train["nat_tiny"]["na_backend"] != "-" and train["convnext_tiny"]["na_backend"] == "-"
    assert all(r["losses"][-1] < r["losses"][0] for r in train.values())
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## operator" in markdown and "| triton | bfloat16 | True |" in markdown


def test_a_wrong_gradient_fails_the_check(tmp_path, monkeypatch):
    """The verdict is computed, not assumed: a backend whose dq is off fails the run (exit 1)."""
    gpu_check = load_script()
    monkeypatch.setattr(gpu_check, "OPERATOR_CASES", {"cpu": [(7, 7, 3, 1)]})
    torch_backend = gpu_check.functional._IMPLEMENTATIONS["torch"]

    def wrong(q, *args):
        return torch_backend(q * 1.01, *args)

    monkeypatch.setitem(gpu_check.functional._IMPLEMENTATIONS, "torch", wrong)
    monkeypatch.setattr(gpu_check, "BACKENDS", ("torch",))
    status = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--sections", "operator"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 1 and report["failed"] == ["operator"]
    assert any(r["status"] == "FAILED" for r in report["sections"]["operator"])


def test_a_crashing_model_is_its_rows_verdict_and_the_others_still_train(tmp_path, monkeypatch):
    gpu_check = load_script()
    monkeypatch.setattr(gpu_check, "TRAIN_MODELS", ["convnext_tiny", "no_such_model_xyz"])
    status = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--sections", "train"])
    rows = {r["model"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["train"]}
    assert status == 1 and rows["convnext_tiny"]["status"] == "ok"
    assert (
        rows["no_such_model_xyz"]["status"] == "FAILED"
        and "no_such_model_xyz" in rows["no_such_model_xyz"]["error"]
    )
    assert "FAILED: " in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
def test_dry_run_whole_script_with_benchmark_sweep(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["sections"]) == {"operator", "na_timing", "train", "sweep"}
    sweep = report["sections"]["sweep"]
    assert {r["model"] for r in sweep["rows"]} == {"nat_mini", "convnext_tiny"}
    assert all(r["img_s_median"] > 0 for r in sweep["rows"])
    assert (tmp_path / "benchmark" / "results.json").exists()
    timing = report["sections"]["na_timing"][0]
    assert timing["ms"]["triton+rpb"] > 0 and "natten" in timing["skipped"]


def test_without_a_gpu_and_without_dry_run_it_says_so(tmp_path, capsys):
    gpu_check = load_script()
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: no CUDA GPU")
