"""NAT / DiNAT outside eager PyTorch: FX, TorchScript, attention weights, ONNX, weight formats.

References: the eager model (traced / scripted / exported graphs must reproduce it), the float64
query-by-query NA of tests/na_reference.py (attention weights), onnxruntime (ONNX files).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from na_reference import reference_attention_maps
from timm.models import FeatureGraphNet
from torchvision.models.feature_extraction import create_feature_extractor

from models.layers import NeighborhoodAttention2D, neighborhood_attention_weights
from models.layers.backends.windows import window_indices
from models.mixers import MIXERS
from models.nat import NAT

MINIS = ["nat_mini", "dinat_mini"]


def _mini(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, drop_path_rate=0.0, **kwargs).eval()


# ------------------------------------------------------------------------------------------------
# FX


@pytest.mark.parametrize("name", MINIS)
def test_fx_feature_extractor_equals_eager_and_trains(name):
    model = _mini(name)
    # 40 px: stage maps 10/5/3/2, smaller than DiNAT's dilated windows (padding) and not even
    x = torch.randn(2, 3, 40, 40)
    extractor = create_feature_extractor(
        model, return_nodes={"stages.1": "stage1", "stages.3": "stage3", "head.fc": "logits"}
    )
    assert not model.training and not extractor.training  # modes restored after the train/eval traces
    with torch.no_grad():
        out = extractor(x)
        logits = model(x)
        stage1, stage3 = model.forward_intermediates(
            x, indices=(1, 3), output_fmt="NHWC", intermediates_only=True
        )
    torch.testing.assert_close(out["logits"], logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["stage1"], stage1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["stage3"], stage3, rtol=1e-6, atol=1e-6)

    # backward through the traced (train-mode) graph reaches every parameter, as eager's does
    model.train()
    extractor.train()
    model(x).square().mean().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    extractor(x)["logits"].square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", MINIS)
def test_timm_fx_feature_path_equals_forward_intermediates(name):
    model = _mini(name)
    features = FeatureGraphNet(model, out_indices=(0, 2, 3))
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        got = features(x)
        want = model.forward_intermediates(x, indices=(0, 2, 3), output_fmt="NHWC", intermediates_only=True)
    assert len(got) == 3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("feature_cls", ["fx", "hook"])
def test_the_dense_layouts_stage_norms_refuse_features_that_would_skip_them(feature_cls):
    """fx / hook features come from forward(), which runs no inner stage norm: with stage_norms they
    failed on a missing node, or gave one map of four. One error names the way that works."""
    with pytest.raises(ValueError, match="stage_norms=True: the stage norms run in forward_intermediates"):
        timm.create_model("nat_mini", features_only=True, feature_cls=feature_cls, stage_norms=True)
    getter = timm.create_model("nat_mini", features_only=True, stage_norms=True).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        want = getter.model.forward_intermediates(x, intermediates_only=True)
        assert [torch.equal(g, w) for g, w in zip(getter(x), want, strict=True)] == [True] * 4


def test_fx_traces_every_zoo_mixer_in_a_nat():
    # the zoo's mixers branch on map sizes: NATBlock hands them to FX as one (eager) call each
    x = torch.randn(2, 3, 32, 24)
    for name in sorted(MIXERS):
        torch.manual_seed(0)
        model = NAT(embed_dim=16, depths=(1, 1), num_heads=(1, 2), kernel_size=3, mixer=name, num_classes=5)
        extractor = create_feature_extractor(
            model.eval(), return_nodes={"stages.0": "stage0", "head.fc": "out"}
        )
        with torch.no_grad():
            out = extractor(x)
            want = model.forward_intermediates(x, indices=(0,), output_fmt="NHWC", intermediates_only=True)
            torch.testing.assert_close(out["out"], model(x), rtol=1e-6, atol=1e-6, msg=name)
            torch.testing.assert_close(out["stage0"], want[0], rtol=1e-6, atol=1e-6, msg=name)
        extractor.train()(x)["out"].sum().backward()
        assert all(p.grad is not None for p in model.stages[0].blocks[0].attn.parameters()), name


# ------------------------------------------------------------------------------------------------
# TorchScript


@pytest.mark.parametrize("name", MINIS)
def test_torchscript_equals_eager_after_save_and_load(name, tmp_path):
    model = _mini(name)
    torch.jit.save(torch.jit.script(model), tmp_path / "model.pt")
    scripted = torch.jit.load(tmp_path / "model.pt")
    for size in ((64, 64), (40, 56)):  # the second pads DiNAT's dilated windows in every stage
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Attention weights


def _dense(weights: torch.Tensor, kernel_size: int, dilation: int, map_size=None) -> torch.Tensor:
    """`(B, Hq, Wq, heads, k, k)` window weights -> `(B, Hq, Wq, heads, H, W)` maps (zero off-window);
    the windows are those of an `H x W` map (`map_size`, default the queries' `Hq x Wq`)."""
    B, Hq, Wq, heads = weights.shape[:4]
    H, W = map_size or (Hq, Wq)
    rows = window_indices(H, kernel_size, dilation)
    cols = window_indices(W, kernel_size, dilation)
    maps = torch.zeros(B, Hq, Wq, heads, H, W, dtype=weights.dtype)
    for i in range(Hq):
        for j in range(Wq):
            maps[:, i, j, :, rows[i][:, None], cols[j][None, :]] = weights[:, i, j]
    return maps


@pytest.mark.parametrize("case", [(9, 11, 3, 1), (10, 13, 3, 3), (7, 7, 7, 1)], ids=str)
def test_attention_weights_equal_float64_reference(case):
    height, width, kernel_size, dilation = case
    q, k, v = (torch.randn(2, height, width, 2, 4, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(2, 2 * kernel_size - 1, 2 * kernel_size - 1, dtype=torch.float64)
    weights = neighborhood_attention_weights(q, k, v, kernel_size, dilation, rpb=rpb, scale=0.3)
    assert weights.shape == (2, height, width, 2, kernel_size, kernel_size)
    want = reference_attention_maps(q, k, kernel_size, dilation, rpb, scale=0.3)
    torch.testing.assert_close(_dense(weights, kernel_size, dilation), want, rtol=1e-10, atol=1e-12)


def test_module_attention_weights_on_a_padded_map():
    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(8, 2, kernel_size=3, dilation=3).double()
    x = torch.randn(1, 5, 11, 8, dtype=torch.float64)  # height 5 < window 9: padded to 9, queries cropped
    weights = attn.attention_weights(x)
    assert weights.shape == (1, 5, 11, 2, 3, 3)
    qkv = attn.qkv(torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 4))).unflatten(-1, (3, 2, 4))
    want = reference_attention_maps(qkv[..., 0, :, :], qkv[..., 1, :, :], 3, 3, attn.rpb, attn.scale)
    torch.testing.assert_close(_dense(weights, 3, 3, map_size=(9, 11)), want[:, :5], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# ONNX (scripts/export.py)

ROOT = Path(__file__).resolve().parents[1]
# one stage: an NA block and a dilated one (kernel 3, dilation 4: window 12, padded below that)
DEMO_NAT_KWARGS = dict(
    embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8], mlp_ratio=3.0, kernel_size=[7, 3, 3]
)
TINY_DINAT = dict(
    embed_dim=16, depths=(2,), num_heads=(2,), kernel_size=3, dilations=((1, 4),), num_classes=5
)


def _export(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "export.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


# ~12 s on a quiet 2-core Xeon (tracing with symbolic H, W dominates): in CI, the one onnxruntime check
def test_onnx_export_runs_exact_na_at_any_size(tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = timm.create_model("dinat_mini", **TINY_DINAT).eval()
    with torch.no_grad():  # RPB and head away from their init, so a dropped or misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("rpb") or name.startswith("head"):
                p.normal_(0, 0.5)
    weights = tmp_path / "tiny.safetensors"  # through engine's one checkpoint loader
    safetensors.torch.save_file(model.state_dict(), weights)
    result = _export(
        "dinat_mini", "--out", str(tmp_path / "tiny.onnx"), "--checkpoint", str(weights),
        "--img-size", "64", "48", "--bench-iters", "1", "--model-kwargs", json.dumps(TINY_DINAT),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dynamo=False" not in result.stderr  # the fixed-size warning is the legacy exporter's only
    assert result.stdout.count(" ok") == 2 and "onnxruntime" in result.stdout and "img/s" in result.stdout
    assert "at 2x3x64x48:" in result.stdout and "at 1x3x40x32:" in result.stdout  # H W; check: half + 8

    session = onnxruntime.InferenceSession(str(tmp_path / "tiny.onnx"), providers=["CPUExecutionProvider"])
    # a third size and batch, non-square; 20 px: a 5x5 map, smaller than the dilated window
    for shape in ((3, 3, 44, 28), (1, 3, 20, 20)):
        x = torch.randn(shape)
        with torch.no_grad():
            want = model(x)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    graph = onnx.load(str(tmp_path / "tiny.onnx")).graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert dims(graph.input[0]) == ["batch", 3, "height", "width"] and dims(graph.output[0]) == ["batch", 5]
    ops = {node.op_type for node in graph.node}  # standard ops only: no custom domain
    assert {"Softmax", "MatMul"} <= ops and {node.domain for node in graph.node} <= {"", "ai.onnx"}


def test_onnx_exported_at_a_size_with_a_1x1_last_map_runs_at_other_sizes(tmp_path):
    """The demo NAT at 16 px has a 1 x 1 last map; torch.export fixes a dimension that is 1 in the
    example, so a file traced there held its padded 3 x 3 map as constants and failed at 40 x 24
    (onnxruntime: Reshape). The trace now runs at a size whose maps are all >= 2 x 2."""
    pytest.importorskip("onnxruntime")
    kwargs = dict(DEMO_NAT_KWARGS, num_classes=5)
    result = _export(
        "nat_mini", "--out", str(tmp_path / "demo.onnx"), "--img-size", "16", "--check-size", "40", "24",
        "--bench-iters", "1", "--model-kwargs", json.dumps(kwargs),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (
        "at 2x3x16x16: max relative error" in result.stdout
        and "at 1x3x40x24: max relative error" in result.stdout
    )
    assert result.stdout.count(" ok") == 2


def test_a_saved_torch_export_program_loads_and_runs_in_a_fresh_process(tmp_path):
    """torch.export at a static shape records plain ATen ops (`auto` runs `naive` while exporting):
    the C++ kernel's custom op made the saved program unloadable in a process that had not built it."""
    torch.manual_seed(0)
    model = timm.create_model("dinat_mini", **TINY_DINAT).eval()
    x = torch.randn(1, 3, 40, 24)  # a 10 x 6 map: the dilated window (12) pads it
    program = torch.export.export(model, (x,))
    assert not [n for n in program.graph.nodes if "nat_na2d" in str(n.target)]
    torch.export.save(program, tmp_path / "dinat.pt2")
    torch.save({"x": x, "want": model(x).detach()}, tmp_path / "io.pt")
    run = (
        "import sys, torch, models; io = torch.load(sys.argv[2]); "
        "got = torch.export.load(sys.argv[1]).module()(io['x']); "
        "torch.testing.assert_close(got, io['want'], rtol=1e-5, atol=1e-6); print('ok')"
    )
    p = subprocess.run(
        [sys.executable, "-c", run, str(tmp_path / "dinat.pt2"), str(tmp_path / "io.pt")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_export_rejects_bad_arguments_with_one_line(tmp_path):
    result = _export("nat_mini", "--out", str(tmp_path / "model.txt"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: --out") and "export_weights.py" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "folder.onnx").mkdir()
    for args, start in [
        (["--out", str(tmp_path / "folder.onnx")], "error: --out"),  # was IsADirectoryError after exporting
        (["--out", str(tmp_path / "m.onnx"), "--opset", "13"], "error: --opset 13"),  # was opset 18, silently
    ]:
        result = _export("nat_mini", *args)
        assert result.returncode == 2 and result.stderr.startswith(start), result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1
    result = _export("nat_mini", "--out", str(tmp_path / "m.onnx"), "--bench-iters", "0")
    assert result.returncode == 2 and "--bench-iters: must be >= 1" in result.stderr


# ------------------------------------------------------------------------------------------------
# Attention maps (scripts/visualize_attention.py)


def test_visualize_attention_writes_a_png_and_rejects_bad_layers(tmp_path):
    from PIL import Image

    script = str(ROOT / "scripts" / "visualize_attention.py")
    args = ["--model", "dinat_mini", "--img-size", "64", "--queries", "0,0", "40,20", "--heads", "0", "1"]
    out = tmp_path / "attention.png"
    result = subprocess.run(
        [sys.executable, script, *args, "--layers", "0.0", "0.1", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(out) as png:  # 2 layers x (2 queries x 2 heads) panels
        assert png.format == "PNG" and png.width > png.height > 300
    result = subprocess.run(
        [sys.executable, script, *args, "--layers", "0.9", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: --layers '0.9'")
    result = subprocess.run(  # a missing output folder: said before the model is built and run
        [sys.executable, script, *args, "--out", str(tmp_path / "none" / "a.png")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: --out"), result.stderr
    damaged = tmp_path / "damaged.png"  # a header chunk that claims 5 bytes: PIL raises ValueError
    Image.new("RGB", (8, 8)).save(damaged)
    damaged.write_bytes(damaged.read_bytes()[:11] + b"\x05" + damaged.read_bytes()[12:])
    result = subprocess.run(
        [sys.executable, script, *args, "--image", str(damaged), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: cannot read image '{damaged}': Truncated IHDR"), result.stderr


def test_visualize_attention_uses_the_checkpoint_data_settings(tmp_path, capsys):
    """A 40x48 px model is shown at its own size and normalisation, not upscaled to timm's 224."""
    from test_train import load_entry_point

    kwargs = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), kernel_size=3, num_classes=3)
    model = timm.create_model("nat_mini", **kwargs)
    data_config = {"input_size": [3, 40, 48], "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0}
    ckpt = dict(arch="nat_mini", model_kwargs=kwargs, num_classes=3, data_config=data_config)
    torch.save({**ckpt, "state_dict": model.state_dict()}, tmp_path / "w.pth")
    visualize = load_entry_point("scripts/visualize_attention.py")
    args = ["--checkpoint", str(tmp_path / "w.pth"), "--layers", "0.0", "--out", str(tmp_path / "a.png")]
    assert visualize.main(args) == 0, capsys.readouterr().err
    assert "48x40 px input" in capsys.readouterr().out  # W x H
    assert visualize.main([*args, "--img-size", "32"]) == 0
    assert "32x32 px input" in capsys.readouterr().out


def test_visualize_attention_panels_are_each_query_pixels_na_weights():
    """Each panel is the weights of the token under its query pixel, on that layer's own map: a
    40x48 px input (maps 10x12, 5x6), an off-diagonal query near the top-right corner, against the
    float64 reference built from the layer's q and k (a swapped x / y would pick another token)."""
    from test_train import load_entry_point

    visualize = load_entry_point("scripts/visualize_attention.py")
    torch.manual_seed(0)
    kwargs = dict(
        embed_dim=16,
        depths=(1, 1, 1, 1),
        num_heads=(2, 2, 2, 4),
        kernel_size=3,
        dilations=((2,), (1,), (1,), (1,)),
    )
    model = timm.create_model("dinat_mini", **kwargs).eval()
    layers = [visualize.parse_layer(model, text) for text in ("0.0", "1.0")]
    seen = {}
    for name, attn in layers:
        attn.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, a[0]))
    x = torch.randn(1, 3, 40, 48)
    panels = visualize.attention_panels(model, x, layers, [(44, 4)], heads=[1])
    assert [p[2] for p in panels] == [(44, 4)] * 2
    for (name, attn), (_, weights, _), (row, col) in zip(layers, panels, [(1, 11), (0, 5)], strict=True):
        feat = seen[name]
        with torch.no_grad():
            qkv = attn.qkv(feat).unflatten(-1, (3, attn.num_heads, attn.head_dim))
            q, k = qkv[..., 0, :, :], qkv[..., 1, :, :]
            maps = reference_attention_maps(q, k, attn.kernel_size, attn.dilation, attn.rpb, attn.scale)
        want = maps[0, row, col, 1].numpy()
        assert weights.shape == feat.shape[1:3] and abs(weights.sum() - 1) < 1e-5
        np.testing.assert_allclose(weights, want, atol=1e-6)


@pytest.mark.slow  # ~65 s of CPU: 13 variants, shapes only (meta device)
def test_every_registered_variant_traces_and_scripts():
    for name in timm.list_models(["nat_*", "dinat_*"]):
        with torch.device("meta"):
            model = timm.create_model(name).eval()
        nodes = {f"stages.{i}": f"stage{i}" for i in range(4)} | {"head.fc": "logits"}
        extractor = create_feature_extractor(model, return_nodes=nodes)
        outputs = [n for n in extractor.graph.nodes if n.op == "output"][0].args[0]
        assert set(outputs) == set(nodes.values()), name
        assert (
            len(FeatureGraphNet(model, out_indices=(0, 1, 2, 3)).graph_module.graph.find_nodes(op="output"))
            == 1
        )
        assert "forward" in torch.jit.script(model).code, name
