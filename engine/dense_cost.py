"""The high-resolution cost study: dense backbones' (+ FPN neck's) forward time and peak memory
against input size, NAT / DiNAT next to Swin, ConvNeXt and a global-attention ViT.

Owns what is measured and how it is reported: `BACKBONES` (how each one is built at a given input
size, as a detector or segmenter would use it), `measure` (interleaved rounds per input size through
engine/bench.py, peak memory, the FPN's own time on the backbone's maps), `slopes` (log-log slope of
time / memory against pixels over a size range: the paper's complexity argument, measured),
`markdown`, `plot` and `write_outputs`. scripts/dense_cost.py is its command line.

Batch 1, inference (`torch.no_grad`), float32, random weights (the cost does not depend on them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

import models  # noqa: F401  (registers nat_* / dinat_*)

from . import bench
from .errors import first_line

# (height, width): squares 224^2 .. 1024^2 and a COCO-typical 800 x 1333 resize padded to a multiple of 32
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (224, 224),
    (384, 384),
    (512, 512),
    (768, 768),
    (1024, 1024),
    (800, 1216),
)
SLOPE_RANGE = (512 * 512, 1024 * 1024)  # pixels: where the target slope is taken (squares 512 .. 1024)
FPN_CHANNELS = 256


@dataclass(frozen=True)
class Backbone:
    """How to build one backbone for an input size. `build(h, w)` returns a module mapping images to a
    list of feature maps; `nhwc`: its maps are channels-last (Swin); `pyramid`: multi-scale maps an FPN
    takes (False for the single-scale ViT: no neck measured)."""

    model: str
    build: Callable[[int, int], nn.Module]
    nhwc: bool = False
    pyramid: bool = True


class _LastHidden(nn.Module):
    """ViT as a (single-scale) dense backbone: every block, tokens out, as ViTDet's trunk."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.vit.forward_features(x)]


BACKBONES: dict[str, Backbone] = {
    # the official dense layout (per-stage output norms); DiNAT with the official COCO dilations
    "NAT-T": Backbone(
        "nat_tiny", lambda h, w: timm.create_model("nat_tiny", features_only=True, stage_norms=True)
    ),
    "DiNAT-T": Backbone(
        "dinat_tiny",
        lambda h, w: timm.create_model("dinat_tiny", features_only=True, stage_norms=True, dilations="coco"),
    ),
    # built at the input size: timm's Swin clamps its windows (and drops the shift) to the maps of the
    # size it was built for, so one built at 224 would run the last stages unshifted at 1024
    "Swin-T": Backbone(
        "swin_tiny_patch4_window7_224",
        lambda h, w: timm.create_model("swin_tiny_patch4_window7_224", features_only=True, img_size=(h, w)),
        nhwc=True,
    ),
    "ConvNeXt-T": Backbone(
        "convnext_tiny", lambda h, w: timm.create_model("convnext_tiny", features_only=True)
    ),
    "ViT-S": Backbone(
        "vit_small_patch16_224",
        lambda h, w: _LastHidden(
            timm.create_model("vit_small_patch16_224", num_classes=0, dynamic_img_size=True)
        ),
        pyramid=False,
    ),
}


def _nchw(maps: Sequence[torch.Tensor], nhwc: bool) -> list[torch.Tensor]:
    return [m.permute(0, 3, 1, 2) for m in maps] if nhwc else list(maps)


