"""Export a NAT / DiNAT (or any timm) model to ONNX, checked against eager PyTorch with onnxruntime.

    python scripts/export.py nat_mini --out nat_mini.onnx
    python scripts/export.py dinat_mini --checkpoint dinat_mini_in1k_224.pth --out dinat_mini.onnx
    python scripts/export.py nat_mini --checkpoint runs/<run>/model_best.pth.tar --out nat_mini.onnx
    python scripts/export.py nat_mini --out nat_mini.onnx --img-size 224 320      # H W: non-square

The ONNX file has a dynamic batch, height and width (axes named `batch`, `height`, `width`; the output's
`batch`); it is traced at the export size, raised where a feature map would be 1 x 1 there (torch.export
fixes such a dimension, and the file would then fail at every other size). Neighborhood attention is
lowered to standard ONNX ops (the `naive` backend: window key indices from arithmetic on the map's
shape, Gather, MatMul, Softmax), so it is exact NA (clamped windows, dilation, RPB) at any size, with no
custom op. The script then runs the file with onnxruntime on CPU at the export size and at a second
size, fails (exit 1) if either differs from eager by more than 1e-4 (relative to the largest logit), and
prints both throughputs. Checkpoints: this repo's (its model kwargs and classes come with it), timm's,
official NAT/DiNAT or Hugging Face ones, .pth or .safetensors (engine.checkpoint's loader). Bare weights
files (.safetensors / .pth) come from scripts/export_weights.py.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.bench import positive_int  # noqa: E402
from engine.checkpoint import checkpoint_settings, extract_state_dict, load_checkpoint  # noqa: E402
from engine.errors import EXIT_ERROR, first_line, user_errors  # noqa: E402
from engine.factory import (  # noqa: E402
    check_model_name,
    checkpoint_data_config,
    create_model,
    create_model_for_checkpoint,
    parse_model_kwargs,
)
from models.layers import use_backend  # noqa: E402

MAX_RELATIVE_ERROR = 1e-4
# torch.onnx's exporter (dynamo=True) writes opset 18 or newer; asked for less, it writes 18 anyway
MIN_OPSET = 18


class UserError(ValueError):
    """A bad argument: printed as one `error:` line, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="timm model name, e.g. nat_mini, dinat_large_384")
    p.add_argument("--out", required=True, help="ONNX file to write (.onnx)")
    p.add_argument("--checkpoint", help="weights (.pth/.pth.tar/.safetensors): ours, timm's, official, HF")
    p.add_argument(
        "--img-size",
        type=int,
        nargs="+",
        metavar="N",
        help="export / check size: N or H W (default: the model's)",
    )
    p.add_argument(
        "--check-size",
        type=int,
        nargs="+",
        metavar="N",
        help="second size checked: N or H W (default: half + 8, or + 8 where that is the export size)",
    )
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the checkpoint's)")
    p.add_argument("--model-kwargs", help="YAML dict of timm.create_model kwargs, e.g. '{kernel_size: 5}'")
    p.add_argument(
        "--bench-batch", type=positive_int, default=4, help="batch size of the throughput measurement"
    )
    p.add_argument("--bench-iters", type=positive_int, default=3, help="timed iterations per runtime")
    p.add_argument("--opset", type=int, help=f"ONNX opset, >= {MIN_OPSET} (default: the exporter's)")
    return p


def load_model(args) -> tuple[torch.nn.Module, tuple[int, int]]:
    """(the model, with the checkpoint's weights (and, unless given, its kwargs and classes); its input
    size: the checkpoint's eval size where it carries one, else the model's default)."""
    check_model_name(args.model)
    if not args.checkpoint:
        kwargs = parse_model_kwargs(args.model_kwargs)
        model = create_model(args.model, args.num_classes, {"kwargs": kwargs}).eval()
        return model, tuple(model.pretrained_cfg["input_size"][1:])
    ckpt = load_checkpoint(args.checkpoint)
    sd = extract_state_dict(ckpt, args.checkpoint)
    model, _ = create_model_for_checkpoint(
        args.model, ckpt, sd, args.checkpoint, model_kwargs=args.model_kwargs, num_classes=args.num_classes
    )
    settings = checkpoint_settings(ckpt)
    data_config = checkpoint_data_config(
        model, settings.get("data_config") if settings.get("arch") == args.model else None
    )
    return model.eval(), tuple(data_config["input_size"][1:])


def image_size(values: list[int] | None, flag: str) -> tuple[int, int] | None:
    """--img-size / --check-size: N (square) or H W."""
    if values is None:
        return None
    if len(values) > 2:
        raise UserError(f"{flag} takes N or H W, got {len(values)} numbers")
    h, w = values * 2 if len(values) == 1 else values
    if min(h, w) < 8:
        raise UserError(f"{flag} must be >= 8, got {' '.join(map(str, values))}")
    return h, w


AXIS_NAMES = {0: "batch", 2: "height", 3: "width"}


