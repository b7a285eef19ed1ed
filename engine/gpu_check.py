"""The first GPU session's one command (scripts/gpu_check.py): verify and measure every GPU path.

Aimed at <= 8 minutes on one H100/H200 (not yet run on one: no GPU has been lent). Sections, each
timed and recorded (one that fails is reported; the others still run):

0. self_check: the check `auto` runs before trusting natten or Triton on a configuration
   (models/layers/backends/self_check.py), for NAT-T's and DiNAT-T's layers, bf16 and fp32.
1. operator: every NA backend that can serve a CUDA call against the float64 `naive` backend (the
   paper's gather arithmetic): output and every gradient (q, k, v, RPB), float32 and bfloat16, with
   and without RPB, k 3-7, dilation 1-3, odd sizes; a backend that can't serve a call says why.
2. na_timing: NA forward+backward in bfloat16 on NAT-T / DiNAT-T layer shapes (batch 64 at 224):
   `triton` with RPB against natten without RPB (target: <= 1.5x natten's time), `torch` with RPB.
3. train: NAT-T, DiNAT-T, Swin-T and ConvNeXt-T at batch 64, 224 px: a few bf16-autocast AdamW
   steps on one fixed batch (the loss must stay finite and fall), train img/s and peak memory, then
   bf16 inference img/s and peak memory; the NA backend that ran.
4. sweep: scripts/benchmark.py (through its CLI) on the GPU: those four models, batch 256 at 224
   and 12 at 1024, train and inference; its rows and targets (NAT-T >= 1.0x Swin-T and >= 0.8x
   ConvNeXt-T img/s, train memory <= Swin-T's): the tables docs/benchmarks.md's GPU section takes.
5. tiles (only when asked for): the `triton` kernels at each query tile of TILES on the na_timing
   shapes, bf16 with RPB, forward+backward: ms per tile and each tile's output against the default's.

`run(...)` writes gpu_check.json and gpu_check.md to its `out` folder after every section and
returns the exit status: 1 when a check failed (a self-check, a wrong gradient, a non-finite loss, a
section that crashed) or a section did not run (the time budget was spent); missed speed targets
are reported, not failed. `dry_run`: the same code on the CPU with tiny shapes and models, Triton
interpreted (the caller sets TRITON_INTERPRET=1 before torch is imported).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

import models  # noqa: F401  (registers nat_* / dinat_* with timm)
from engine import bench
from models.layers import functional, neighborhood_attention_2d
from models.layers.backends.checks import BACKENDS, CallInfo, natten_cuda_kernels_missing, why_not
from models.layers.backends.self_check import (
    SELF_CHECKED,
    out_of_bounds,
    outputs_and_grads,
    relative_errors,
    self_check,
)
from models.layers.backends.triton_na import DEFAULT_TILE, fp32_matmul_uses_tf32, na2d_triton

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("self_check", "operator", "na_timing", "train", "sweep", "tiles")
DEFAULT_SECTIONS = SECTIONS[:5]  # `tiles` is a second call's (docs/benchmarks.md, "GPU")

# (height, width, kernel, dilation)
OPERATOR_CASES = {"cuda": [(14, 14, 7, 1), (13, 17, 5, 2), (12, 11, 3, 3)], "cpu": [(7, 8, 3, 1)]}
# (map size, heads, dilation) of NAT-T / DiNAT-T layers at 224 (head dim 32, k = 7).
TIMING_SHAPES = {
    "cuda": [(56, 2, 1), (28, 4, 1), (14, 8, 1), (7, 16, 1), (56, 2, 8), (28, 4, 4), (14, 8, 2)],
    "cpu": [(9, 1, 1)],
}
# Query tiles (rows, columns) the `tiles` section times the Triton kernels at, the default first (the
# reference for both time and output). Each compiles without spills for sm_90 at k 7, head dim 32
# (compile_offline, session 12).
TILES = {"cuda": [DEFAULT_TILE, (8, 16), (16, 8), (16, 16), (4, 8)], "cpu": [DEFAULT_TILE, (4, 4)]}
TRAIN_MODELS = ["nat_tiny", "dinat_tiny", "swin_tiny_patch4_window7_224", "convnext_tiny"]
# Tiny variants for --dry-run: the same code paths (NA with RPB and dilation, Swin windows, convs).
DRY_RUN_KWARGS = {
    "nat_tiny": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), kernel_size=3),
    "dinat_tiny": dict(
        embed_dim=16,
        depths=(2, 1, 1, 1),
        num_heads=(1, 2, 2, 4),
        kernel_size=3,
        dilations=((1, 2), (1,), (1,), (1,)),
    ),
    "swin_tiny_patch4_window7_224": dict(
        embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), img_size=32
    ),
    "convnext_tiny": dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
}


class Plan:
    """Sizes per run kind: the GPU's, or the dry run's tiny ones on the CPU."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.self_check_kernel, self.self_check_head_dim = (3, 16) if dry_run else (7, 32)
        self.self_check_dilations = (1,) if dry_run else (1, 2, 4, 8)
        self.operator_cases = OPERATOR_CASES[self.device]
        self.operator_shape = (1, 1, 16) if dry_run else (2, 2, 32)  # batch, heads, head dim
        self.timing_shapes = TIMING_SHAPES[self.device]
        self.timing_batch, self.timing_warmup, self.timing_repeats = (1, 0, 1) if dry_run else (64, 2, 10)
        self.train_batch, self.train_res, self.train_steps = (2, 32, 3) if dry_run else (64, 224, 8)