def measure(
    names: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    rounds: int,
    large_rounds: int,
    large_from: int = 768 * 768,
    warmup: int = 1,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """One row per (backbone, size): median / quartiles / min of the backbone's forward wall seconds
    (interleaved rounds over the backbones at that size; on a shared machine other jobs only add time,
    so the min is the least disturbed), `cpu_s` the median process CPU seconds of a forward (the work,
    which time-slicing does not inflate), `ratio` the median over rounds of its time / the first
    backbone's in that round (`reference`), `fpn_s` the FPN's seconds on its maps, `peak_mb` the
    peak-RSS increase (MiB) of one forward. `large_rounds` rounds from `large_from` pixels on (a 1024^2
    ViT forward takes seconds). A backbone that fails (e.g. out of memory) gets its row's `error` and
    the others go on. Runs on one thread (the tables say so, and `cpu_s` is then the work done)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(names, sizes, rounds, large_rounds, large_from, warmup, log)
    finally:
        torch.set_num_threads(threads)


def _measure(names, sizes, rounds, large_rounds, large_from, warmup, log) -> list[dict]:
    rows = []
    for h, w in sizes:
        x = torch.randn(1, 3, h, w)
        built, necks, failed = {}, {}, {}
        for name in names:
            spec = BACKBONES[name]
            try:
                built[name] = spec.build(h, w).eval()
            except Exception as e:  # a backbone that can't take this size: say so, measure the rest
                failed[name] = e
        cpu_seconds: dict[str, list[float]] = {name: [] for name in built}
        steps = {name: _step(module, x, cpu_seconds[name]) for name, module in built.items()}
        n = large_rounds if h * w >= large_from else rounds
        log(f"{h}x{w}: {n} rounds of {', '.join(steps)}")
        times = bench.interleaved_rounds(steps, rounds=n, warmup=warmup, errors=failed)
        cpu_seconds = {name: values[warmup:] for name, values in cpu_seconds.items()}  # the timed calls
        for name in names:
            row = dict(backbone=name, model=BACKBONES[name].model, height=h, width=w, pixels=h * w, rounds=n)
            if name in failed:
                row["error"] = first_line(failed[name])
                rows.append(row)
                log(f"  {name}: failed ({row['error'][:160]})")
                continue
            s = bench.spread(times[name])
            row.update(median_s=s["median"], q1_s=s["q1"], q3_s=s["q3"], min_s=s["min"])
            row["cpu_s"] = bench.spread(cpu_seconds[name])["median"]
            reference = next(iter(times))  # the first backbone that ran: per-round ratios cancel drift
            row["reference"] = reference
            row["ratio"] = bench.spread(bench.round_ratios(times[name], times[reference]))["median"]
            row["peak_mb"] = bench.peak_memory_mb(steps[name], "cpu")
            if BACKBONES[name].pyramid:
                necks[name] = _fpn_seconds(built[name], x, BACKBONES[name].nhwc, n, warmup)
                row["fpn_s"] = necks[name]
            rows.append(row)
            log(
                f"  {name}: {row['median_s'] * 1e3:.0f} ms "
                f"(q1 {row['q1_s'] * 1e3:.0f}, q3 {row['q3_s'] * 1e3:.0f}), "
                f"peak +{row['peak_mb']:.0f} MiB"
                + (f", FPN {row['fpn_s'] * 1e3:.0f} ms" if "fpn_s" in row else "")
            )
        del built, steps
    return rows


def _step(module: nn.Module, x: torch.Tensor, cpu_seconds: list[float]) -> Callable[[], object]:
    """A forward of `module` on `x` that also appends its process CPU seconds to `cpu_seconds`: with one
    thread that is the work done, which other jobs on a shared machine don't inflate (wall time they do)."""

    def run():
        start = time.process_time()
        with torch.no_grad():
            out = module(x)
        cpu_seconds.append(time.process_time() - start)
        return out

    return run


def _fpn_seconds(backbone: nn.Module, x: torch.Tensor, nhwc: bool, rounds: int, warmup: int) -> float:
    """Median seconds of torchvision's FeaturePyramidNetwork (256 channels, as Mask R-CNN's) on the
    backbone's maps: the neck's share of backbone + neck."""
    with torch.no_grad():
        maps = _nchw(backbone(x), nhwc)
        fpn = FeaturePyramidNetwork([m.shape[1] for m in maps], FPN_CHANNELS).eval()
        inputs = {str(i): m.contiguous() for i, m in enumerate(maps)}
        times = bench.interleaved_rounds({"fpn": lambda: fpn(inputs)}, rounds=rounds, warmup=warmup)
    return bench.spread(times["fpn"])["median"]


def slopes(rows: Sequence[dict], pixel_range: tuple[int, int] = SLOPE_RANGE) -> dict[str, dict]:
    """Per backbone: log-log slope of forward time (median and min wall, median CPU), backbone + FPN
    time (median) and
    peak memory against pixels
    over the square sizes within `pixel_range` (1: linear in pixels, 2: quadratic)."""
    out = {}
    for name in dict.fromkeys(r["backbone"] for r in rows):
        sel = [
            r
            for r in rows
            if r["backbone"] == name
            and "median_s" in r
            and r["height"] == r["width"]
            and pixel_range[0] <= r["pixels"] <= pixel_range[1]
        ]
        px = [r["pixels"] for r in sel]
        out[name] = dict(
            time=bench.loglog_slope(px, [r["median_s"] for r in sel]),
            time_min=bench.loglog_slope(px, [r["min_s"] for r in sel]),
            cpu=bench.loglog_slope(px, [r["cpu_s"] for r in sel]),
            time_with_fpn=bench.loglog_slope(px, [r["median_s"] + r["fpn_s"] for r in sel])
            if all("fpn_s" in r for r in sel)
            else None,
            memory=bench.loglog_slope(px, [r["peak_mb"] for r in sel]),
            sizes=[f"{r['height']}^2" for r in sel],
        )
    return out


def _size_label(row: dict) -> str:
    return f"{row['height']}^2" if row["height"] == row["width"] else f"{row['height']}x{row['width']}"


def markdown(rows: Sequence[dict], slope: dict[str, dict], cpu: str) -> str:
    """The cost table (one line per backbone, one column group per size) and the slopes."""
    names = list(dict.fromkeys(r["backbone"] for r in rows))
    sizes = list(dict.fromkeys((r["height"], r["width"]) for r in rows))
    by = {(r["backbone"], r["height"], r["width"]): r for r in rows}
    header = ["backbone"] + [_size_label(dict(height=h, width=w)) for h, w in sizes]

    def cells(fn) -> list[list[str]]:
        table = []
        for name in names:
            line = [name]
            for h, w in sizes:
                r = by.get((name, h, w), {})
                line.append("error" if "error" in r else fn(r))
            table.append(line)
        return table

    ms = cells(lambda r: bench.fmt(r.get("median_s") and r["median_s"] * 1e3, ".0f"))
    fastest = cells(lambda r: bench.fmt(r.get("min_s") and r["min_s"] * 1e3, ".0f"))
    cpu_ms = cells(lambda r: bench.fmt(r.get("cpu_s") and r["cpu_s"] * 1e3, ".0f"))
    neck = cells(lambda r: bench.fmt("fpn_s" in r and (r["median_s"] + r["fpn_s"]) * 1e3 or None, ".0f"))
    mem = cells(lambda r: bench.fmt(r.get("peak_mb"), ".0f"))
    reference = next((r["reference"] for r in rows if "reference" in r), None)
    # a size where the reference failed has its ratios against the first backbone that ran there
    ratio = cells(
        lambda r: (
            bench.fmt(r.get("ratio"), ".2f")
            + (f" (/ {r['reference']})" if r.get("reference", reference) != reference else "")
        )
    )
    lines = [f"Forward, batch 1, float32, one thread; {cpu}.", "", "Backbone forward time (ms, median):", ""]
    lines += bench.markdown_table(header, ms, "l" + "r" * len(sizes))
    lines += ["", "Backbone forward time (ms, min over the rounds):", ""]
    lines += bench.markdown_table(header, fastest, "l" + "r" * len(sizes))
    lines += ["", "Backbone forward CPU time (ms, median; process CPU time, one thread):", ""]
    lines += bench.markdown_table(header, cpu_ms, "l" + "r" * len(sizes))
    lines += ["", f"Backbone forward time / {reference}'s (median of the per-round ratios):", ""]
    lines += bench.markdown_table(header, ratio, "l" + "r" * len(sizes))
    lines += ["", f"Backbone + FPN ({FPN_CHANNELS} channels) forward time (ms, median):", ""]
    lines += bench.markdown_table(header, neck, "l" + "r" * len(sizes))
    lines += ["", "Peak memory of one backbone forward (MiB, peak-RSS increase):", ""]
    lines += bench.markdown_table(header, mem, "l" + "r" * len(sizes))
    slope_rows = [
        [
            name,
            bench.fmt(s["time"], ".2f"),
            bench.fmt(s["time_min"], ".2f"),
            bench.fmt(s["cpu"], ".2f"),
            bench.fmt(s["time_with_fpn"], ".2f"),
            bench.fmt(s["memory"], ".2f"),
            ", ".join(s["sizes"]),
        ]
        for name, s in slope.items()
    ]
    lines += ["", "Log-log slopes against pixels (1 = linear, 2 = quadratic):", ""]
    lines += bench.markdown_table(
        ["backbone", "time (median)", "time (min)", "CPU time", "time + FPN", "memory", "over"],
        slope_rows,
        "lrrrrrl",
    )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], path: Path, cpu: str) -> Path:
    """Three log-log panels against pixels, with slope-1 and slope-2 guides: backbone forward CPU time
    (the work), wall time (median) and peak memory."""
    names = list(dict.fromkeys(r["backbone"] for r in rows))
    ok = [r for r in rows if "median_s" in r]

    def series(value) -> dict[str, list[tuple[float, float]]]:
        return {
            n: [(r["pixels"], value(r)) for r in ok if r["backbone"] == n and value(r) > 0] for n in names
        }

    panels = [
        [
            (f"forward CPU time, ms (1 thread, {cpu})", series(lambda r: r["cpu_s"] * 1e3)),
            ("forward wall time, ms (median; shared machine)", series(lambda r: r["median_s"] * 1e3)),
            ("peak memory of a forward, MiB", series(lambda r: r["peak_mb"])),
        ]
    ]
    return bench.plot_panels(
        panels, path, "pixels", "", loglog=True, slope_guides="pixels", panel_size=(5.5, 4.2), dpi=90
    )