def name_dynamic_axes(path: Path) -> None:
    """The exporter names dynamic axes by their symbols (s77, s53, ...): name them batch / height /
    width, in every shape of the graph (also inside expressions such as `((s53 - 1)//2) + 1`)."""
    import onnx

    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    symbols = {dims[i].dim_param: name for i, name in AXIS_NAMES.items() if dims[i].dim_param}
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, symbols)) + r")\b")
    infos = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for info in infos:
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param and symbols:
                dim.dim_param = pattern.sub(lambda m: symbols[m.group(1)], dim.dim_param)
    onnx.save(model, str(path))


def trace_size(model: torch.nn.Module, img_size: tuple[int, int]) -> tuple[int, int]:
    """The example input's size: `img_size`, raised where needed so that every feature map is at least
    2 x 2. torch.export fixes a dimension that is 1 in the example (its 0/1 specialization): traced at
    32 px, a NAT's last 1 x 1 map made a graph that failed at every other size."""
    info = getattr(model, "feature_info", None)
    stride = (
        info[-1].get("reduction", 32)
        if isinstance(info, list) and info and isinstance(info[-1], dict)
        else 32
    )
    return max(img_size[0], 2 * stride), max(img_size[1], 2 * stride)


def export_onnx(model: torch.nn.Module, path: Path, img_size: tuple[int, int], opset: int | None) -> None:
    x = torch.randn(2, 3, *trace_size(model, img_size))
    dynamic = torch.export.Dim.DYNAMIC
    with use_backend("naive"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and opset chatter
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: dynamic, 2: dynamic, 3: dynamic}},
            opset_version=opset,
            verbose=False,
        )
    program.save(str(path))
    name_dynamic_axes(path)


def images_per_second(run, batch: torch.Tensor, iters: int) -> float:
    run(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        run(batch)
    return batch.shape[0] * iters / (time.perf_counter() - start)


def check_onnx(
    model: torch.nn.Module, path: Path, sizes: list[tuple[int, int]], bench_batch: int, bench_iters: int
) -> bool:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: constant-folding notes are noise
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run_onnx(x: torch.Tensor):
        return session.run(None, {input_name: x.numpy()})[0]

    ok = True
    for (h, w), batch in zip(sizes, (2, 1), strict=True):
        x = torch.randn(batch, 3, h, w)
        with torch.inference_mode():
            want = model(x)
        try:
            got = torch.from_numpy(run_onnx(x))
        except Exception as e:  # noqa: BLE001 (onnxruntime's own exception types: a graph that can't run)
            print(f"onnxruntime at {batch}x3x{h}x{w}: {first_line(e)[:300]} FAIL")
            ok = False
            continue
        error = ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()
        verdict = "ok" if error <= MAX_RELATIVE_ERROR else f"FAIL (> {MAX_RELATIVE_ERROR:g})"
        print(f"onnxruntime vs eager at {batch}x3x{h}x{w}: max relative error {error:.2e} {verdict}")
        ok &= error <= MAX_RELATIVE_ERROR

    x = torch.randn(bench_batch, 3, *sizes[0])
    with torch.inference_mode():
        eager = images_per_second(model, x, bench_iters)
    onnx = images_per_second(run_onnx, x, bench_iters)
    print(
        f"throughput at {bench_batch}x3x{sizes[0][0]}x{sizes[0][1]}, {torch.get_num_threads()} threads: "
        f"onnxruntime {onnx:.1f} img/s, eager {eager:.1f} img/s ({onnx / eager:.2f}x)"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if out.suffix != ".onnx":
            hint = (
                "; bare weights: scripts/export_weights.py" if out.suffix in (".safetensors", ".pth") else ""
            )
            raise UserError(f"--out {args.out!r} must end in .onnx{hint}")
        if not out.parent.is_dir():
            raise UserError(f"--out {args.out!r}: folder {str(out.parent)!r} does not exist; create it first")
        if out.is_dir():
            raise UserError(f"--out {args.out!r} is a folder; give a file name ending in .onnx")
        if args.opset is not None and args.opset < MIN_OPSET:
            raise UserError(f"--opset {args.opset}: torch.onnx's exporter writes opset {MIN_OPSET} or newer")
        img_size = image_size(args.img_size, "--img-size")
        check_size = image_size(args.check_size, "--check-size")
        model, default_size = load_model(args)
        img_size = img_size or default_size
        half = (img_size[0] // 2 + 8, img_size[1] // 2 + 8)
        check_size = check_size or (half if half != img_size else (img_size[0] + 8, img_size[1] + 8))
    except (*user_errors(), UserError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    start = time.perf_counter()
    export_onnx(model, out, img_size, args.opset)
    seconds = time.perf_counter() - start
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {seconds:.0f} s")
    if not check_onnx(model, out, [img_size, check_size], args.bench_batch, args.bench_iters):
        print(f"error: {out} does not reproduce the eager model (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