# ----------------------------------------------------------------------------------------------
# 0. self_check


def self_checks(plan: Plan) -> list[dict]:
    """The self-check `auto` runs before trusting natten or Triton, for NAT-T's and DiNAT-T's layer
    configurations (head dim 32, k 7; bf16 at DiNAT-T's dilations, fp32 at dilation 1: each new
    configuration compiles and autotunes the kernels), run up front: each outcome is a row, and the
    later sections run with these outcomes in place."""
    rows = []
    for backend in SELF_CHECKED:
        for dtype, dilations in ((torch.bfloat16, plan.self_check_dilations), (torch.float32, (1,))):
            for dilation in dilations:
                has_rpb = backend == "triton"  # natten has no RPB
                row = dict(
                    backend=backend,
                    dtype=str(dtype).removeprefix("torch."),
                    kernel_size=plan.self_check_kernel,
                    dilation=dilation,
                    head_dim=plan.self_check_head_dim,
                    rpb=has_rpb,
                )
                reason = why_not_here(backend, CallInfo(plan.device, dtype, has_rpb, 0.0, True))
                if reason is not None:
                    rows.append(dict(row, status="skipped", outcome=f"skipped: {reason}"))
                    continue
                device = str(torch.device(plan.device, 0)) if plan.device == "cuda" else plan.device
                config = (plan.self_check_kernel, dilation, plan.self_check_head_dim, has_rpb)
                failure = self_check(backend, device, dtype, *config)
                rows.append(dict(row, status="FAILED" if failure else "ok", outcome=failure or "passed"))
    return rows


# ----------------------------------------------------------------------------------------------
# 1. operator


def why_not_here(backend: str, call: CallInfo) -> str | None:
    """`why_not`, and natten without its CUDA library: its CUDA path is then uncompiled FlexAttention
    (full score matrices), which would be checked and timed as if it were natten's kernels."""
    reason = why_not(backend, call)
    if reason is None and backend == "natten":
        reason = natten_cuda_kernels_missing(call)
    return reason


