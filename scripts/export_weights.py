#!/usr/bin/env python3
"""Export the weights of a checkpoint as a bare state dict, .safetensors or .pth (timm's clean_checkpoint).

    python scripts/export_weights.py runs/<run>/model_best.pth.tar nat_mini.safetensors
    python scripts/export_weights.py runs/<run> nat_mini_ema.pth --use-ema      # a run folder: its best
    python scripts/export_weights.py dinat_mini_hf.bin dinat_mini.safetensors --model dinat_mini

A training checkpoint is stripped to its model (or EMA, --use-ema) weights: no optimizer, no run state,
no DDP/compile prefixes. The output's extension picks the format: .safetensors (safetensors, no
pickle; the settings as JSON strings in its metadata) or .pth/.pt/.bin (torch.save of
{"state_dict": ..., **settings}). The settings are the model's (arch, kwargs, classes) and its eval
transform (input size, mean/std, crop): engine/checkpoint.py's SETTINGS_KEYS. The result loads
anywhere a weights file goes, with its settings: `eval.py FILE --data-dir DIR`,
`torch.hub.load(REPO, NAME, source="local", pretrained=FILE)`, and as weights: `train.py
--checkpoint FILE`, `timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=FILE))`.

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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.checkpoint import WEIGHTS_FORMATS  # noqa: E402  (after the repo path)
from engine.errors import EXIT_ERROR, first_line, user_errors  # noqa: E402
from engine.factory import export_weights  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Strip a checkpoint to its weights and write .safetensors or .pth.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("checkpoint", help="checkpoint file (or a run folder: its model_best.pth.tar)")
    p.add_argument(
        "output", help=f"weights file to write; its extension picks the format ({', '.join(WEIGHTS_FORMATS)})"
    )
    p.add_argument("--use-ema", action="store_true", help="export the EMA weights (state_dict_ema)")
    p.add_argument("--model", help="load into this timm model first (default: the checkpoint's own arch)")
    p.add_argument("--model-kwargs", default=None, help="YAML dict of timm.create_model kwargs for --model")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out, count = export_weights(args.checkpoint, args.output, args.use_ema, args.model, args.model_kwargs)
    except (*user_errors(), OSError) as e:  # OSError: the output can't be written
        print(f"error: {first_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out} ({count} tensors, {out.stat().st_size / 2**20:.1f} MiB, sha256 {digest[:8]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
