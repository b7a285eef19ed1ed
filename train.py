#!/usr/bin/env python3
"""Train an image classifier: NAT/DiNAT (`nat_*`, `dinat_*`) or any timm model, timm-style.

    python train.py -c configs/quickstart.yaml                      # CPU, synthetic data, ~1 min
    python train.py -c configs/nat_tiny.yaml -c configs/imagenet100.yaml --data-dir /data/imagenet
    python train.py -c configs/nat_mini.yaml --set optim.lr=5e-4 train.batch_size=64
    python train.py --resume runs/<run>/last.pth.tar                # continue a stopped run exactly
    python train.py --resume runs/<run> --epochs 20                 # a finished run, trained longer

Configs are YAML (see configs/__init__.py for every key); `--set key=value` (or bare `key=value`)
overrides any key, the timm-like flags below are shortcuts for the common ones. Every run folder
gets config.yaml (fully resolved), classes.json, summary.csv, train.log, TensorBoard events (tb/),
last.pth.tar, model_best.pth.tar and the best-k checkpoint-<epoch>.pth.tar (epochs count from 1, as
the log does). A run that fails to start leaves no folder.

Distributed (DDP; NCCL on GPU, gloo on CPU) goes through torchrun; `train.batch_size` is per process:

    torchrun --standalone --nproc_per_node 8 train.py -c configs/nat_tiny.yaml
    # multi-node: run on every node (same --rdzv-endpoint, --nnodes, a shared --rdzv-id)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --rdzv-id nat1 train.py -c configs/nat_base.yaml

SIGINT/SIGTERM (Ctrl-C, a scheduler's pre-emption) finish the current optimizer update, save
`last.pth.tar` with the exact data position and RNG states, and exit; `--resume` continues it. On CPU
with `train.deterministic=true` the resumed run ends with the same weights as an uninterrupted one.
When the epochs or the updates per epoch changed (`--epochs`, another number of processes, batch
size or accumulation), the lr schedule is rebuilt for the new settings at the run's position, and
a line says so. Resuming a finished run says there is nothing to do (exit 0).
"""

from __future__ import annotations

import argparse
import sys

from engine.train_command import train

SHORTCUTS = [  # (flags, config key, argparse kwargs): timm train.py-style flags
    (("--model",), "model.name", {}),
    (("--checkpoint", "--initial-checkpoint"), "model.checkpoint", {"help": "fine-tune from weights"}),
    (("--num-classes",), "model.num_classes", {"type": int}),
    (("--drop-path",), "model.drop_path_rate", {"type": float}),
    (("--data-dir",), "data.root", {}),
    (("--dataset",), "data.dataset", {}),
    (("--img-size",), "data.img_size", {"type": int}),
    (("-j", "--workers"), "data.workers", {"type": int}),
    (("-b", "--batch-size"), "train.batch_size", {"type": int}),
    (("--epochs",), "sched.epochs", {"type": int}),
    (("--lr",), "optim.lr", {"type": float}),
    (("--opt",), "optim.opt", {}),
    (("--weight-decay",), "optim.weight_decay", {"type": float}),
    (("--clip-grad",), "optim.clip_grad", {"type": float}),
    (("--layer-decay",), "optim.layer_decay", {"type": float}),
    (("--grad-accum-steps",), "optim.grad_accum_steps", {"type": int}),
    (("--device",), "train.device", {}),
    (("--seed",), "train.seed", {"type": int}),
    (("--output",), "train.output", {}),
    (("--experiment",), "train.experiment", {}),
    (("--amp-dtype",), "train.amp_dtype", {}),
]
SWITCHES = [  # boolean flags
    ("--amp", "train.amp", True),
    ("--no-amp", "train.amp", False),
    ("--channels-last", "train.channels_last", True),
    ("--compile", "train.compile", True),
    ("--deterministic", "train.deterministic", True),
    ("--model-ema", "ema.enabled", True),
    ("--pretrained", "model.pretrained", True),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train NAT/DiNAT or any timm model from a YAML config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python train.py -c configs/quickstart.yaml\n"
        "  python train.py -c configs/nat_tiny.yaml -c configs/imagenet100.yaml --data-dir DIR\n"
        "  python train.py --resume runs/RUN/last.pth.tar",
    )
    p.add_argument("-c", "--config", action="append", default=[], help="YAML config (repeat to compose)")
    p.add_argument(
        "--set",
        dest="set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, applied after the shortcut flags below (--set optim.lr=X wins over --lr)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=5e-4")
    p.add_argument("--resume", default=None, help="checkpoint (or run folder) to continue exactly")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for flags, key, kw in SHORTCUTS:
        p.add_argument(
            *flags,
            dest="sc_" + key,
            default=None,
            metavar=key.rsplit(".", 1)[-1].upper(),
            help=kw.pop("help", f"= --set {key}=..."),
            **kw,
        )
    for flag, key, value in SWITCHES:  # one dest per key: of --amp and --no-amp, the last given wins
        p.add_argument(
            flag, dest="sw_" + key, action="store_const", const=value, help=f"= --set {key}={value}"
        )
    return p


def overrides_from_args(args) -> list[str]:
    """Every override as KEY=VALUE: the shortcuts and switches first, then --set and bare ones."""
    out = []
    for _, key, _ in SHORTCUTS:
        v = getattr(args, "sc_" + key)
        if v is not None:
            out.append(f"{key}={v}")
    for key in dict.fromkeys(key for _, key, _ in SWITCHES):
        v = getattr(args, "sw_" + key)
        if v is not None:
            out.append(f"{key}={str(v).lower()}")
    return out + list(args.set) + list(args.overrides)


def parse_args(argv=None) -> argparse.Namespace:
    # intermixed: bare KEY=VALUE overrides may sit on either side of an option (`a=1 --epochs 2 b=2`)
    return build_parser().parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return train(args.config, overrides_from_args(args), resume=args.resume, print_config=args.print_config)


if __name__ == "__main__":
    sys.exit(main())