def check_operator(plan: Plan) -> list[dict]:
    rows = []
    device = plan.device
    gen = torch.Generator().manual_seed(0)
    for index, (height, width, kernel_size, dilation) in enumerate(plan.operator_cases):
        batch, heads, head_dim = plan.operator_shape
        shape = (batch, height, width, heads, head_dim)
        q, k, v, grad_out = (
            torch.randn(shape, generator=gen, dtype=torch.float64).to(device) for _ in range(4)
        )
        rpb = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=gen, dtype=torch.float64)
        for has_rpb in (True, False):
            inputs = [q, k, v] + ([rpb.to(device)] if has_rpb else [])

            def reference(*t, ks=kernel_size, dil=dilation):  # the paper's gather arithmetic, float64
                return neighborhood_attention_2d(
                    *t[:3], ks, dil, rpb=t[3] if len(t) > 3 else None, backend="naive"
                )

            want = outputs_and_grads(reference, inputs, grad_out, torch.float64)
            for backend in BACKENDS:
                for dtype in (torch.float32, torch.bfloat16):
                    case = f"{height}x{width} k{kernel_size} d{dilation}"
                    row = dict(
                        backend=backend, dtype=str(dtype).removeprefix("torch."), rpb=has_rpb, case=case
                    )
                    train_reason = why_not_here(backend, CallInfo(device, dtype, has_rpb, 0.0, True))
                    infer_reason = why_not_here(backend, CallInfo(device, dtype, has_rpb, 0.0, False))
                    if infer_reason is None and backend == "flex" and index > 0:
                        infer_reason = "first case only (flex compiles each shape and dtype, ~20 s each)"
                    if infer_reason is not None:
                        rows.append(dict(row, status="skipped", reason=infer_reason))
                        continue

                    def run(*t, name=backend, ks=kernel_size, dil=dilation):
                        return neighborhood_attention_2d(
                            *t[:3], ks, dil, rpb=t[3] if len(t) > 3 else None, backend=name
                        )

                    try:
                        got = outputs_and_grads(run, inputs, grad_out, dtype, train_reason is None)
                    except Exception as error:  # a backend that says it serves the call must
                        rows.append(dict(row, status="FAILED", reason=_error_text(error)))
                        continue
                    errors = relative_errors(got, want)
                    ok = not out_of_bounds(errors, dtype)
                    rows.append(
                        dict(
                            row,
                            status="ok" if ok else "FAILED",
                            checked="forward+backward" if train_reason is None else "forward only",
                            reason=train_reason,
                            errors={name: float(f"{err:.3g}") for name, err in errors.items()},
                        )
                    )
    return rows


# ----------------------------------------------------------------------------------------------
# 2. na_timing


def _time_ms(step: Callable[[], None], device: str, repeats: int, warmup: int) -> float:
    for _ in range(warmup):  # Triton and natten compile on first use
        step()
    return statistics.median(bench.time_call(step, 1, device) * 1e3 for _ in range(repeats))


