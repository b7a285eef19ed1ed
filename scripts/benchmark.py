#!/usr/bin/env python
"""Benchmark whole models: NAT / DiNAT against Swin, ConvNeXt and ViT, side by side in one run.

For every model, device and resolution: parameters, FLOPs (multiply-adds, NA at its true cost via
`models.count_flops`), inference img/s, train-step img/s (forward + backward + AdamW step) and peak
memory, each timed over several repeats after warm-up (median and spread reported), with the NA
backend that actually ran. Models are timed interleaved (round r times every model once, then round
r + 1), so load on a shared machine hits all of them alike and the ratios stay side by side; the
targets are judged on the per-round ratios (model / baseline within one round, seconds apart), in
which slow drifts of the machine's speed over the run cancel. Timing, memory, statistics, result
files and plots are engine.bench's (shared with bench_na.py and zoo.py); this script owns the models.

    python scripts/benchmark.py                       # CPU (+ GPU when there is one), default models
    python scripts/benchmark.py --devices cuda --compile          # GPU only, torch.compile'd
    python scripts/benchmark.py --models nat_tiny nat_tiny@naive swin_tiny_patch4_window7_224
    python scripts/benchmark.py --quick               # seconds: checks the script end to end

`name@backend` forces the NA backend for that row (e.g. `nat_tiny@naive`, the paper's gather).
Writes results.csv (one row per model/device/resolution/mode), results.json (the rows plus
device/torch/timm/natten versions, load, targets, scaling slopes) and three PNG plots to --out.

Memory: on CUDA, `torch.cuda.max_memory_allocated` during one step minus what was allocated
before it, plus what of this model lives across steps (parameters, gradients, buffers, optimizer
state, inputs): what max_memory_allocated reads with this model alone on the GPU. On CPU, the
peak-RSS increase during one step (peak reset through /proc/self/clear_refs after a malloc_trim):
activations and gradients, not weights.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import timm  # noqa: E402

from engine.bench import (  # noqa: E402
    device_name,
    environment,
    fmt,
    interleaved_rounds,
    is_oom,
    load_average,
    loglog_slope,
    markdown_table,
    memory_kind,
    peak_memory_mb,
    plot_panels,
    spread,
    state_bytes,
    write_csv,
    write_json,
)
from engine.bench import round_ratios as paired_ratios  # noqa: E402
from models import count_flops  # noqa: E402  (importing models registers nat_* / dinat_* with timm)

DEFAULT_MODELS = [
    "nat_mini",
    "nat_tiny",
    "dinat_tiny",
    "swin_tiny_patch4_window7_224",
    "convnext_tiny",
    "vit_small_patch16_224",
]
DEFAULT_BASELINES = ["swin_tiny_patch4_window7_224", "convnext_tiny"]
# Per device: resolutions, batch at 224 (scaled by 224^2 / pixels above), warm-up steps, timed
# repeats at the first resolution (the targets') and at the others (the scaling points), steps per
# repeat. The CPU defaults aim at <= ~8 minutes for the full run on a quiet 2-core machine.
DEVICE_DEFAULTS = {
    "cpu": dict(resolutions=[224, 320, 448], batch=8, warmup=1, repeats=5, scaling_repeats=3, iters=1),
    "cuda": dict(
        resolutions=[224, 384, 512, 768, 1024], batch=256, warmup=5, repeats=7, scaling_repeats=7, iters=5
    ),
}
QUICK = dict(resolutions=[32, 64], batch=2, warmup=1, repeats=2, scaling_repeats=2, iters=1)
QUICK_MODELS = ["nat_mini", "swin_tiny_patch4_window7_224", "vit_small_patch16_224"]
# Tiny variants for --quick: the same code paths (NA with RPB, Swin windows, dense attention), in seconds.
QUICK_KWARGS = {
    "nat_mini": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), kernel_size=3),
    "dinat_tiny": dict(
        embed_dim=16,
        depths=(2, 2, 2, 1),
        num_heads=(1, 2, 2, 4),
        kernel_size=3,
        dilations=((1, 2), (1, 1), (1, 1), (1,)),
    ),
    "swin_tiny_patch4_window7_224": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
    "vit_small_patch16_224": dict(embed_dim=32, depth=2, num_heads=2),
    "convnext_tiny": dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class ModelSpec:
    label: str  # as given on the command line, e.g. "nat_tiny@naive"
    name: str  # timm name
    na_backend: str | None  # forced NA backend, or None for the model's own ("auto")
    kwargs: dict = field(default_factory=dict, hash=False, compare=False)


def parse_models(names: list[str], model_kwargs: dict[str, dict]) -> list[ModelSpec]:
    from models.layers.backends.checks import BACKENDS

    specs = []
    for label in names:
        name, _, backend = label.partition("@")
        if backend and backend not in (*BACKENDS, "auto"):
            raise SystemExit(f"error: {label!r}: unknown NA backend {backend!r}; use one of {BACKENDS}")
        if not timm.is_model(name):
            raise SystemExit(f"error: {name!r} is not a timm model name (see timm.list_models())")
        specs.append(ModelSpec(label, name, backend or None, dict(model_kwargs.get(name, {}))))
    if len({s.label for s in specs}) != len(specs):
        raise SystemExit(f"error: a model is listed twice in {names}")
    return specs


def create_model(spec: ModelSpec, resolution: int) -> nn.Module:
    """timm model at `resolution`: Swin / ViT take img_size (their masks and position embeddings
    depend on it); NAT and ConvNeXt take any size, and their constructors reject img_size."""
    kwargs = dict(pretrained=False, **spec.kwargs)
    try:
        return timm.create_model(spec.name, img_size=resolution, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
    return timm.create_model(spec.name, **kwargs)


def has_na(model: nn.Module) -> bool:
    from models.layers import NeighborhoodAttention2D

    return any(isinstance(m, NeighborhoodAttention2D) for m in model.modules())


def model_flops(spec: ModelSpec, resolution: int) -> tuple[int, float]:
    """(parameters, GMACs per image) from a meta-device copy: no weights, no activations."""
    with torch.device("meta"):
        model = create_model(spec, resolution)
    params = sum(p.numel() for p in model.parameters())
    try:
        macs = count_flops(model, (3, resolution, resolution)) / 1e9
    except Exception:  # a model whose forward can't run on meta: count on CPU, batch 1
        model = create_model(spec, resolution)
        macs = count_flops(model, (3, resolution, resolution)) / 1e9
    return params, macs


# ----------------------------------------------------------------------------------------------
# NA backend that actually ran
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def spy_na_backends(profile_label: bool = False) -> Iterator[set[str]]:
    """Names of the NA implementations called inside the block (eager mode only: a compiled graph
    calls no Python); with `profile_label`, each call is also a profiler range "na_operator:<name>".
    Wraps the operator's dispatch table, restores it on exit."""
    seen: set[str] = set()
    try:
        from models.layers import functional as na_functional

        table = na_functional._IMPLEMENTATIONS
    except (ImportError, AttributeError):
        yield seen
        return
    original = dict(table)

    def spy(name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            seen.add(name)
            if not profile_label:
                return fn(*args, **kwargs)
            with torch.profiler.record_function(f"na_operator:{name}"):
                return fn(*args, **kwargs)

        return wrapped

    table.update({name: spy(name, fn) for name, fn in original.items()})
    try:
        yield seen
    finally:
        table.update(original)


def predicted_na_backend(device: torch.device, dtype: torch.dtype, train: bool) -> str:
    from models.layers import explain_backends

    q = torch.empty(1, 7, 7, 2, 32, device=device, dtype=dtype)
    return explain_backends(q, rpb=torch.zeros(2, 13, 13, device=device), requires_grad=train).name


def na_context(spec: ModelSpec):
    if spec.na_backend is None:
        return contextlib.nullcontext()
    from models.layers import use_backend

    return use_backend(spec.na_backend)


# ----------------------------------------------------------------------------------------------
# One model on one device at one resolution
# ----------------------------------------------------------------------------------------------


@dataclass
class Settings:
    device: torch.device
    amp: str  # bf16 / fp16 / fp32
    channels_last: bool
    compile: bool
    iters: int
    optimizer: str = "adamw-fused"


class Runner:
    """A model with its inputs and optimizer, and the two timed steps (inference, train)."""

    def __init__(self, spec: ModelSpec, resolution: int, batch: int, settings: Settings):
        self.spec, self.settings = spec, settings
        device = settings.device
        self.model = create_model(spec, resolution).to(device)
        self.uses_na = has_na(self.model)
        memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        if settings.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.x = torch.randn(batch, 3, resolution, resolution, device=device).to(memory_format=memory_format)
        num_classes = getattr(self.model, "num_classes", 1000) or 1000
        self.y = torch.randint(0, num_classes, (batch,), device=device)
        self.forward = torch.compile(self.model) if settings.compile else self.model
        # fused AdamW (one kernel over all tensors; CPU and CUDA) by default: the plain per-tensor
        # loop costs ~30% of a CPU train step (see docs/benchmarks.md) and is the same for every model.
        fused = {"fused": True} if settings.optimizer == "adamw-fused" else {"foreach": False}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, **fused)
        amp_dtype = AMP_DTYPES[settings.amp]
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=amp_dtype))
            if amp_dtype is not None
            else contextlib.nullcontext
        )
        self.scaler = torch.amp.GradScaler(device.type) if settings.amp == "fp16" else None
        self.compute_dtype = amp_dtype or torch.float32

    def infer_step(self) -> None:
        # no_grad, not inference_mode: the NA operator caches index tensors per map size, and ones
        # first built under inference_mode can't be saved for backward by a later train step.
        with na_context(self.spec), torch.no_grad(), self.autocast():
            self.forward(self.x)

    def train_step(self) -> None:
        with na_context(self.spec):
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                loss = F.cross_entropy(self.forward(self.x), self.y)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()

    def step_fn(self, mode: str) -> Callable[[], None]:
        return self.infer_step if mode == "infer" else self.train_step

    def set_mode(self, mode: str) -> None:
        self.model.train(mode == "train")

    def peak_memory_mb(self, mode: str) -> float:
        # what of this model lives across steps: CUDA's reading counts it, the CPU's RSS delta doesn't
        resident = state_bytes(self.model, self.optimizer if mode == "train" else None, self.x, self.y)
        return peak_memory_mb(self.step_fn(mode), self.settings.device, resident)

    def na_backend(self, mode: str, seen: set[str]) -> str:
        if not self.uses_na:
            return "-"
        if seen:
            return "+".join(sorted(seen))
        if self.spec.na_backend:
            return self.spec.na_backend
        # compiled graphs bypass the spy; say what `auto` picks for this device / dtype
        return predicted_na_backend(self.settings.device, self.compute_dtype, mode == "train")


