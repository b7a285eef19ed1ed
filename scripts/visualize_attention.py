"""Draw NAT / DiNAT neighborhood-attention weights of chosen queries over the input image.

    python scripts/visualize_attention.py --model dinat_mini --checkpoint dinat_mini_in1k_224.pth \\
        --image cat.jpg --layers 0.0 0.1 --heads 0 1 --queries 112,112 0,0 --out attention.png

One panel per (layer, query, head): the image, each key of the query's window tinted by its weight
(one cell per feature-map position, so the window, its dilation and its clamping at the borders
show), the query marked with a cross. Layers are `STAGE.BLOCK` (or `stages.S.blocks.B`); queries
are `X,Y` image pixels. The image goes through the checkpoint's own eval transform (its image size,
mean/std and crop: this repo's training checkpoints and exported weights carry them; other files
get the model's defaults; --img-size overrides the size). Without --image a synthetic image is
drawn; without --checkpoint the model has random weights (say so in the title). The weights come
from the exact gather path (`NeighborhoodAttention2D.attention_weights`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
from PIL import Image  # noqa: E402
from timm.data import create_transform  # noqa: E402

from data.errors import IMAGE_READ_ERRORS  # noqa: E402
from engine.checkpoint import checkpoint_settings, extract_state_dict, load_checkpoint  # noqa: E402
from engine.errors import EXIT_ERROR, first_line, user_errors  # noqa: E402
from engine.factory import check_model_name, checkpoint_data_config, create_model_for_checkpoint  # noqa: E402
from models.layers import NeighborhoodAttention2D  # noqa: E402
from models.layers.backends.windows import window_indices  # noqa: E402


class UserError(ValueError):
    """A bad argument: printed as one `error:` line, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nat_mini", help="NAT / DiNAT model name (default nat_mini)")
    p.add_argument(
        "--checkpoint", help="weights: this repo's, timm's or official NAT/DiNAT (.pth/.safetensors)"
    )
    p.add_argument("--image", help="input image (default: a synthetic one)")
    p.add_argument("--img-size", type=int, help="input size (default: the model's)")
    p.add_argument("--layers", nargs="+", default=["0.0", "0.1"], help="STAGE.BLOCK ... (default 0.0 0.1)")
    p.add_argument("--heads", nargs="+", type=int, default=[0], help="head indices (default 0)")
    p.add_argument("--queries", nargs="+", default=None, help="X,Y image pixels (default: centre and corner)")
    p.add_argument("--out", default="attention.png", help="PNG to write")
    return p


def load_model(name: str, checkpoint: str | None) -> tuple[torch.nn.Module, dict | None]:
    """(the model, the checkpoint's eval transform settings or None)."""
    check_model_name(name)
    if not name.startswith(("nat_", "dinat_")):
        raise UserError(
            f"--model {name!r} is not a NAT/DiNAT model; choose one of {timm.list_models('*nat_*')}"
        )
    if not checkpoint:
        return timm.create_model(name).eval(), None
    ckpt = load_checkpoint(checkpoint)  # .pth (weights_only) or .safetensors; ours, timm, official, HF
    sd = extract_state_dict(ckpt, checkpoint)
    settings = checkpoint_settings(ckpt)
    model = create_model_for_checkpoint(name, ckpt, sd, checkpoint)[0].eval()
    return model, settings.get("data_config") if settings.get("arch") == name else None


def synthetic_image(size: int) -> Image.Image:
    """A gradient with a disc, a square and a stripe: structure for attention to find."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.2 + 0.5 * x, 0.3 + 0.4 * y, 0.6 - 0.3 * x], -1)
    img[(x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.04] = (0.9, 0.2, 0.1)
    img[(abs(x - 0.72) < 0.12) & (abs(y - 0.7) < 0.12)] = (0.1, 0.5, 0.9)
    img[abs(y - 0.15) < 0.03] = (0.95, 0.95, 0.2)
    return Image.fromarray((img * 255).astype(np.uint8))


def parse_layer(model: torch.nn.Module, text: str) -> tuple[str, NeighborhoodAttention2D]:
    name = text if text.startswith("stages.") else "stages.{}.blocks.{}".format(*(text.split(".") + [""])[:2])
    module = dict(model.named_modules()).get(name)
    attn = getattr(module, "attn", None)
    if not isinstance(attn, NeighborhoodAttention2D):
        depths = [len(s.blocks) for s in model.stages]
        raise UserError(f"--layers {text!r}: no NA block {name}; blocks per stage are {depths} (use S.B)")
    return name, attn


def parse_query(text: str, height: int, width: int) -> tuple[int, int]:
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--queries {text!r}: give X,Y image pixels, e.g. 112,112") from None
    if not (0 <= x < width and 0 <= y < height):
        raise UserError(f"--queries {text!r}: outside the {width}x{height} (WxH) input")
    return x, y


def attention_map(
    attn: NeighborhoodAttention2D, x: torch.Tensor, row: int, col: int, head: int
) -> np.ndarray:
    """`(H, W)` weights of query (row, col) of the block's input map x `(1, H, W, C)` over its keys."""
    H, W = x.shape[1:3]
    weights = attn.attention_weights(x)[0, row, col, head]  # (k, k)
    window = attn.window_size  # maps smaller than the window are padded: windows of the padded map
    rows = window_indices(max(H, window), attn.kernel_size, attn.dilation)[row]
    cols = window_indices(max(W, window), attn.kernel_size, attn.dilation)[col]
    full = torch.zeros(max(H, window), max(W, window))
    full[rows[:, None], cols[None, :]] = weights
    return full[:H, :W].numpy()  # keys in the padding (zero tokens) are not on the image


