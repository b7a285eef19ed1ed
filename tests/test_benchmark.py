"""scripts/benchmark.py (engine/benchmark): --quick end to end (files, table, recorded NA backend),
and its arithmetic (batch scaling, target verdicts) against hand-computed values. No timing assertions."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import load_entry_point

from engine import benchmark
from engine.benchmark import measure, report

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark.py"


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    models = ["nat_mini", "nat_mini@naive", "swin_tiny_patch4_window7_224", "vit_small_patch16_224"]
    proc = run("--quick", "--devices", "cpu", "--models", *models, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout, models


def test_quick_writes_csv_json_and_plots(quick_run):
    out, _, models = quick_run
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    resolutions = benchmark.QUICK["resolutions"]
    assert len(rows) == len(models) * 2 * len(resolutions)  # every model x mode x resolution
    assert {r["model"] for r in rows} == set(models)
    assert all(r["error"] == "" for r in rows), [r["error"] for r in rows if r["error"]]
    import timm

    from models import count_flops

    for r in rows:
        assert float(r["img_s_min"]) <= float(r["img_s_median"]) <= float(r["img_s_max"])
        assert float(r["gmacs"]) > 0 and float(r["params_m"]) > 0
        assert r["mem_kind"] == "cpu_rss_delta" and r["device"] == "cpu"
    for r in rows:  # the MACs at the row's own resolution (count_flops: checked by hand in test_flops)
        if r["model"] == "nat_mini":
            res = int(r["resolution"])
            model = timm.create_model("nat_mini", **benchmark.QUICK_KWARGS["nat_mini"])
            assert float(r["gmacs"]) == pytest.approx(count_flops(model, (3, res, res)) / 1e9, rel=1e-6)
    result = json.loads((out / "results.json").read_text())
    for r in result["rows"]:  # each round's images per second is the batch over that round's step time
        step_ms = statistics.median(1e3 * r["batch"] / x for x in r["img_s_rounds"])
        assert r["ms_per_step_median"] == pytest.approx(step_ms, rel=1e-6), r["model"]
    env = result["environment"]
    assert env["torch"] == torch.__version__ and "natten" in env and env["cpu"]
    assert "load_average_before" in result and result["baseline"] == "swin_tiny_patch4_window7_224"
    assert len(result["rows"]) == len(rows)
    assert {s["model"] for s in result["scaling"]} == set(models)
    for name in ("throughput_vs_resolution.png", "memory_vs_resolution.png", "time_vs_tokens.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


def test_quick_records_the_na_backend_that_ran(quick_run):
    out, _, _ = quick_run
    with (out / "results.csv").open() as f:
        backends = {(r["model"], r["mode"]): r["na_backend"] for r in csv.DictReader(f)}
    from models.layers.backends.cpp_kernel import kernel_build_error

    auto_on_cpu = "cpp" if kernel_build_error() is None else "torch"
    assert backends[("nat_mini", "train")] == auto_on_cpu
    assert backends[("nat_mini@naive", "train")] == "naive"
    assert backends[("swin_tiny_patch4_window7_224", "infer")] == "-"


def test_quick_prints_the_ratio_table(quick_run):
    _, stdout, models = quick_run
    assert "ratios vs swin_tiny_patch4_window7_224" in stdout
    assert "infer img/s [min-max]" in stdout and "train img/s [min-max]" in stdout  # --quick: 2 repeats
    table = stdout[stdout.index("ratios vs") :]
    swin_line = next(line for line in table.splitlines() if line.startswith("swin_tiny"))
    assert swin_line.count(" 1.00 ") >= 2  # the baseline against itself
    assert "Scaling: slope" in stdout


def test_unknown_model_is_one_clear_error_before_any_work(tmp_path):
    proc = run("--quick", "--models", "not_a_model", "--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode != 0
    assert "'not_a_model' is not a timm model name" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "names, message",
    [(["nat_mini@fast"], "unknown NA backend 'fast'"), (["nat_mini", "nat_mini"], "listed twice")],
)
def test_bad_model_lists_are_one_clear_error(names, message):
    with pytest.raises(SystemExit, match=message):
        measure.parse_models(names, {})


def test_baseline_asked_for_must_run_and_the_default_falls_back_to_the_first_model(capsys):
    labels = ["nat_mini", "convnext_tiny"]
    assert benchmark.pick_baseline(None, labels) == "convnext_tiny"  # the second default baseline
    assert benchmark.pick_baseline(["swin_t", "nat_mini"], labels) == "nat_mini"
    assert benchmark.pick_baseline(None, ["nat_mini"]) == "nat_mini"
    assert "ratios are vs nat_mini" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"no --baselines model \(swin_t\) is among the models run"):
        benchmark.pick_baseline(["swin_t"], labels)


def test_a_failed_measurement_is_written_and_exits_1(tmp_path, capsys):
    """A model that fails (here: a keyword it doesn't take) loses its rows only; the run writes the
    others and then exits 1 with one line naming what failed, so a script running it sees it."""
    script = load_entry_point("scripts/benchmark.py")
    args = ["--quick", "--devices", "cpu", "--modes", "infer", "--no-plots", "--out", str(tmp_path)]
    args += [
        "--models",
        "nat_mini",
        "vit_small_patch16_224",
        "--model-kwargs",
        '{"nat_mini": {"no_such_kwarg": 1}}',
    ]
    assert script.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "error: 2 of 4 measurements failed (nat_mini infer 32px on cpu: build: TypeError"
    )
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows if not r["error"]] == ["vit_small_patch16_224"] * 2


def test_compiled_suffix_compiles_that_row_only():
    """`name+compiled` (after an optional `@backend`): that model torch.compile'd, the others eager,
    in the same interleaved rounds; the row says which."""
    eager, compiled = measure.parse_models(["nat_mini", "nat_mini@cpp+compiled"], {})
    assert (eager.name, eager.na_backend, eager.compiled) == ("nat_mini", None, False)
    assert (compiled.name, compiled.na_backend, compiled.compiled) == ("nat_mini", "cpp", True)
    settings = measure.Settings(torch.device("cpu"), "fp32", channels_last=False, iters=1)
    tiny = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), kernel_size=3)
    runners = [
        measure.Runner(dataclasses.replace(spec, kwargs=tiny), 32, 1, settings) for spec in (eager, compiled)
    ]
    assert runners[0].forward is runners[0].model
    assert isinstance(runners[1].forward, torch._dynamo.eval_frame.OptimizedModule)
    assert runners[1].forward._orig_mod is runners[1].model
    with pytest.raises(SystemExit, match="unknown NA backend 'fast'"):
        measure.parse_models(["nat_mini@fast+compiled"], {})
    # --compile: every model compiled, labels as given
    compiled_all = measure.parse_models(["nat_mini", "nat_mini@cpp"], {}, compile_all=True)
    assert [(s.label, s.compiled) for s in compiled_all] == [("nat_mini", True), ("nat_mini@cpp", True)]


def test_cpu_train_peak_counts_the_steps_gradients():
    """The train step allocates its gradients (zero_grad frees the last step's first): the CPU peak
    reading starts with none held, so they show in it whatever the allocator does with freed pages."""
    settings = measure.Settings(torch.device("cpu"), "fp32", channels_last=False, iters=1)
    runner = measure.Runner(
        measure.ModelSpec("vit_small_patch16_224", "vit_small_patch16_224", None), 32, 1, settings
    )
    runner.set_mode("train")
    runner.train_step()  # a previous step's gradients are held, as in the benchmark's rounds
    grads_mib = sum(p.numel() * p.element_size() for p in runner.model.parameters()) / 2**20  # ~84
    assert runner.peak_memory_mb("train") >= 0.9 * grads_mib


def plan_args(**changes) -> argparse.Namespace:
    """scripts/benchmark.py's defaults for what `device_plan` reads, with --quick."""
    args = dict(devices=["cpu"], quick=True, cpu_res=None, gpu_res=None, cpu_batch=None, gpu_batch=None)
    args.update(warmup=None, repeats=None, iters=None, amp="bf16", cpu_amp="fp32", channels_last="auto")
    return argparse.Namespace(**{**args, **changes})


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(repeats=0), "--repeats, --iters"),
        *([] if torch.cuda.is_available() else [(dict(devices=["cuda"]), "sees no CUDA device")]),
    ],
)
def test_bad_device_settings_are_one_clear_error(changes, message):
    with pytest.raises(SystemExit, match=message):
        benchmark.device_plan(plan_args(**changes))
    ((device, cfg),) = benchmark.device_plan(plan_args())
    assert device == "cpu" and cfg["resolutions"] == [32, 64] and cfg["channels_last"] is False