def bench_resolution(
    specs: list[ModelSpec], resolution: int, batch: int, modes: list[str], settings: Settings, cfg: dict, log
) -> list[dict]:
    """Every model at one resolution on one device; rounds interleave the models."""
    runners: dict[str, Runner] = {}
    errors: dict[str, str] = {}
    for spec in specs:
        try:
            runners[spec.label] = Runner(spec, resolution, batch, settings)
        except Exception as e:  # noqa: BLE001 (one model failing must not lose the others' numbers)
            errors[spec.label] = f"build: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"  {spec.label}: {errors[spec.label]}")
    rows = []
    for mode in modes:
        memory: dict[str, float] = {}
        backends: dict[str, str] = {}
        mode_errors = dict(errors)
        for label, runner in runners.items():
            runner.set_mode(mode)
            try:
                for _ in range(cfg["warmup"]):
                    runner.step_fn(mode)()
                with spy_na_backends() as seen:
                    memory[label] = runner.peak_memory_mb(mode)
                backends[label] = runner.na_backend(mode, seen)
            except Exception as e:  # noqa: BLE001
                mode_errors[label] = ("OOM" if is_oom(e) else f"{type(e).__name__}: {e}")[:200]
                log(f"  {label} {mode}: {mode_errors[label]}")
                if settings.device.type == "cuda":
                    torch.cuda.empty_cache()
        steps = {label: runners[label].step_fn(mode) for label in memory}
        failed: dict[str, BaseException] = {}  # a failing model is dropped, the others keep their rounds
        times = interleaved_rounds(
            steps, cfg["repeats"], warmup=0, iters=settings.iters, device=settings.device, errors=failed
        )
        for label, e in failed.items():
            mode_errors[label] = ("OOM" if is_oom(e) else f"{type(e).__name__}: {e}")[:200]
        for spec in specs:
            row = dict(model=spec.label, timm_name=spec.name, mode=mode, resolution=resolution, batch=batch)
            if spec.label in times:
                img_s = [batch * settings.iters / t for t in times[spec.label]]
                ms = [1e3 * t / settings.iters for t in times[spec.label]]
                stats = spread(img_s)
                row.update(
                    {f"img_s_{k}": v for k, v in stats.items()},
                    # round by round: entry r of every model was timed in the same round, side by side
                    img_s_rounds=[round(x, 4) for x in img_s],
                    ms_per_step_median=statistics.median(ms),
                    peak_mem_mb=memory[spec.label],
                    na_backend=backends[spec.label],
                    error="",
                )
            else:
                row.update(error=mode_errors.get(spec.label, "not run"))
            rows.append(row)
            if not row["error"]:
                log(
                    f"  {mode:5s} {spec.label:32s} {row['img_s_median']:9.1f} img/s "
                    f"[{row['img_s_q1']:.1f}, {row['img_s_q3']:.1f}]  {row['peak_mem_mb']:8.0f} MB  "
                    f"NA={row['na_backend']}"
                )
    del runners
    gc.collect()
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def profile_models(
    specs: list[ModelSpec],
    resolution: int,
    batch: int,
    modes: list[str],
    settings: Settings,
    out: Path,
    log,
    steps: int = 1,
) -> list[dict]:
    """torch.profiler over `steps` steps of each model: the op table goes to profile_*.txt; the
    summary (per-step total, time inside the NA operator's forward, top ops by self time) to the JSON."""
    from torch.profiler import ProfilerActivity, profile

    cuda = settings.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    self_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total_key = "device_time_total" if cuda else "cpu_time_total"
    summaries = []
    for spec in specs:
        runner = Runner(spec, resolution, batch, settings)
        for mode in modes:
            runner.set_mode(mode)
            step = runner.step_fn(mode)
            step()  # warm-up: caches, allocator, lazy optimizer state
            with spy_na_backends(profile_label=True), profile(activities=activities) as prof:
                for _ in range(steps):
                    step()
                if cuda:
                    torch.cuda.synchronize()
            events = prof.key_averages()
            ops = [e for e in events if not e.key.startswith(("na_operator:", "ProfilerStep"))]
            total_ms = sum(getattr(e, self_key, 0) for e in ops) / 1e3 / steps
            na_events = [e for e in events if e.key.startswith("na_operator:")]
            na_ms = sum(getattr(e, total_key, 0) for e in na_events) / 1e3 / steps
            top = sorted(ops, key=lambda e: getattr(e, self_key, 0), reverse=True)[:10]
            name = f"profile_{settings.device.type}_{resolution}_{spec.label.replace('@', '-')}_{mode}.txt"
            (out / name).write_text(events.table(sort_by=self_key, row_limit=40))
            summaries.append(
                dict(
                    device=settings.device.type,
                    resolution=resolution,
                    batch=batch,
                    model=spec.label,
                    mode=mode,
                    total_ms=round(total_ms, 1),
                    na_forward_ms=round(na_ms, 1),
                    top_ops=[(e.key, round(getattr(e, self_key, 0) / 1e3 / steps, 1)) for e in top],
                )
            )
            ops_text = ", ".join(f"{k} {v:.0f}" for k, v in summaries[-1]["top_ops"][:6])
            log(
                f"  profile {mode:5s} {spec.label:28s} {total_ms:8.0f} ms, NA fwd {na_ms:6.0f} ms; {ops_text}"
            )
        del runner
    return summaries


