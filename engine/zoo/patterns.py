"""The zoo's part 3, patterns: on a 14x14 map, which input positions a centre and a corner query read
(|d out[q] / d x|, exact for every mixer), one panel per mixer; stage-1 mixers of the trained seed-0
pathfinder runs when the accuracy part has them, else freshly built; and each trained model's effective
receptive field. Writes OUT/patterns.{json,png}.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from engine import bench
from engine.zoo.accuracy import model_input, run_dir_of, trained_model
from engine.zoo.study import PATTERN_SIDE, REPO, STAGE1, stage1_mixer


def trained_stage1_mixer(run_dir: Path, name: str) -> torch.nn.Module | None:
    """The first stage-1 block's mixer `name` of a trained run (Swin's row: its first shifted block), or
    None when there is none."""
    from models.mixers import mixer_class

    trained = trained_model(run_dir)
    if trained is None:
        return None
    blocks = trained[0].stages[0].blocks
    return next((b.attn for b in blocks if type(b.attn) is mixer_class(name)), blocks[0].attn)


def receptive_field(run_dir: Path, images: int = 16) -> dict | None:
    """Where a trained model's centre token (last stage, before pooling) reads the image, on the run's
    first val images: the share of pixels it can read at all (nonzero gradient) and the radius
    around the token's centre holding 90% of |d <token, u> / d pixels| (the effective field)."""
    import numpy as np
    from PIL import Image

    trained = trained_model(run_dir)
    if trained is None:
        return None
    model, cfg = trained
    data = cfg["data"]
    root = Path(data["root"]) if Path(data["root"]).is_absolute() else REPO / data["root"]
    every = sorted((root / "val").glob("*/*.png"))  # class folders in turn: both classes sampled
    paths = every[:: max(1, len(every) // images)][:images]
    x = model_input([np.asarray(Image.open(p).convert("RGB")) for p in paths], data).requires_grad_(True)
    tokens = model.forward_features(x)  # (B, h, w, C)
    h, w = tokens.shape[1:3]
    u = torch.randn(tokens.shape[-1], generator=torch.Generator().manual_seed(0))
    (tokens[:, h // 2, w // 2] @ u).sum().backward()
    reads = x.grad.abs().sum((0, 1))
    side = reads.shape[0]
    yy, xx = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    centre = ((h // 2 + 0.5) * side / h, (w // 2 + 0.5) * side / w)
    dist = torch.hypot(yy - centre[0], xx - centre[1]).flatten()
    order = dist.argsort()
    mass = reads.flatten()[order].cumsum(0) / reads.sum()
    return dict(
        images=len(paths),
        readable_share=float((reads > 0).float().mean()),
        radius90_px=float(dist[order][int((mass < 0.9).sum())]),
        image_px=side,
    )


def read_map(
    module: torch.nn.Module, query: tuple[int, int], dim: int, side: int = PATTERN_SIDE
) -> torch.Tensor:
    """(side, side) map of ||d <out[query], u> / d x[pos]||: where the query's output reads the input
    (u a fixed random direction, so no channel sums cancel). Exactly zero where it cannot read."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, side, side, dim, generator=gen, requires_grad=True)
    u = torch.randn(dim, generator=gen)
    module.eval()
    (module(x)[0, query[0], query[1]] @ u).backward()
    return x.grad[0].norm(dim=-1)


def patterns(mixers: list[str], out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = dict(centre=(PATTERN_SIDE // 2, PATTERN_SIDE // 2), corner=(0, 0))
    info, panels = {}, []
    for name in mixers:
        run_dir = run_dir_of(out, "pathfinder", name, 0)
        trained = trained_stage1_mixer(run_dir, name)
        module = trained if trained is not None else stage1_mixer(name)
        dim = module.qkv.in_features if hasattr(module, "qkv") else STAGE1["dim"]
        maps = {q: read_map(module, pos, dim) for q, pos in queries.items()}
        info[name] = dict(
            source="trained (pathfinder, seed 0, stage 1)" if trained is not None else "initialised",
            kernel_size=getattr(module, "kernel_size", None),
            **{f"reach_{q}": float((m > 1e-6 * m.max()).float().mean()) for q, m in maps.items()},
            model_receptive_field=receptive_field(run_dir),
        )
        # one RGB panel: centre query in red, corner query in blue, on a log scale over 4 decades so
        # that faint reads (global tokens, kernels) show; exact zeros stay black
        rgb = torch.zeros(PATTERN_SIDE, PATTERN_SIDE, 3)
        for channel, m in ((0, maps["centre"]), (2, maps["corner"])):
            rgb[..., channel] = (1 + torch.log10(m / m.max()).clamp(min=-4) / 4) * (m > 0)
        panels.append((name, rgb.numpy()))
    cols = min(6, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, rgb) in zip(axes.flat, panels, strict=False):
        ax.imshow(rgb, interpolation="nearest")
        for colour, (y, x) in zip(("white", "yellow"), queries.values(), strict=True):
            ax.plot(x, y, marker="x", color=colour, ms=5)
        tag = "" if info[name]["source"] == "initialised" else " (trained)"
        ax.set_title(f"{name}{tag}", fontsize=8)
    fig.suptitle(
        f"What a query reads on a {PATTERN_SIDE}x{PATTERN_SIDE} map (|d out[q] / d x|, log scale over "
        "4 decades): centre query red, corner query blue",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / "patterns.png", dpi=90)
    plt.close(fig)
    result = dict(side=PATTERN_SIDE, queries=queries, mixers=info)
    bench.write_json(result, out / "patterns.json")
    return result
