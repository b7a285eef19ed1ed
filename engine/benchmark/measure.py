"""The whole-model benchmark's measurement: which models, built how, and their timed steps.

`ModelSpec` / `parse_models` (a timm name, optionally `name@backend` forcing the NA backend and
`+compiled` compiling it),
`model_flops` (parameters and GMACs from a meta-device copy), `Runner` (a model with its inputs,
optimizer and the two timed steps, inference and train), `bench_resolution` (every model at one
resolution, interleaved rounds through `engine.bench`), `profile_models` (torch.profiler summaries),
`spy_na_backends` (which NA implementation actually ran) and `scaled_batch`. The command and its
plan are `engine.benchmark`'s; targets, tables and plots `engine.benchmark.report`'s.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from engine.bench import interleaved_rounds, is_oom, peak_memory_mb, spread, state_bytes
from engine.factory import has_na, predicted_na_backend
from models import count_flops  # importing models registers nat_* / dinat_* with timm

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
COMPILED_SUFFIX = "+compiled"


@dataclass(frozen=True)
class ModelSpec:
    label: str  # as given on the command line, e.g. "nat_tiny@naive" or "nat_tiny+compiled"
    name: str  # timm name
    na_backend: str | None  # forced NA backend, or None for the model's own ("auto")
    compiled: bool = False  # torch.compile'd: `name+compiled`, or every model under --compile
    kwargs: dict = field(default_factory=dict, hash=False, compare=False)


def parse_models(
    names: list[str], model_kwargs: dict[str, dict], compile_all: bool = False
) -> list[ModelSpec]:
    from models.layers.backends.checks import BACKENDS

    specs = []
    for label in names:
        compiled = compile_all or label.endswith(COMPILED_SUFFIX)
        name, _, backend = label.removesuffix(COMPILED_SUFFIX).partition("@")
        if backend and backend not in (*BACKENDS, "auto"):
            raise SystemExit(f"error: {label!r}: unknown NA backend {backend!r}; use one of {BACKENDS}")
        if not timm.is_model(name):
            raise SystemExit(f"error: {name!r} is not a timm model name (see timm.list_models())")
        specs.append(ModelSpec(label, name, backend or None, compiled, dict(model_kwargs.get(name, {}))))
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
        self.forward = torch.compile(self.model) if spec.compiled else self.model
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
        # no gradients left over from a train step: a train step's own belong to its peak, and
        # inference has none (counted as resident below, they overstated its CUDA peak)
        self.optimizer.zero_grad(set_to_none=True)
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
        return predicted_na_backend(self.model, self.settings.device, self.compute_dtype, mode == "train")


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
            row["compiled"] = spec.compiled
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
                    f"[{row['img_s_q1']:.1f}, {row['img_s_q3']:.1f}]  {row['peak_mem_mb']:8.0f} MiB "
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