def scaled_batch(batch_at_224: int, resolution: int, fixed: bool) -> int:
    """The batch at `resolution`: above 224, cut by 224^2 / pixels (same pixels per step, so
    memory stays bounded and the big sizes don't dominate the run); never raised below 224."""
    if fixed or resolution <= 224:
        return batch_at_224
    return max(1, round(batch_at_224 * (224 / resolution) ** 2))


# ----------------------------------------------------------------------------------------------
# Environment, ratios, targets, scaling
# ----------------------------------------------------------------------------------------------


def find(rows: list[dict], device: str, resolution: int, mode: str, name: str) -> dict | None:
    """The measured row of timm model `name` (its own NA backend, not an @-forced one)."""
    for row in rows:
        if (row["device"], row["resolution"], row["mode"], row["model"]) == (device, resolution, mode, name):
            return row if not row["error"] else None
    return None


def ratio(row: dict | None, base: dict | None, key: str) -> float | None:
    if row is None or base is None or not base.get(key):
        return None
    return row[key] / base[key]


def round_ratios(row: dict | None, base: dict | None) -> list[float]:
    """img/s ratio in each round (the two timed a few seconds apart): drifts of a shared machine
    over the run, which move a ratio of medians, cancel in these. Empty for rows without rounds."""
    if row is None or base is None:
        return []
    return paired_ratios(row.get("img_s_rounds", []), base.get("img_s_rounds", []))


