"""scripts/gpu_check.py --dry-run (engine/gpu_check.py): the GPU check's sections run end to end on
the CPU (tiny shapes, Triton interpreted) and their verdicts are real: the self-checks, every
backend's errors against the float64 reference, losses that fall, the backend that ran. No timing
assertions. And `make setup`'s natten install, which must not start a CUDA build unless asked."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not importable: gpu_check checks the 'triton' backend")

from engine import gpu_check  # noqa: E402
from models.layers.backends.triton_na import triton_interpreting  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_sections_check_backends_and_train(tmp_path):
    if not triton_interpreting():  # a GPU machine: this process has Triton compiled
        pytest.skip("the dry run's CPU Triton needs TRITON_INTERPRET=1 from the start (the slow test)")
    status = load_script().main(
        ["--dry-run", "--out", str(tmp_path), "--sections", "self_check", "operator", "train"]
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 0 and report["failed"] == [], report["failed"]
    checks = {(r["backend"], r["dtype"], r["dilation"]): r for r in report["sections"]["self_check"]}
    assert checks[("triton", "bfloat16", 1)]["outcome"] == "passed"
    assert "no backward on CPU" in checks[("natten", "float32", 1)]["outcome"]
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
    assert all(r["losses"][-1] < r["losses"][0] and r["infer_img_s"] > 0 for r in train.values())
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## operator" in markdown and "| triton | bfloat16 | True |" in markdown
    assert "| triton | bfloat16 | 3 | 1 | 16 | True | passed |" in markdown


def test_a_wrong_gradient_fails_the_check(tmp_path, monkeypatch):
    """The verdict is computed, not assumed: a backend whose dq is off fails the run (exit 1)."""
    monkeypatch.setattr(gpu_check, "OPERATOR_CASES", {"cpu": [(7, 7, 3, 1)]})
    torch_backend = gpu_check.functional._IMPLEMENTATIONS["torch"]

    def wrong(q, *args):
        return torch_backend(q * 1.01, *args)

    monkeypatch.setitem(gpu_check.functional._IMPLEMENTATIONS, "torch", wrong)
    monkeypatch.setattr(gpu_check, "BACKENDS", ("torch",))
    status = gpu_check.run(tmp_path, dry_run=True, sections=["operator"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 1 and report["failed"] == ["operator"]
    assert any(r["status"] == "FAILED" for r in report["sections"]["operator"])


def test_tile_sweep_times_each_tile_and_fails_one_whose_output_differs(tmp_path, monkeypatch):
    if not triton_interpreting():
        pytest.skip("the dry run's CPU Triton needs TRITON_INTERPRET=1 from the start (the slow test)")
    assert gpu_check.run(tmp_path, dry_run=True, sections=["tiles"]) == 0
    (row,) = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["tiles"]
    assert set(row["ms"]) == {"8x8", "4x4"} and row["rel_diff"]["4x4"] < 1e-2  # bf16, other order only
    real = gpu_check.na2d_triton

    def off_at_small_tiles(*args, tile, **kwargs):
        out = real(*args, tile=tile, **kwargs)
        return out if tile == gpu_check.DEFAULT_TILE else out * 1.05

    monkeypatch.setattr(gpu_check, "na2d_triton", off_at_small_tiles)
    assert gpu_check.run(tmp_path, dry_run=True, sections=["tiles"]) == 1
    (row,) = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["tiles"]
    assert row["status"] == "FAILED" and row["error"].startswith("4x4: output differs")


def test_a_crashing_model_is_its_rows_verdict_and_the_others_still_train(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "TRAIN_MODELS", ["convnext_tiny", "no_such_model_xyz"])
    status = gpu_check.run(tmp_path, dry_run=True, sections=["train"])
    rows = {r["model"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["train"]}
    assert status == 1 and rows["convnext_tiny"]["status"] == "ok"
    assert (
        rows["no_such_model_xyz"]["status"] == "FAILED"
        and "no_such_model_xyz" in rows["no_such_model_xyz"]["error"]
    )
    assert "FAILED: " in (tmp_path / "gpu_check.md").read_text()


def test_a_run_stopped_mid_way_leaves_the_finished_sections_and_names_the_rest(tmp_path, monkeypatch):
    """On a lent GPU a command limit can stop the check: what finished is already on disk."""
    monkeypatch.setattr(gpu_check, "TRAIN_MODELS", ["convnext_tiny"])

    def stopped(plan):
        raise KeyboardInterrupt  # what a kill looks like from inside: nothing after it runs

    monkeypatch.setattr(gpu_check, "time_operator", stopped)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.run(tmp_path, dry_run=True, sections=["train", "na_timing", "sweep"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["sections"]) == ["train"] and report["sections"]["train"][0]["status"] == "ok"
    assert report["not_run"] == ["na_timing", "sweep"]
    assert "Not run (yet): na_timing, sweep." in (tmp_path / "gpu_check.md").read_text()


def test_no_section_starts_after_the_budget_and_the_run_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "TRAIN_MODELS", ["convnext_tiny"])
    status = gpu_check.run(tmp_path, dry_run=True, sections=["train", "na_timing"], budget=0)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 1 and report["sections"] == {} and report["not_run"] == ["train", "na_timing"]


def test_a_sweep_cut_by_its_deadline_is_a_failed_section_that_keeps_its_output(tmp_path):
    """The sweep stops by --deadline (a lent machine's command limit must not cut the report), with
    the lines it printed kept; a crashed sweep model fails the check, an OOM is a measurement."""
    assert gpu_check.run(tmp_path, dry_run=True, sections=["sweep"], deadline=3) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sweep = report["sections"]["sweep"]
    assert (
        report["failed"] == ["sweep"] and sweep["error"].startswith("timed out after") and "output" in sweep
    )
    rows = [dict(model="a", error=""), dict(model="b", error="OOM")]
    assert not gpu_check.section_failed("sweep", dict(rows=rows))
    assert gpu_check.section_failed("sweep", dict(rows=[*rows, dict(model="c", error="RuntimeError: x")]))


def test_natten_without_its_cuda_library_is_not_checked_or_timed_as_natten():
    """Without libnatten its CUDA path is uncompiled FlexAttention: a check or timing under natten's
    name would be of that fallback (full score matrices)."""
    from models.layers.backends.checks import CallInfo
    from models.layers.backends.natten_na import natten_has_cuda_kernels, natten_version

    if natten_version() is None or natten_has_cuda_kernels():
        pytest.skip("needs natten installed without its CUDA library (this repo's CPU setup)")
    call = CallInfo("cuda", torch.bfloat16, False, 0.0, True)
    assert gpu_check.why_not("natten", call) is None  # the dispatcher's own check lets it through
    assert "no CUDA kernels" in gpu_check.why_not_here("natten", call)


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
    assert set(report["sections"]) == set(gpu_check.DEFAULT_SECTIONS)
    sweep = report["sections"]["sweep"]
    assert {r["model"] for r in sweep["rows"]} == {"nat_mini", "convnext_tiny"}
    assert all(r["img_s_median"] > 0 for r in sweep["rows"])
    assert (tmp_path / "benchmark" / "results.json").exists()
    timing = report["sections"]["na_timing"][0]
    assert timing["ms"]["triton+rpb"] > 0 and "natten" in timing["skipped"]


def test_without_a_gpu_and_without_dry_run_it_says_so(tmp_path, capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert load_script().main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: no CUDA GPU")


def _natten_install(*make_args: str) -> str:
    """The natten install line `make setup` would run (make -n: printed, not run)."""
    proc = subprocess.run(
        ["make", "-n", "-B", "setup", *make_args], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if "pip install" in line and "natten" in line]
    return line


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_setup_installs_natten_without_a_cuda_build_unless_asked():
    """natten's setup.py builds libnatten when NATTEN_CUDA_ARCH is set or torch sees a GPU: the
    default install hides both; NATTEN_CUDA=1 shows the GPU and rebuilds past pip's wheel cache."""
    default = _natten_install()
    assert default.startswith("CUDA_VISIBLE_DEVICES= NATTEN_CUDA_ARCH= ")
    assert "--no-build-isolation" in default and "natten==0.21.7" in default
    asked = _natten_install("NATTEN_CUDA=1")
    assert "CUDA_VISIBLE_DEVICES" not in asked and "NATTEN_CUDA_ARCH" not in asked
    assert "--no-cache-dir" in asked and "--force-reinstall" in asked
