#!/usr/bin/env python3
"""Export the weights of a checkpoint as a bare state dict, .safetensors or .pth (timm's clean_checkpoint).

    python scripts/export_weights.py runs/<run>/model_best.pth.tar nat_mini.safetensors
    python scripts/export_weights.py runs/<run> nat_mini_ema.pth --use-ema      # a run folder: its best
    python scripts/export_weights.py dinat_mini_hf.bin dinat_mini.safetensors --model dinat_mini

A training checkpoint is stripped to its model (or EMA, --use-ema) weights: no optimizer, no run state,
no DDP/compile prefixes. The output's extension picks the format: .safetensors (safetensors, no
pickle) or .pth/.pt/.bin (torch.save). The result loads anywhere a weights file goes:
`eval.py FILE --model NAME`, `train.py --checkpoint FILE`, `timm.create_model(NAME, pretrained=True,
pretrained_cfg_overlay=dict(file=FILE))`, `torch.hub.load(REPO, NAME, source="local", pretrained=FILE)`.

The weights are first loaded into a model, which checks that they fit, and re-read from it, so
official NAT/DiNAT and Hugging Face (NatForImageClassification / DinatForImageClassification) files come
out in this repo's key layout: the checkpoint's own model for this repo's checkpoints, --model NAME for
other files (without it they are copied as they are).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import ConfigError  # noqa: E402
from engine.checkpoint import (  # noqa: E402  (after the repo path)
    checkpoint_num_classes,
    extract_state_dict,
    load_checkpoint,
    load_model_weights,
    save_weights,
)
from engine.errors import EXIT_ERROR, first_line, user_errors  # noqa: E402
from engine.factory import create_model  # noqa: E402

FORMATS = (".safetensors", ".pth", ".pt", ".bin")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Strip a checkpoint to its weights and write .safetensors or .pth.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("checkpoint", help="checkpoint file (or a run folder: its model_best.pth.tar)")
    p.add_argument(
        "output", help=f"weights file to write; its extension picks the format ({', '.join(FORMATS)})"
    )
    p.add_argument("--use-ema", action="store_true", help="export the EMA weights (state_dict_ema)")
    p.add_argument("--model", help="load into this timm model first (default: the checkpoint's own arch)")
    p.add_argument("--model-kwargs", default=None, help="YAML dict of timm.create_model kwargs for --model")
    return p


def export(args) -> tuple[Path, int]:
    """Write the weights; (output path, number of tensors)."""
    out = Path(args.output)
    if out.suffix not in FORMATS:
        raise ValueError(f"output '{out}' must end in one of {', '.join(FORMATS)} (the format to write)")
    ckpt_path = Path(args.checkpoint)
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / "model_best.pth.tar"
    ckpt = load_checkpoint(ckpt_path)
    sd = extract_state_dict(ckpt, ckpt_path, use_ema=args.use_ema)
    ours = isinstance(ckpt, dict) and "arch" in ckpt and "state_dict" in ckpt
    name = args.model or (ckpt["arch"] if ours else None)
    if name:
        same_arch = ours and name == ckpt["arch"]
        kwargs = (ckpt.get("model_kwargs") or {}) if same_arch else {}
        if args.model_kwargs:
            kwargs = yaml.safe_load(args.model_kwargs)
        if not isinstance(kwargs, dict):
            raise ConfigError(f"--model-kwargs must be a YAML mapping, got {args.model_kwargs!r}")
        num_classes = ckpt.get("num_classes") if same_arch else None
        model = create_model(name, num_classes, {"kwargs": kwargs})
        n = checkpoint_num_classes(model, sd)
        if num_classes is None and n is not None and n != model.num_classes:
            model.reset_classifier(n)
        load_model_weights(model, sd, ckpt_path, name, resize_head=False)
        sd = model.state_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_weights(sd, out), len(sd)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out, count = export(args)
    except (*user_errors(), ValueError, OSError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out} ({count} tensors, {out.stat().st_size / 2**20:.1f} MiB, sha256 {digest[:8]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