# Issue 5's targets: (device, resolution, mode, model, baseline, metric, comparison, bound, description)
NAT_T, SWIN_T, CONVNEXT_T = "nat_tiny", "swin_tiny_patch4_window7_224", "convnext_tiny"
TARGETS = [
    *[
        ("cpu", 224, m, NAT_T, SWIN_T, "img_s_median", ">=", 1.0, f"CPU 224: NAT-T {m} >= 1.0x Swin-T")
        for m in ("train", "infer")
    ],
    *[
        ("cuda", 224, m, NAT_T, SWIN_T, "img_s_median", ">=", 1.0, f"GPU 224: NAT-T {m} >= 1.0x Swin-T")
        for m in ("train", "infer")
    ],
    *[
        (
            "cuda",
            224,
            m,
            NAT_T,
            CONVNEXT_T,
            "img_s_median",
            ">=",
            0.8,
            f"GPU 224: NAT-T {m} >= 0.8x ConvNeXt-T",
        )
        for m in ("train", "infer")
    ],
    ("cuda", 224, "train", NAT_T, SWIN_T, "peak_mem_mb", "<=", 1.0, "GPU 224: NAT-T train memory <= Swin-T"),
    *[
        ("cuda", 1024, m, NAT_T, b, "img_s_median", ">", 1.0, f"GPU 1024: NAT-T {m} > {short}")
        for m in ("train", "infer")
        for b, short in ((SWIN_T, "Swin-T"), (CONVNEXT_T, "ConvNeXt-T"))
    ],
]


def check_targets(rows: list[dict]) -> list[dict]:
    """The targets this run has rows for, each with its measured ratio and verdict."""
    compare = {">=": lambda r, b: r >= b, "<=": lambda r, b: r <= b, ">": lambda r, b: r > b}
    checks = []
    for device, resolution, mode, model, base, key, op, bound, text in TARGETS:
        row = find(rows, device, resolution, mode, model)
        base_row = find(rows, device, resolution, mode, base)
        r = ratio(row, base_row, key)
        best = ratio(row, base_row, "img_s_max") if key == "img_s_median" else None
        rounds = round_ratios(row, base_row) if key == "img_s_median" else []
        round_stats = spread(rounds) if rounds else None
        if r is not None:
            checks.append(
                dict(
                    target=text,
                    device=device,
                    resolution=resolution,
                    batch=row["batch"],
                    mode=mode,
                    ratio=round(r, 3),
                    ratio_best=None if best is None else round(best, 3),
                    # per-round ratios: their median and IQR, and in how many rounds the bound held
                    ratio_rounds=round_stats and {k: round(v, 3) for k, v in round_stats.items()},
                    rounds_met=sum(bool(compare[op](x, bound)) for x in rounds),
                    rounds=len(rounds),
                    bound=f"{op} {bound}",
                    # judged on the per-round ratios where there are rounds to pair
                    met=bool(compare[op](round_stats["median"] if len(rounds) > 1 else r, bound)),
                )
            )
    return checks