def test_batch_scales_with_pixels_above_224_only():
    assert measure.scaled_batch(8, 224, fixed=False) == 8
    assert measure.scaled_batch(8, 64, fixed=False) == 8
    assert measure.scaled_batch(8, 448, fixed=False) == 2
    assert measure.scaled_batch(256, 1024, fixed=False) == 12
    assert measure.scaled_batch(8, 2048, fixed=False) == 1
    assert measure.scaled_batch(8, 448, fixed=True) == 8


def _row(device, resolution, mode, model, img_s, mem=100.0, error=""):
    return dict(
        device=device,
        resolution=resolution,
        mode=mode,
        model=model,
        batch=8,
        img_s_median=img_s,
        peak_mem_mb=mem,
        error=error,
    )


def test_targets_compare_against_the_right_baseline():
    swin, convnext = "swin_tiny_patch4_window7_224", "convnext_tiny"
    rows = [
        _row("cpu", 224, "train", "nat_tiny", 12.0),
        _row("cpu", 224, "train", swin, 10.0),
        _row("cpu", 224, "infer", "nat_tiny", 9.0),
        _row("cpu", 224, "infer", swin, 10.0),
        _row("cuda", 224, "train", "nat_tiny", 900.0, mem=900.0),
        _row("cuda", 224, "train", swin, 1000.0, mem=1000.0),
        _row("cuda", 224, "train", convnext, 1000.0, error="OOM"),  # failed rows are never compared
    ]
    checks = {c["target"]: c for c in report.check_targets(rows)}
    assert checks["CPU 224: NAT-T train >= 1.0x Swin-T"]["ratio"] == 1.2
    assert checks["CPU 224: NAT-T train >= 1.0x Swin-T"]["met"]
    assert not checks["CPU 224: NAT-T infer >= 1.0x Swin-T"]["met"]
    assert not checks["GPU 224: NAT-T train >= 1.0x Swin-T"]["met"]
    assert checks["GPU 224: NAT-T train memory <= Swin-T"]["met"]
    assert not any("ConvNeXt" in t for t in checks)
    assert not any("1024" in t for t in checks)