def _timing_layers(plan: Plan, kernel_size: int) -> Iterator[tuple[str, int, tuple[torch.Tensor, ...]]]:
    """Per na_timing shape: its label, its dilation, and bf16 q, k, v (head dim 32) with an fp32 RPB,
    all requiring grad."""
    for size, heads, dilation in plan.timing_shapes:
        shape = (plan.timing_batch, size, size, heads, 32)
        q, k, v = (
            torch.randn(shape, device=plan.device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
        )
        span = 2 * kernel_size - 1
        rpb = torch.randn(heads, span, span, device=plan.device, requires_grad=True)
        yield f"B{plan.timing_batch} {size}x{size} heads {heads} d{dilation}", dilation, (q, k, v, rpb)


def time_operator(plan: Plan) -> list[dict]:
    rows = []
    kernel_size = 7 if not plan.dry_run else 3
    for shape, dilation, (q, k, v, rpb) in _timing_layers(plan, kernel_size):
        row = dict(shape=shape, ms={}, skipped={})
        for label, backend, bias in (
            ("triton+rpb", "triton", rpb),
            ("natten", "natten", None),
            ("torch+rpb", "torch", rpb),
        ):
            reason = why_not_here(backend, CallInfo(plan.device, q.dtype, bias is not None, 0.0, True))
            if reason is not None:
                row["skipped"][label] = reason
                continue

            def step(name=backend, b=bias, qkv=(q, k, v), dil=dilation):
                out = neighborhood_attention_2d(*qkv, kernel_size, dil, rpb=b, backend=name)
                out.sum().backward()

            try:
                row["ms"][label] = round(
                    _time_ms(step, plan.device, plan.timing_repeats, plan.timing_warmup), 3
                )
            except Exception as error:
                row.update(status="FAILED", error=f"{label}: {_error_text(error)}")
        if "triton+rpb" in row["ms"] and "natten" in row["ms"]:
            row["triton_over_natten"] = round(row["ms"]["triton+rpb"] / row["ms"]["natten"], 3)
            row["target_met"] = row["triton_over_natten"] <= 1.5
        rows.append(row)
    return rows


def time_tiles(plan: Plan) -> list[dict]:
    """The `triton` kernels at each of TILES on the na_timing shapes (bf16, RPB, forward+backward):
    ms per tile, and each tile's output against the default tile's (only the summation order may
    differ: a relative difference above 1e-2 fails the row)."""
    rows = []
    kernel_size = 7 if not plan.dry_run else 3
    for shape, dilation, (q, k, v, rpb) in _timing_layers(plan, kernel_size):
        tiles = {f"{t[0]}x{t[1]}": t for t in TILES[plan.device]}
        row = dict(shape=shape, tiles=list(tiles), ms={}, rel_diff={})
        reference = None
        for label, tile in tiles.items():

            def attention(t=tile, dil=dilation, inputs=(q, k, v, rpb)):
                scale = inputs[0].shape[-1] ** -0.5
                return na2d_triton(*inputs[:3], kernel_size, dil, inputs[3], scale, 0.0, tile=t)

            try:
                row["ms"][label] = round(
                    _time_ms(
                        lambda: attention().sum().backward(),
                        plan.device,
                        plan.timing_repeats,
                        plan.timing_warmup,
                    ),
                    3,
                )
                with torch.no_grad():
                    out = attention().float()
            except Exception as error:
                row.update(status="FAILED", error=f"{label}: {_error_text(error)}")
                continue
            if reference is None:
                reference = out
            else:
                row["rel_diff"][label] = float(f"{((out - reference).norm() / reference.norm()).item():.2g}")
                if not row["rel_diff"][label] <= 1e-2:
                    row.update(status="FAILED", error=f"{label}: output differs from the default tile's")
        if row["ms"]:
            row["fastest"] = min(row["ms"], key=row["ms"].get)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# 3. train


@contextlib.contextmanager
def backends_used() -> Iterator[set[str]]:
    """The NA backends the operator dispatches to inside the block."""
    used: set[str] = set()
    originals = dict(functional._IMPLEMENTATIONS)

    def recording(name: str, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            used.add(name)
            return fn(*args, **kwargs)

        return run

    functional._IMPLEMENTATIONS.update({name: recording(name, fn) for name, fn in originals.items()})
    try:
        yield used
    finally:
        functional._IMPLEMENTATIONS.update(originals)


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def _train_model(plan: Plan, name: str) -> dict:
    torch.manual_seed(0)
    kwargs = DRY_RUN_KWARGS[name] if plan.dry_run else {}
    model = timm.create_model(name, pretrained=False, num_classes=100, **kwargs).to(plan.device)
    images = torch.randn(plan.train_batch, 3, plan.train_res, plan.train_res, device=plan.device)
    labels = torch.randint(0, 100, (plan.train_batch,), device=plan.device)
    if plan.device == "cuda":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=plan.device == "cuda")
    losses, times = [], []
    with backends_used() as used:
        for _ in range(plan.train_steps):
            t0 = time.perf_counter()
            with torch.autocast(plan.device, dtype=torch.bfloat16, enabled=plan.device == "cuda"):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())  # synchronises
            times.append((time.perf_counter() - t0) * 1e3)
    step_ms = statistics.median(times[1:])  # the first step compiles kernels
    train_peak = _peak_mb(plan.device)
    optimizer.zero_grad(set_to_none=True)  # inference's peak holds the weights, not the last step's grads
    del optimizer, loss
    model.eval()
    with torch.no_grad(), torch.autocast(plan.device, dtype=torch.bfloat16, enabled=plan.device == "cuda"):
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        infer_ms = _time_ms(lambda: model(images), plan.device, plan.train_steps, warmup=1)
    finite = all(math.isfinite(x) for x in losses)
    return dict(
        na_backend=",".join(sorted(used)) or "-",
        losses=[round(x, 4) for x in losses],
        ms_per_step=round(step_ms, 2),
        img_s=round(plan.train_batch / step_ms * 1e3, 1),
        peak_mem_mb=train_peak,
        infer_img_s=round(plan.train_batch / infer_ms * 1e3, 1),
        infer_peak_mem_mb=_peak_mb(plan.device),
        status="ok" if finite and min(losses[1:]) < losses[0] else "FAILED",
    )


def _peak_mb(device: str) -> int | None:
    return round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None


def train_steps(plan: Plan) -> list[dict]:
    rows = []
    for name in TRAIN_MODELS:
        row = dict(model=name, batch=plan.train_batch, resolution=plan.train_res)
        try:
            row.update(_train_model(plan, name))
        except Exception as error:  # one model's crash is its row's verdict; the others still run
            row.update(status="FAILED", error=_error_text(error))
        if plan.device == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# 4. sweep


