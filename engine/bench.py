"""The benchmark harness: timing rounds, their statistics, memory, the environment, result files, plots.

Owns how this repo measures speed, so every benchmark (scripts/benchmark.py, scripts/bench_na.py,
scripts/zoo.py) times, summarises and writes alike. It knows nothing of models or operators: a
benchmark hands it named zero-argument steps and gets seconds back.

    from engine import bench

    steps = {"cpp": lambda: na(q, k, v, backend="cpp"), "torch": lambda: na(q, k, v, backend="torch")}
    times = bench.interleaved_rounds(steps, rounds=10, warmup=2)  # {"cpp": [s, ...], "torch": [...]}
    bench.spread(times["cpp"])                       # {"median", "q1", "q3", "min", "max"}
    bench.round_ratios(times["torch"], times["cpp"])  # torch / cpp, round by round (drift cancels)
    bench.loglog_slope(tokens, medians)              # 1: linear, 2: quadratic
    bench.peak_memory_mb(steps["cpp"], torch.device("cpu"))  # peak-RSS increase during one step
    bench.write_csv(rows, out / "x.csv"); bench.write_json(dict(environment=bench.environment()), ...)

Why interleaved rounds: on a shared machine load comes and goes over seconds; round r times every
step once (in an order rotated per round, so none always runs first after a slow neighbour), so
load hits all steps alike and the per-round ratios, taken seconds apart, cancel slow drifts.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from engine.precision import cpu_bf16_units

Step = Callable[[], object]

# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def time_call(step: Step, iters: int = 1, device: torch.device | str | None = None) -> float:
    """Seconds for `iters` calls of `step`: CUDA events on a CUDA device (the GPU's own clock, no
    host overhead in between), perf_counter otherwise."""
    if device is not None and torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return time.perf_counter() - t0


def interleaved_rounds(
    steps: Mapping[str, Step],
    rounds: int,
    warmup: int = 1,
    iters: int = 1,
    device: torch.device | str | None = None,
    errors: dict[str, BaseException] | None = None,
) -> dict[str, list[float]]:
    """Time every step once per round, `rounds` rounds, after `warmup` untimed calls of each.

    Round r starts at step r mod n and goes round the dict, so entry r of every list was timed in
    the same round, seconds apart. Each entry is the seconds of `iters` calls (see `time_call`).
    Without `errors` an exception propagates; with it, a failing step is recorded there under its
    name and dropped (the others keep running: one failure must not lose everyone's numbers)."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}

    def run(name: str, timed: bool) -> None:
        try:
            if timed:
                times[name].append(time_call(steps[name], iters, device))
            else:
                steps[name]()
        except Exception as e:
            if errors is None:
                raise
            errors[name] = e
            del times[name]

    for name in names:
        for _ in range(warmup):
            if name in times:
                run(name, timed=False)
    for r in range(rounds if names else 0):
        start = r % len(names)
        for name in names[start:] + names[:start]:
            if name in times:
                run(name, timed=True)
    return times


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum` (counts, sizes; eval.py's workers from 0)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


# argparse type of the measurement scripts' counts and sizes (rounds, repeats, threads, sides)
positive_int = int_at_least(1)


def writable_folder(path) -> str | None:
    """Why results can't be written under `path` (None: they can; the folder is made now, before the
    measurement, not after it)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot write to {path} ({e.strerror or e}); give --out somewhere writable"
    return None


def failed_rows(rows: list[dict], describe: Callable[[dict], str]) -> int:
    """After the results are written: the exit status, 1 when a row has an `error` (one `error:` line
    on stderr names the first few, `describe(row)` saying which measurement each is), else 0."""
    failed = [r for r in rows if r.get("error")]
    if not failed:
        return 0
    named = "; ".join(f"{describe(r)}: {r['error'][:120]}" for r in failed[:3])
    more = f"; {len(failed) - 3} more" if len(failed) > 3 else ""
    print(
        f"error: {len(failed)} of {len(rows)} measurements failed ({named}{more}); the others are "
        "written, and each failed row's `error` says why",
        file=sys.stderr,
    )
    return 1


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method; min and max below four values), min and max."""
    values = sorted(values)
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1, q3 = values[0], values[-1]
    return dict(median=statistics.median(values), q1=q1, q3=q3, min=values[0], max=values[-1])


def round_ratios(values: Iterable[float], reference: Iterable[float]) -> list[float]:
    """values[r] / reference[r] for each round both have (rounds where the reference is not > 0 are
    left out): drifts of a shared machine over the run, which move a ratio of medians, cancel here."""
    return [a / b for a, b in zip(values, reference, strict=False) if b > 0]


def loglog_slope(xs: Iterable[float], ys: Iterable[float]) -> float | None:
    """Least-squares slope of log(y) against log(x) (non-positive points left out); None under two points."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    mx = sum(p[0] for p in pairs) / len(pairs)
    my = sum(p[1] for p in pairs) / len(pairs)
    sxx = sum((p[0] - mx) ** 2 for p in pairs)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pairs) / sxx


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return True
    except OSError:
        return False


class _RssSampler(threading.Thread):
    """Fallback where VmHWM can't be reset: poll VmRSS every millisecond."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kb = 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb("VmRSS") or 0)
            time.sleep(0.001)


def cpu_peak_rss_delta_mb(step: Step) -> float:
    """Peak-RSS increase (MiB) during one call of `step` (peak reset through /proc/self/clear_refs
    after a malloc_trim): what the step allocates (activations, gradients), not what was resident.
    NaN where /proc/self/status can't be read."""
    gc.collect()
    _malloc_trim()
    before = _status_kb("VmRSS")
    if before is None:
        step()
        return float("nan")
    if _reset_peak_rss():
        step()
        peak = _status_kb("VmHWM") or before
    else:
        sampler = _RssSampler()
        sampler.start()
        step()
        sampler.done.set()
        sampler.join()
        peak = max(sampler.peak_kb, _status_kb("VmRSS") or 0)
    return max(0, peak - before) / 1024


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None, *inputs: torch.Tensor) -> int:
    """Bytes that live across steps: parameters, their gradients, buffers, optimizer state, inputs."""
    tensors = list(model.parameters()) + list(model.buffers()) + list(inputs)
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [t for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def cuda_peak_mb(step: Step, own_bytes: int = 0) -> float:
    """max_memory_allocated over one step, as if this step's owner were alone on the GPU: other
    resident tensors are in `before` and cancel; `own_bytes` (what of the owner was resident before
    the step, e.g. `state_bytes`) is added back."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return (peak - before + own_bytes) / 2**20


def peak_memory_mb(step: Step, device: torch.device | str, own_bytes: int = 0) -> float:
    """Peak memory (MiB) of one call of `step`: `cuda_peak_mb` on CUDA, `cpu_peak_rss_delta_mb` else."""
    if torch.device(device).type == "cuda":
        return cuda_peak_mb(step, own_bytes)
    return cpu_peak_rss_delta_mb(step)


def memory_kind(device: torch.device | str) -> str:
    """What `peak_memory_mb` measures on `device`, as the result files name it."""
    return "cuda_max_allocated" if torch.device(device).type == "cuda" else "cpu_rss_delta"


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a container's cpuset), which
    os.cpu_count() ignores; os.cpu_count() where the OS keeps no mask."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    units = cpu_bf16_units()
    return f"{cpu_name()}{f' (bf16: {units})' if units else ''}, torch threads: {torch.get_num_threads()}"


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def environment() -> dict:
    """Versions (python, torch, timm, natten, CUDA, cuDNN), CPU, core and thread counts, GPU."""
    import timm

    try:
        import natten

        natten_version = natten.__version__
    except Exception:  # noqa: BLE001 (any import failure means "not available")
        natten_version = None
    return dict(
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        timm=timm.__version__,
        natten=natten_version,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        cpu=cpu_name(),
        cpu_bf16=cpu_bf16_units(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    )


# ----------------------------------------------------------------------------------------------
# Result files and plots
# ----------------------------------------------------------------------------------------------


def write_csv(rows: list[dict], path: Path, fields: list[str] | None = None) -> None:
    """One line per row; columns `fields` (default: every key, in first-seen order), '' where a row
    lacks one, keys outside `fields` left out."""
    if fields is None:
        fields = list(dict.fromkeys(k for row in rows for k in row))
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})


def write_json(result: dict, path: Path) -> None:
    """Indented JSON; values JSON lacks (paths, dtypes, devices) written as their str()."""
    Path(path).write_text(json.dumps(result, indent=1, default=str))


def fmt(value, spec: str, missing: str = "-") -> str:
    """format(value, spec), or `missing` for None."""
    return missing if value is None else format(value, spec)


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """Lines of a GitHub markdown table; `align` has one character per column: 'l' or 'r'."""
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    return lines + ["| " + " | ".join(map(str, cells)) + " |" for cells in rows]


def plot_panels(
    panels: list[list[tuple[str, dict[str, list[tuple[float, float]]]]]],
    path: Path,
    xlabel: str,
    ylabel: str,
    loglog: bool = False,
    slope_guides: str | None = None,
    panel_size: tuple[float, float] = (5, 3.6),
    dpi: int = 80,
    fontsize: float | None = 8,
    styles: Mapping[str, Mapping] | None = None,
    legend_groups: Mapping[str, Iterable[str]] | None = None,
) -> Path:
    """A grid of line plots: panels[i][j] = (title, {label: [(x, y), ...]}); a label keeps its colour
    in every panel. `slope_guides`, the name of x (log-log only), draws dotted slope-1 and dashed
    slope-2 lines through each panel's smallest point: linear and quadratic growth at a glance.

    `styles` gives labels their own line style (matplotlib keywords: color, marker, ms, ls, lw) over the
    default (tab10 by first appearance, which repeats after ten labels). `legend_groups` ({heading:
    labels}) puts one legend outside the panels, on the right, listing the labels under bold
    headings (the rest after them), so that many series cover no data; without it the legend sits
    in the first row's last panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    labels = list(dict.fromkeys(label for row in panels for _, series in row for label in series))
    tab10 = plt.get_cmap("tab10")
    own = styles or {}
    line_styles = {
        label: {"marker": "o", "ms": 3, "ls": "-", "color": tab10(i % 10), **own.get(label, {})}
        for i, label in enumerate(labels)
    }
    n_rows, n_cols = len(panels), max(len(row) for row in panels)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(panel_size[0] * n_cols, panel_size[1] * n_rows), squeeze=False
    )
    small = {} if fontsize is None else {"fontsize": fontsize}
    for i, row in enumerate(panels):
        for j, (title, series) in enumerate(row):
            ax = axes[i][j]
            for label, points in series.items():
                if points:
                    xs, ys = zip(*sorted(points), strict=True)
                    ax.plot(xs, ys, label=label, **line_styles[label])
            if loglog:
                ax.set_xscale("log")
                ax.set_yscale("log")
                points = [p for pts in series.values() for p in pts]
                if slope_guides and points:
                    x0, y0 = min(points)
                    xs = sorted({x for x, _ in points})
                    for power, style in ((1, ":"), (2, "--")):
                        guide = [y0 * (x / x0) ** power for x in xs]
                        ax.plot(xs, guide, style, color="gray", lw=0.8, label=f"∝ {slope_guides}^{power}")
            ax.set_title(title, **small)
            ax.set_xlabel(xlabel, **small)
            ax.set_ylabel(ylabel, **small)
            if fontsize is not None:
                ax.tick_params(labelsize=fontsize - 1)
            ax.grid(True, which="both", alpha=0.3)
    legend_size = None if fontsize is None else fontsize - 2
    if legend_groups is None:
        axes[0][-1].legend(fontsize=legend_size)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    else:
        handles = {}  # every label once, over all panels (slope guides included)
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        entries, listed = [], set()
        for heading, members in legend_groups.items():
            members = [m for m in members if m in handles]
            if members:
                entries += [(Line2D([], [], ls="none"), heading), *((handles[m], m) for m in members)]
                listed.update(members)
        entries += [(h, label) for label, h in handles.items() if label not in listed]
        fig.tight_layout()
        legend = fig.legend(
            *zip(*entries, strict=True), loc="upper left", bbox_to_anchor=(1.0, 0.98), fontsize=legend_size
        )
        for text in legend.get_texts():
            if text.get_text() in legend_groups:
                text.set_fontweight("bold")
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