def scaling_slopes(rows: list[dict]) -> list[dict]:
    """Per device, mode and model: how time per image and FLOPs grow with pixels (1 linear, 2 quadratic)."""
    out = []
    keys = sorted({(r["device"], r["mode"], r["model"]) for r in rows}, key=str)
    for device, mode, model in keys:
        sel = sorted(
            (
                r
                for r in rows
                if (r["device"], r["mode"], r["model"]) == (device, mode, model) and not r["error"]
            ),
            key=lambda r: r["resolution"],
        )
        if len(sel) < 2:
            continue
        pixels = [r["resolution"] ** 2 for r in sel]
        out.append(
            dict(
                device=device,
                mode=mode,
                model=model,
                resolutions=[r["resolution"] for r in sel],
                time_slope=loglog_slope(pixels, [1.0 / r["img_s_median"] for r in sel]),
                flops_slope=loglog_slope(pixels, [r["gmacs"] for r in sel]),
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def table_groups(rows: list[dict], baseline: str) -> Iterator[tuple[dict, list[dict]]]:
    """What both tables show, per device and resolution (CPU first): the group's first row (device
    name, batch, precision) and one entry per model, in run order, with its ratios vs `baseline`."""
    groups = sorted({(r["device"], r["resolution"]) for r in rows}, key=lambda g: (g[0] != "cpu", g[0], g[1]))
    for device, resolution in groups:
        sel = [r for r in rows if (r["device"], r["resolution"]) == (device, resolution)]
        models = []
        for model in dict.fromkeys(r["model"] for r in sel):
            cells = {r["mode"]: r for r in sel if r["model"] == model}
            any_row = next(iter(cells.values()))
            modes = {}
            for mode in ("infer", "train"):
                r = cells.get(mode)
                if r is None or r["error"]:
                    modes[mode] = dict(error=(r or {}).get("error", "not run"))
                    continue
                base = find(rows, device, resolution, mode, baseline)
                modes[mode] = dict(
                    row=r, ratio=ratio(r, base, "img_s_median"), ratio_best=ratio(r, base, "img_s_max")
                )
            train = cells.get("train") if cells.get("train") and not cells["train"]["error"] else None
            base = find(rows, device, resolution, "train", baseline)
            models.append(
                dict(
                    name=model,
                    params_m=any_row["params_m"],
                    gmacs=any_row["gmacs"],
                    modes=modes,
                    train_mb=train and train["peak_mem_mb"],
                    train_mb_ratio=ratio(train, base, "peak_mem_mb"),
                    backend=next((r.get("na_backend") for r in cells.values() if r.get("na_backend")), "-"),
                )
            )
        yield sel[0], models


def print_table(rows: list[dict], baseline: str, out=sys.stdout) -> None:
    """Per device and resolution: absolute numbers and ratios against `baseline`."""
    for first, models in table_groups(rows, baseline):
        resolution = first["resolution"]
        print(
            f"\n{first['device']} ({first['device_name']}), {resolution}x{resolution}, "
            f"batch {first['batch']}, {first['amp']}; ratios vs {baseline}",
            file=out,
        )
        header = (
            f"{'model':32s} {'params':>7s} {'GMACs':>7s} {'infer img/s [IQR]':>24s} {'x':>6s} "
            f"{'train img/s [IQR]':>24s} {'x':>6s} {'train MB':>9s} {'x':>6s}  NA backend"
        )
        print(header, file=out)
        print("-" * len(header), file=out)
        for m in models:
            line = f"{m['name']:32s} {m['params_m']:6.1f}M {m['gmacs']:7.2f}"
            for mode in ("infer", "train"):
                cell = m["modes"][mode]
                if "error" in cell:
                    line += f" {cell['error'][:24]:>24s} {'-':>6s}"
                    continue
                r = cell["row"]
                iqr = f"{r['img_s_median']:.1f} [{r['img_s_q1']:.1f}-{r['img_s_q3']:.1f}]"
                line += f" {iqr:>24s} {fmt(cell['ratio'], '.2f'):>6s}"
            line += f" {fmt(m['train_mb'], '.0f'):>9s} {fmt(m['train_mb_ratio'], '.2f'):>6s}"
            print(f"{line}  {m['backend']}", file=out)


def markdown(result: dict) -> str:
    """results.md: the tables of docs/benchmarks.md, ready to paste (ratios vs the run's baseline)."""
    rows, baseline, env = result["rows"], result["baseline"], result["environment"]
    lines = [
        f"Measured {result['created']} with `{result['command']}`: torch {env['torch']}, timm {env['timm']}, "
        f"natten {env['natten']}; load average {result['load_average_before']} before, "
        f"{result['load_average_after']} after; {result['wall_seconds']:.0f} s. Ratios (x) vs {baseline}; "
        "img/s as median [IQR] of the repeats, and the best repeat (noise on a shared machine only ever "
        "adds time, so best-of-N ratios are the steadier ones under load).",
    ]
    header = ["model", "params", "GMACs"] + ["infer img/s", "x", "best", "x", "train img/s", "x", "best", "x"]
    header += ["train peak MB", "x", "NA backend"]
    for first, models in table_groups(rows, baseline):
        resolution = first["resolution"]
        table = []
        for m in models:
            cells = [m["name"], f"{m['params_m']:.1f}M", f"{m['gmacs']:.2f}"]
            for mode in ("infer", "train"):
                cell = m["modes"][mode]
                if "error" in cell:
                    cells += [cell["error"][:40], "-", "-", "-"]
                    continue
                r = cell["row"]
                cells += [f"{r['img_s_median']:.2f} [{r['img_s_q1']:.2f}-{r['img_s_q3']:.2f}]"]
                cells += [fmt(cell["ratio"], ".2f"), f"{r['img_s_max']:.2f}", fmt(cell["ratio_best"], ".2f")]
            cells += [fmt(m["train_mb"], ".0f"), fmt(m["train_mb_ratio"], ".2f"), m["backend"]]
            table.append(cells)
        lines += [
            "",
            f"**{first['device_name']}, {resolution}x{resolution}, batch {first['batch']}, {first['amp']}**",
            "",
            *markdown_table(header, table, "l" + "r" * 12 + "l"),
        ]
    if result["targets"]:
        header = ["target", "batch", "ratio of medians", "best-repeat ratio"]
        header += ["per-round ratio [IQR], rounds met", "verdict"]
        table = [
            [
                c["target"],
                c["batch"],
                f"{c['ratio']:.2f}x ({c['bound']})",
                fmt(c.get("ratio_best"), ".2f"),
                rounds_text(c),
                "met" if c["met"] else "**missed**",
            ]
            for c in result["targets"]
        ]
        lines += ["", *markdown_table(header, table, "lrrrrl")]
    if result["scaling"]:
        header = ["device", "mode", "model", "time slope", "FLOPs slope", "resolutions"]
        table = [
            [
                sl["device"],
                sl["mode"],
                sl["model"],
                fmt(sl["time_slope"], ".2f"),
                fmt(sl["flops_slope"], ".2f"),
                ", ".join(map(str, sl["resolutions"])),
            ]
            for sl in result["scaling"]
        ]
        lines += ["", *markdown_table(header, table, "lllrrl")]
    return "\n".join(lines) + "\n"


def rounds_text(check: dict) -> str:
    """'1.03x [0.99-1.06], 14/20 rounds': the per-round ratios of a target, or '-' without rounds."""
    r = check.get("ratio_rounds")
    if not r:
        return "-"
    return f"{r['median']:.2f}x [{r['q1']:.2f}-{r['q3']:.2f}], {check['rounds_met']}/{check['rounds']} rounds"


def print_targets(checks: list[dict], slopes: list[dict], out=sys.stdout) -> None:
    if checks:
        print("\nTargets (issue 5): ratio of medians; per round [IQR], rounds meeting the bound", file=out)
        for c in checks:
            verdict = "met" if c["met"] else "MISSED"
            print(
                f"  {c['target']:45s} batch {c['batch']:4d}: {c['ratio']:.2f}x ({c['bound']}); "
                f"{rounds_text(c)}  {verdict}",
                file=out,
            )
    if slopes:
        print("\nScaling: slope of log(time per image) vs log(pixels) (1 linear, 2 quadratic)", file=out)
        for s in slopes:
            res = ",".join(map(str, s["resolutions"]))
            print(
                f"  {s['device']:4s} {s['mode']:5s} {s['model']:32s} time {fmt(s['time_slope'], '.2f')}  "
                f"FLOPs {fmt(s['flops_slope'], '.2f')}  ({res})",
                file=out,
            )


CSV_FIELDS = [
    "device",
    "device_name",
    "model",
    "timm_name",
    "mode",
    "resolution",
    "batch",
    "amp",
    "channels_last",
    "compiled",
    "optimizer",
    "na_backend",
    "params_m",
    "gmacs",
    "img_s_median",
    "img_s_q1",
    "img_s_q3",
    "img_s_min",
    "img_s_max",
    "ms_per_step_median",
    "repeats",
    "iters",
    "warmup",
    "peak_mem_mb",
    "mem_kind",
    "error",
]


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """img/s vs resolution, memory vs resolution, log-log time per image vs tokens; one panel per
    device x mode. Small PNGs (80 dpi) so they can live in docs/img."""
    ok = [r for r in rows if not r["error"]]
    devices = sorted({r["device"] for r in ok}, key=lambda d: d != "cpu")
    modes = [m for m in ("infer", "train") if any(r["mode"] == m for r in ok)]
    if not devices or not modes:
        return []
    labels = list(dict.fromkeys(r["model"] for r in ok))

    def figure(
        name: str, ylabel: str, xlabel: str, value: Callable[[dict], float], x: Callable, loglog: bool
    ):
        panels = []
        for device in devices:
            dev = next(r["device_name"] for r in ok if r["device"] == device)
            row = []
            for mode in modes:
                sel = [r for r in ok if (r["device"], r["mode"]) == (device, mode)]
                series = {m: [(x(r), value(r)) for r in sel if r["model"] == m] for m in labels}
                row.append((f"{device}: {mode} ({dev[:40]})", series))
            panels.append(row)
        guides = "tokens" if loglog else None
        return plot_panels(panels, out_dir / name, xlabel, ylabel, loglog=loglog, slope_guides=guides)

    res = lambda r: r["resolution"]
    return [
        figure(
            "throughput_vs_resolution.png",
            "img/s (median)",
            "resolution (px)",
            lambda r: r["img_s_median"],
            res,
            False,
        ),
        figure(
            "memory_vs_resolution.png",
            "peak memory (MB)",
            "resolution (px)",
            lambda r: r["peak_mem_mb"],
            res,
            False,
        ),
        figure(
            "time_vs_tokens.png",
            "ms per image (median)",
            "tokens at stride 4 (H*W/16)",
            lambda r: 1e3 / r["img_s_median"],
            lambda r: r["resolution"] ** 2 / 16,
            True,
        ),
    ]


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", nargs="+", help=f"timm names, optionally name@backend (default: {DEFAULT_MODELS})"
    )
    p.add_argument(
        "--baselines", nargs="+", default=DEFAULT_BASELINES, help="ratios in the table are against the first"
    )
    p.add_argument(
        "--devices",
        nargs="+",
        default=["auto"],
        choices=["auto", "cpu", "cuda"],
        help="auto: the CPU, plus the GPU when there is one",
    )
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--cpu-res", type=int, nargs="+", help=f"default {DEVICE_DEFAULTS['cpu']['resolutions']}")
    p.add_argument("--gpu-res", type=int, nargs="+", help=f"default {DEVICE_DEFAULTS['cuda']['resolutions']}")
    p.add_argument("--cpu-batch", type=int, help="batch at 224 on the CPU (default 8)")
    p.add_argument("--gpu-batch", type=int, help="batch at 224 on the GPU (default 256)")
    p.add_argument(
        "--fixed-batch",
        action="store_true",
        help="same batch at every resolution (default: scaled by 224^2/pixels, so memory stays bounded)",
    )
    p.add_argument(
        "--warmup", type=int, help="warm-up steps per model (default cpu 1, cuda 5; the memory step adds one)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        help="timed repeats per model (default: cpu 5 at the first size, 3 at the others; cuda 7)",
    )
    p.add_argument("--iters", type=int, help="steps per timed repeat (default cpu 1, cuda 5)")
    p.add_argument("--amp", default="bf16", choices=list(AMP_DTYPES), help="autocast dtype on the GPU")
    p.add_argument("--cpu-amp", default="fp32", choices=list(AMP_DTYPES), help="autocast dtype on the CPU")
    p.add_argument(
        "--channels-last",
        default="auto",
        choices=["auto", "on", "off"],
        help="auto: on for the GPU (convs in stems, downsamplers and ConvNeXt), off on the CPU",
    )
    p.add_argument(
        "--optimizer",
        default="adamw-fused",
        choices=["adamw-fused", "adamw"],
        help="train step's optimizer: fused AdamW, or the per-tensor loop (timm's default on CPU)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every model (GPU; warm-up compiles)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores this process may use)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help='JSON {"timm_name": {kwarg: value}}')
    p.add_argument("--out", type=Path, default=REPO / "output" / "benchmark")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also torch.profiler one step per model/mode at each device's first resolution "
        "(profile_*.txt, and a summary in the JSON)",
    )
    p.add_argument("--profile-steps", type=int, default=1, help="steps per profile (times are per step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI check: tiny variants of nat_mini / swin / vit at 32 and 64 px, 2 repeats; seconds, "
        "numbers meaningless",
    )
    return p.parse_args(argv)


def device_plan(args: argparse.Namespace) -> list[tuple[str, dict]]:
    devices = []
    for d in args.devices:
        if d == "auto":
            devices += ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        else:
            devices.append(d)
    devices = list(dict.fromkeys(devices))
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("error: --devices cuda, but torch sees no CUDA device; run with --devices cpu")
    plan = []
    for device in devices:
        cfg = dict(QUICK if args.quick else DEVICE_DEFAULTS[device])
        res = args.cpu_res if device == "cpu" else args.gpu_res
        batch = args.cpu_batch if device == "cpu" else args.gpu_batch
        if res:
            cfg["resolutions"] = res
        if batch:
            cfg["batch"] = batch
        for key in ("warmup", "repeats", "iters"):
            if getattr(args, key) is not None:
                cfg[key] = getattr(args, key)
        if args.repeats is not None:
            cfg["scaling_repeats"] = args.repeats
        if cfg["repeats"] < 1 or cfg["iters"] < 1 or cfg["warmup"] < 0 or cfg["batch"] < 1:
            raise SystemExit("error: --repeats, --iters and --cpu/gpu-batch must be >= 1, --warmup >= 0")
        cfg["amp"] = args.amp if device == "cuda" else args.cpu_amp
        cfg["channels_last"] = args.channels_last == "on" or (
            args.channels_last == "auto" and device == "cuda"
        )
        plan.append((device, cfg))
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_kwargs = dict(QUICK_KWARGS) if args.quick else {}
    model_kwargs.update(args.model_kwargs)
    names = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    specs = parse_models(names, model_kwargs)
    baseline = next((b for b in args.baselines if b in {s.label for s in specs}), specs[0].label)
    plan = device_plan(args)

    torch.manual_seed(args.seed)
    gc.freeze()  # imports' objects out of the collector's way: each memory step starts with gc.collect()
    if args.quick and not args.threads:
        args.threads = 1  # a CI check, not a measurement: one thread is steadiest on a loaded runner
    if args.threads:
        torch.set_num_threads(args.threads)
    elif hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)

    load_before = load_average()
    started = time.time()
    env = environment()
    log(
        f"torch {env['torch']}, timm {env['timm']}, natten {env['natten']}; {env['cpu']}, "
        f"{env['torch_threads']} threads; GPU: {env['gpu']}; load average {load_before}"
    )
    flops_cache: dict[tuple[str, int], tuple[int, float]] = {}
    rows: list[dict] = []
    profiles: list[dict] = []
    for device_type, cfg in plan:
        settings = Settings(
            device=torch.device(device_type),
            amp=cfg["amp"],
            channels_last=cfg["channels_last"],
            compile=args.compile,
            iters=cfg["iters"],
            optimizer=args.optimizer,
        )
        name = device_name(device_type)
        for resolution in cfg["resolutions"]:
            batch = scaled_batch(cfg["batch"], resolution, args.fixed_batch)
            log(f"\n[{device_type}] {resolution}x{resolution}, batch {batch}, {cfg['amp']}")
            for spec in specs:
                key = (spec.label, resolution)
                if key not in flops_cache:
                    try:
                        flops_cache[key] = model_flops(spec, resolution)
                    except Exception as e:  # noqa: BLE001
                        log(f"  {spec.label}: FLOPs not counted ({type(e).__name__}: {e})")
                        flops_cache[key] = (0, float("nan"))
            first = resolution == cfg["resolutions"][0]
            res_cfg = dict(cfg, repeats=cfg["repeats"] if first else cfg["scaling_repeats"])
            measured = bench_resolution(specs, resolution, batch, args.modes, settings, res_cfg, log)
            if args.profile and first:
                profiles += profile_models(
                    specs, resolution, batch, args.modes, settings, args.out, log, args.profile_steps
                )
            for row in measured:
                params, gmacs = flops_cache[(row["model"], resolution)]
                row.update(
                    device=device_type,
                    device_name=name,
                    amp=cfg["amp"],
                    channels_last=cfg["channels_last"],
                    compiled=args.compile,
                    optimizer=args.optimizer,
                    params_m=params / 1e6,
                    gmacs=gmacs,
                    repeats=res_cfg["repeats"],
                    iters=cfg["iters"],
                    warmup=cfg["warmup"],
                    mem_kind=memory_kind(device_type),
                )
            rows += measured

    checks = check_targets(rows)
    slopes = scaling_slopes(rows)
    print_table(rows, baseline)
    print_targets(checks, slopes)

    result = dict(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        environment=env,
        load_average_before=load_before,
        load_average_after=load_average(),
        wall_seconds=round(time.time() - started, 1),
        quick=args.quick,
        baseline=baseline,
        plan={d: {k: v for k, v in cfg.items()} for d, cfg in plan},
        rows=rows,
        targets=checks,
        scaling=slopes,
        profiles=profiles,
    )
    write_json(result, args.out / "results.json")
    write_csv(rows, args.out / "results.csv", CSV_FIELDS)
    (args.out / "results.md").write_text(markdown(result))
    paths = [] if args.no_plots else plot(rows, args.out)
    written = ["results.csv", "results.json", "results.md", *(p.name for p in paths)]
    log(f"\nwrote {', '.join(written)} to {args.out}")
    after = result["load_average_after"]
    log(f"wall time {result['wall_seconds']} s; load average before {load_before}, after {after}")
    gc.unfreeze()  # let shutdown collect them (nanobind-bound modules report frozen objects as leaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