def write_outputs(rows: list[dict], out: Path, plot_path: Path | None = None) -> dict:
    """OUT/dense_cost.{csv,json,md} and the plot (OUT/dense-cost.png unless `plot_path`); returns the
    slopes."""
    out.mkdir(parents=True, exist_ok=True)
    env = bench.environment()
    cpu = bench.cpu_name()
    slope = slopes(rows)
    bench.write_csv(rows, out / "dense_cost.csv")
    bench.write_json(dict(environment=env, rows=rows, slopes=slope), out / "dense_cost.json")
    (out / "dense_cost.md").write_text(markdown(rows, slope, cpu))
    plot(rows, plot_path or out / "dense-cost.png", cpu)
    return slope


def parse_size(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '800x1216' -> (800, 1216)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"size {text!r} must be a positive integer (a square) or HxW, e.g. 512 or 800x1216")
    h = int(parts[0])
    return h, int(parts[-1])


def check_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in BACKBONES]
    if unknown:
        raise ValueError(f"unknown backbone(s) {unknown}: choose from {list(BACKBONES)}")


__all__ = [
    "BACKBONES",
    "DEFAULT_SIZES",
    "SLOPE_RANGE",
    "check_names",
    "markdown",
    "measure",
    "parse_size",
    "plot",
    "slopes",
    "write_outputs",
]