def benchmark_sweep(plan: Plan, out: Path, timeout: int) -> dict:
    """scripts/benchmark.py through its CLI; its JSON's rows (condensed) and targets."""
    bench_out = out / "benchmark"
    if plan.dry_run:
        flags = ["--quick", "--devices", "cpu", "--cpu-res", "32", "--models", "nat_mini", "convnext_tiny"]
    else:  # the default GPU batch: 256 at 224, scaled by pixels (12 at 1024)
        flags = ["--devices", "cuda", "--gpu-res", "224", "1024", "--repeats", "5", "--models", *TRAIN_MODELS]
    command = [
        sys.executable,
        str(REPO / "scripts" / "benchmark.py"),
        *flags,
        "--no-plots",
        "--out",
        str(bench_out),
    ]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as e:  # keep what it printed: the models it finished, per line
        printed = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        return dict(
            command=" ".join(command[1:]), error=f"timed out after {timeout} s", output=printed[-4000:]
        )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark.py exited {proc.returncode}: {proc.stderr[-2000:]}")
    result = json.loads((bench_out / "results.json").read_text())
    keys = (
        "device",
        "model",
        "resolution",
        "mode",
        "batch",
        "na_backend",
        "img_s_median",
        "peak_mem_mb",
        "error",
    )
    return dict(
        command=" ".join(command[1:]),
        rows=[{k: row.get(k) for k in keys} for row in result["rows"]],
        targets=result.get("targets", []),
    )


# ----------------------------------------------------------------------------------------------


