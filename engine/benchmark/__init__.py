"""The whole-model benchmark behind scripts/benchmark.py: NAT / DiNAT against Swin, ConvNeXt and
ViT, side by side in one run (what is measured, and how, is the script's --help).

`run(args)` is the script's command: the plan per device (`device_plan`: resolutions, batch, repeats,
precision, from `DEVICE_DEFAULTS` or `QUICK` and the arguments), every resolution measured by
`engine.benchmark.measure`, then targets, tables, result files and plots by
`engine.benchmark.report`. Timing, memory, statistics and file writing are `engine.bench`'s.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from engine.bench import (
    device_name,
    environment,
    failed_rows,
    load_average,
    memory_kind,
    usable_cpus,
    writable_folder,
    write_csv,
    write_json,
)
from engine.benchmark.measure import (
    Settings,
    bench_resolution,
    model_flops,
    parse_models,
    profile_models,
    scaled_batch,
)
from engine.benchmark.report import (
    CSV_FIELDS,
    check_targets,
    markdown,
    plot,
    print_table,
    print_targets,
    scaling_slopes,
)

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


def pick_baseline(baselines: list[str] | None, labels: list[str]) -> str:
    """The model the ratios are against: the first of `baselines` that runs. Asked for (`--baselines`)
    and none runs: an error; the default baselines (None) fall back to the first model, and say so."""
    found = next((b for b in baselines or DEFAULT_BASELINES if b in labels), None)
    if found:
        return found
    if baselines:
        raise SystemExit(
            f"error: no --baselines model ({' '.join(baselines)}) is among the models run: {labels}"
        )
    print(f"note: no default baseline ({' '.join(DEFAULT_BASELINES)}) is run; ratios are vs {labels[0]}")
    return labels[0]


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


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """The benchmark (`args`: scripts/benchmark.py's arguments; `argv`, as given, goes in the
    results' `command`): once the result files are written, 0, or 1 when a measurement failed (its
    row's `error`); a bad argument exits (SystemExit)."""
    model_kwargs = dict(QUICK_KWARGS) if args.quick else {}
    model_kwargs.update(args.model_kwargs)
    names = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    specs = parse_models(names, model_kwargs, compile_all=args.compile)
    baseline = pick_baseline(args.baselines, [s.label for s in specs])
    plan = device_plan(args)

    torch.manual_seed(args.seed)
    gc.freeze()  # imports' objects out of the collector's way: each memory step starts with gc.collect()
    if args.quick and not args.threads:
        args.threads = 1  # a CI check, not a measurement: one thread is steadiest on a loaded runner
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        torch.set_num_threads(usable_cpus())
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if problem := writable_folder(args.out):
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
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
    return failed_rows(rows, lambda r: f"{r['model']} {r['mode']} {r['resolution']}px on {r['device']}")
