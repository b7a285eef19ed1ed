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

`name@backend` forces the NA backend for that row (e.g. `nat_tiny@naive`, the paper's gather);
`name+compiled` torch.compiles that row's model, so eager and compiled run side by side in one run
(`--models nat_tiny nat_tiny+compiled`; compiling looked 10-15% faster across separate runs than side
by side in one, for NAT-T: docs/benchmarks.md, torch.compile).
Writes results.csv (one row per model/device/resolution/mode), results.json (the rows plus
device/torch/timm/natten versions, load, targets, scaling slopes) and three PNG plots to --out.
A model that fails (to build, or out of memory) gets its rows' `error`, the others are measured, and
the exit status is 1.

Memory: on CUDA, `torch.cuda.max_memory_allocated` during one step minus what was allocated
before it, plus what of this model lives across steps (parameters, gradients, buffers, optimizer
state, inputs): what max_memory_allocated reads with this model alone on the GPU. On CPU, the
peak-RSS increase during one step (peak reset through /proc/self/clear_refs after a malloc_trim):
activations and gradients, not weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine import benchmark  # noqa: E402
from engine.bench import positive_int  # noqa: E402
from engine.benchmark import DEFAULT_BASELINES, DEFAULT_MODELS, DEVICE_DEFAULTS  # noqa: E402
from engine.benchmark.measure import AMP_DTYPES  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models",
        nargs="+",
        help=f"timm names, optionally name@backend and/or name+compiled (default: {DEFAULT_MODELS})",
    )
    p.add_argument(
        "--baselines",
        nargs="+",
        help=f"ratios in the table are against the first of these that runs (default: {DEFAULT_BASELINES}, "
        "else the first model)",
    )
    p.add_argument(
        "--devices",
        nargs="+",
        default=["auto"],
        choices=["auto", "cpu", "cuda"],
        help="auto: the CPU, plus the GPU when there is one",
    )
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument(
        "--cpu-res", type=positive_int, nargs="+", help=f"default {DEVICE_DEFAULTS['cpu']['resolutions']}"
    )
    p.add_argument(
        "--gpu-res", type=positive_int, nargs="+", help=f"default {DEVICE_DEFAULTS['cuda']['resolutions']}"
    )
    p.add_argument("--cpu-batch", type=positive_int, help="batch at 224 on the CPU (default 8)")
    p.add_argument("--gpu-batch", type=positive_int, help="batch at 224 on the GPU (default 256)")
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
    p.add_argument("--iters", type=positive_int, help="steps per timed repeat (default cpu 1, cuda 5)")
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
    p.add_argument(
        "--threads", type=positive_int, help="CPU threads (default: the cores this process may use)"
    )
    p.add_argument("--model-kwargs", type=json.loads, default={}, help='JSON {"timm_name": {kwarg: value}}')
    p.add_argument("--out", type=Path, default=REPO / "output" / "benchmark")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also torch.profiler one step per model/mode at each device's first resolution "
        "(profile_*.txt, and a summary in the JSON)",
    )
    p.add_argument(
        "--profile-steps", type=positive_int, default=1, help="steps per profile (times are per step)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI check: tiny variants of nat_mini / swin / vit at 32 and 64 px, 2 repeats; seconds, "
        "numbers meaningless",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return benchmark.run(parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