def test_targets_are_judged_on_per_round_ratios():
    """The machine's speed changes from round to round (Swin-T 4, 10, 12 img/s): the ratio of medians
    (0.95x) sets NAT-T's round-2 step against Swin-T's round-2 step only by chance; per round NAT-T
    is ahead in 2 of 3 (1.10, 0.95, 1.08), median 1.08x."""
    swin = "swin_tiny_patch4_window7_224"
    nat = dict(_row("cpu", 224, "train", "nat_tiny", 9.5), img_s_rounds=[4.4, 9.5, 13.0])
    base = dict(_row("cpu", 224, "train", swin, 10.0), img_s_rounds=[4.0, 10.0, 12.0])
    (check,) = report.check_targets([nat, base])
    assert check["ratio"] == 0.95
    assert check["ratio_rounds"]["median"] == pytest.approx(13 / 12, abs=1e-3)
    assert (check["rounds_met"], check["rounds"]) == (2, 3)
    assert check["met"]
    assert report.rounds_text(check) == "1.08x [0.95-1.10], 2/3 rounds"  # fewer than 4: min-max


def test_print_table_shows_ratios_and_errors():
    import io

    rows = []
    for model, speed in (("swin_tiny_patch4_window7_224", 10.0), ("nat_tiny", 15.0)):
        for mode in ("infer", "train"):
            row = _row("cpu", 224, mode, model, speed)
            row.update(
                device_name="cpu x",
                amp="fp32",
                params_m=28.0,
                gmacs=4.5,
                img_s_q1=speed,
                img_s_q3=speed,
                na_backend="-",
            )
            rows.append(row)
    rows.append(dict(rows[-1], model="vit_small_patch16_224", error="OOM"))
    buf = io.StringIO()
    report.print_table(rows, "swin_tiny_patch4_window7_224", out=buf)
    lines = {line.split()[0]: line for line in buf.getvalue().splitlines() if line.strip()}
    assert lines["nat_tiny"].count(" 1.50 ") == 2
    assert "OOM" in lines["vit_small_patch16_224"]
    # the spread in brackets: quartiles from 4 repeats, else min-max (bench.spread), as the header says
    for repeats, label in ((3, "[min-max]"), (4, "[IQR]")):
        buf = io.StringIO()
        report.print_table([dict(r, repeats=repeats) for r in rows], "swin_tiny_patch4_window7_224", out=buf)
        assert buf.getvalue().count(f"img/s {label}") == 2, buf.getvalue()