@torch.no_grad()
def attention_panels(model, x: torch.Tensor, layers, queries, heads) -> list[tuple[str, np.ndarray, tuple]]:
    """(title, `(H, W)` weights, (x, y) px) for every layer, query and head: each query pixel of the
    `(1, 3, height, width)` input `x` maps to its token on the layer's own (coarser) map."""
    height, width = x.shape[2:]
    inputs = {}
    hooks = [
        attn.register_forward_hook(lambda m, a, out, name=name: inputs.__setitem__(name, a[0]))
        for name, attn in layers
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    panels = []
    for name, attn in layers:
        feat = inputs[name]
        H, W = feat.shape[1:3]
        for qx, qy in queries:
            row, col = qy * H // height, qx * W // width
            for head in heads:
                title = f"{name}\nk={attn.kernel_size} d={attn.dilation} head {head}, query ({qx},{qy})"
                panels.append((title, attention_map(attn, feat, row, col, head), (qx, qy)))
    return panels


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not Path(args.out).resolve().parent.is_dir():
            raise UserError(f"--out {args.out!r}: its folder does not exist; create it first")
        model, checkpoint_dc = load_model(args.model, args.checkpoint)
        config = checkpoint_data_config(model, checkpoint_dc, {"img_size": args.img_size})
        height, width = config["input_size"][1:]
        if args.image:
            try:
                image = Image.open(args.image).convert("RGB")
            except IMAGE_READ_ERRORS as e:
                raise UserError(f"cannot read image {args.image!r}: {e}") from None
        else:
            image = synthetic_image(max(height, width))
        transform = create_transform(**config)
        x = transform(image).unsqueeze(0)
        shown = x[0].permute(1, 2, 0).numpy() * np.array(config["std"]) + np.array(config["mean"])
        layers = [parse_layer(model, text) for text in args.layers]
        default_queries = [f"{width // 2},{height // 2}", "0,0"]
        queries = [parse_query(q, height, width) for q in (args.queries or default_queries)]
        for head in args.heads:
            bad = [name for name, attn in layers if not 0 <= head < attn.num_heads]
            if bad:
                raise UserError(f"--heads {head}: {bad[0]} has {dict(layers)[bad[0]].num_heads} heads")
    except (*user_errors(), UserError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return EXIT_ERROR

    panels = attention_panels(model, x, layers, queries, args.heads)
    cols = len(queries) * len(args.heads)
    fig, axes = plt.subplots(len(layers), cols, figsize=(3.2 * cols, 3.4 * len(layers)), squeeze=False)
    for ax, (title, weights, (qx, qy)) in zip(axes.flat, panels, strict=True):
        ax.imshow(np.clip(shown, 0, 1), extent=(0, width, height, 0))
        # nearest-neighbour cells: one per feature-map position, the window's shape stays visible
        tint = np.ma.masked_equal(weights, 0)
        ax.imshow(tint, cmap="inferno", alpha=0.75, extent=(0, width, height, 0), interpolation="nearest")
        ax.plot(qx, qy, marker="+", color="cyan", markersize=14, markeredgewidth=2)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    weights_kind = Path(args.checkpoint).name if args.checkpoint else "random weights (no --checkpoint)"
    title = f"{args.model}: neighborhood attention weights ({weights_kind}; {width}x{height} px input)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(
        f"wrote {args.out}: {len(layers)} layer(s) x {len(queries)} query(ies) x {len(args.heads)} head(s), "
        f"{width}x{height} px input"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