def environment(plan: Plan) -> dict:
    import triton

    env = dict(bench.environment(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    env.update(dry_run=plan.dry_run, triton=triton.__version__)
    if torch.cuda.is_available():
        env.update(capability=torch.cuda.get_device_capability(), tf32=fp32_matmul_uses_tf32())
    return env


def section_failed(name: str, result) -> bool:
    """A section crashed or timed out, a check row FAILED, or a sweep model crashed (an OOM is a
    measurement: reported, not failed)."""
    if isinstance(result, dict) and "error" in result:
        return True
    rows = result if isinstance(result, list) else result.get("rows", []) if isinstance(result, dict) else []
    return any(row.get("status") == "FAILED" or row.get("error") not in (None, "", "OOM") for row in rows)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# GPU check" + (" (dry run on CPU: numbers meaningless)" if env["dry_run"] else ""),
        "",
        f"{env.get('gpu') or env['cpu']}; torch {env['torch']}, triton {env['triton']}, "
        f"natten {env['natten']}, timm {env['timm']}; {env['date']}; {report['seconds']} s. Failed sections: "
        f"{', '.join(report['failed']) or 'none'}."
        + (f" Not run (yet): {', '.join(report['not_run'])}." if report["not_run"] else ""),
    ]
    sections = report["sections"]
    for name, result in sections.items():
        lines += ["", f"## {name} ({report['section_seconds'][name]} s)", ""]
        if isinstance(result, dict) and "error" in result:
            lines += ["```", result["error"].rstrip(), "```"]
        elif name == "self_check":
            lines += ["| backend | dtype | k | dilation | head dim | RPB | outcome |", "|" + "---|" * 7]
            for r in result:
                cells = [
                    r[key]
                    for key in ("backend", "dtype", "kernel_size", "dilation", "head_dim", "rpb", "outcome")
                ]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
        elif name == "operator":
            lines += [
                "| backend | dtype | RPB | case | status | out | dq | dk | dv | drpb | note |",
                "|" + "---|" * 11,
            ]
            for r in result:
                e = r.get("errors", {})
                cells = [f"{e[n]:.1e}" if n in e else "" for n in ("out", "dq", "dk", "dv", "drpb")]
                note = r.get("reason") or ""
                lines.append(
                    f"| {r['backend']} | {r['dtype']} | {r['rpb']} | {r['case']} | {r['status']} | "
                    + " | ".join(cells)
                    + f" | {note} |"
                )
        elif name == "na_timing":
            lines += [
                "| shape | triton+rpb ms | natten ms | torch+rpb ms | triton/natten (<= 1.5) | note |",
                "|---|---:|---:|---:|---:|---|",
            ]
            for r in result:
                ms = r["ms"]
                cells = [f"{ms[k]:.3f}" if k in ms else "-" for k in ("triton+rpb", "natten", "torch+rpb")]
                note = r.get("error") or "; ".join(f"{k}: {v}" for k, v in r["skipped"].items())
                lines.append(
                    f"| {r['shape']} | "
                    + " | ".join(cells)
                    + f" | {r.get('triton_over_natten', '-')} | {note} |"
                )
        elif name == "tiles":
            labels = result[0]["tiles"] if result else []
            lines += [
                "| shape | "
                + " | ".join(f"{label} ms" for label in labels)
                + " | fastest | max rel diff | note |",
                "|---|" + "---:|" * len(labels) + "---|---:|---|",
            ]
            for r in result:
                cells = [f"{r['ms'][label]:.3f}" if label in r["ms"] else "-" for label in labels]
                worst = max(r["rel_diff"].values(), default="-")
                lines.append(
                    f"| {r['shape']} | "
                    + " | ".join(cells)
                    + f" | {r.get('fastest', '-')} | {worst} | {r.get('error', '')} |"
                )
        elif name == "train":
            lines += [
                "| model | batch | res | NA backend | train img/s | ms/step | train peak MB | infer img/s "
                "| infer peak MB | losses | status |",
                "|" + "---|" * 11,
            ]
            for r in result:
                if "error" in r:
                    lines.append(
                        f"| {r['model']} | {r['batch']} | {r['resolution']} |"
                        + " |" * 7
                        + f" FAILED: {r['error']} |"
                    )
                    continue
                keys = ("model", "batch", "resolution", "na_backend", "img_s", "ms_per_step", "peak_mem_mb")
                cells = [r[key] for key in keys] + [r["infer_img_s"], r["infer_peak_mem_mb"]]
                cells += [f"{r['losses'][0]} -> {r['losses'][-1]}", r["status"]]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
        elif name == "sweep":
            lines += [
                f"`{result['command']}`",
                "",
                "| device | model | res | mode | batch | NA | img/s | peak MB |",
                "|" + "---|" * 8,
            ]
            for r in result["rows"]:
                lines.append(
                    f"| {r['device']} | {r['model']} | {r['resolution']} | {r['mode']} | {r['batch']} | "
                    f"{r['na_backend']} | {r['error'] or r['img_s_median']} | {r['peak_mem_mb']} |"
                )
            lines += ["", "| target | ratio | met |", "|---|---:|---|"]
            lines += [f"| {t['target']} | {t['ratio']} | {t['met']} |" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def run(
    out: Path,
    dry_run: bool = False,
    sections=DEFAULT_SECTIONS,
    sweep_timeout: int = 330,
    budget: float = 480,
    deadline: float = 540,
) -> int:
    """Run `sections`, write gpu_check.json / gpu_check.md to `out`; the exit status (module doc).
    No section starts once `budget` seconds have passed (they are reported as not run), and the sweep
    stops by `deadline` (what it printed is kept): a lent machine's command limit (560 s) then cuts
    nothing half-done."""
    plan = Plan(dry_run)
    if not dry_run and not torch.cuda.is_available():
        print(
            "error: no CUDA GPU visible to torch; run with --dry-run to check the script on the CPU",
            file=sys.stderr,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    runs = {
        "self_check": lambda: self_checks(plan),
        "operator": lambda: check_operator(plan),
        "na_timing": lambda: time_operator(plan),
        "train": lambda: train_steps(plan),
        "tiles": lambda: time_tiles(plan),
        "sweep": lambda: benchmark_sweep(
            plan, out, max(1, int(min(sweep_timeout, deadline - (time.perf_counter() - start))))
        ),
    }
    start = time.perf_counter()
    results, seconds = {}, {}
    env = environment(plan)

    def write_report() -> dict:
        # After every section, not only at the end: a run stopped by a time limit (a lent machine's
        # command limit) still leaves what it finished, and says which sections it did not reach.
        report = dict(
            environment=env,
            seconds=round(time.perf_counter() - start, 1),
            section_seconds=seconds,
            failed=[name for name, result in results.items() if section_failed(name, result)],
            not_run=[name for name in sections if name not in results],
            sections=results,
        )
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu_check.md").write_text(markdown(report))
        return report

    report = write_report()
    for name in sections:
        t0 = time.perf_counter()
        if t0 - start >= budget:
            print(f"[gpu_check] budget of {budget:.0f} s spent: not starting {name}", flush=True)
            break
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            results[name] = runs[name]()
        except Exception:  # recorded; the remaining sections still run
            results[name] = {"error": traceback.format_exc()}
        seconds[name] = round(time.perf_counter() - t0, 1)
        verdict = " FAILED" if section_failed(name, results[name]) else ""
        print(f"[gpu_check] {name}: {seconds[name]} s{verdict}", flush=True)
        report = write_report()
    print(markdown(report))
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and gpu_check.md")
    return 1 if report["failed"] or report["not_run"] else 0
