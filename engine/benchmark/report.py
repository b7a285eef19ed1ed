"""The whole-model benchmark's report: issue 5's targets, scaling slopes, the tables and the plots.

Works on the result rows `engine.benchmark.measure.bench_resolution` makes (one per model, device,
resolution and mode): `check_targets` (each target's ratio of medians and per-round ratios, and its
verdict), `scaling_slopes`, `print_table` / `print_targets` (the console), `markdown` (results.md),
`CSV_FIELDS` (results.csv's columns) and `plot` (the three PNGs, through `engine.bench.plot_panels`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.bench import fmt, loglog_slope, markdown_table, plot_panels, spread
from engine.bench import round_ratios as paired_ratios

# ----------------------------------------------------------------------------------------------
# Ratios, targets, scaling
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
        spread = "[IQR]" if first.get("repeats", 4) >= 4 else "[min-max]"  # bench.spread's quartiles need 4
        header = (
            f"{'model':32s} {'params':>7s} {'GMACs':>7s} {'infer img/s ' + spread:>24s} {'x':>6s} "
            f"{'train img/s ' + spread:>24s} {'x':>6s} {'train MiB':>9s} {'x':>6s}  NA backend"
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
        "img/s as median [IQR] of the repeats ([min-max] under 4 repeats), and the best repeat (noise on "
        "a shared machine only ever adds time, so best-of-N ratios are the steadier ones under load).",
    ]
    header = ["model", "params", "GMACs"] + ["infer img/s", "x", "best", "x", "train img/s", "x", "best", "x"]
    header += ["train peak MiB", "x", "NA backend"]
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
            "peak memory (MiB)",
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
