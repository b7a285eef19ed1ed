"""FX-traced NAT / DiNAT scripted with TorchScript: what timm's own tests/test_models.py does in
test_model_forward_fx_torchscript and test_model_forward_torchscript_with_features_fx, on our models.

The graph is traced with timm's FX helpers (timm.models._features_fx: its leaf modules and autowrapped
functions), scripted, and must reproduce the eager model's outputs.
"""

import pytest
import timm
import torch
from timm import set_scriptable
from timm.models import FeatureGraphNet
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import models  # noqa: F401  (registers the family)

MINIS = ["nat_mini", "dinat_mini"]


@pytest.mark.parametrize("name", MINIS)
def test_fx_traced_model_scripts_and_matches_eager(name):
    torch.manual_seed(0)
    with set_scriptable(True):
        model = timm.create_model(name, pretrained=False).eval()
    _, eval_nodes = get_graph_node_names(model)
    last = eval_nodes[-1]  # timm's test returns the traced graph's output node
    scripted = torch.jit.script(create_feature_extractor(model, [last]))
    x = torch.randn(1, 3, 72, 56)  # non-square: DiNAT's dilated windows pad in every stage
    with torch.inference_mode():
        got = scripted(x)[last]
        want = model(x)
    assert got.shape == (1, 1000)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MINIS)
def test_fx_feature_model_scripts_and_matches_eager(name):
    """timm's features_only=True, feature_cls="fx" (FeatureGraphNet), scripted."""
    torch.manual_seed(0)
    with set_scriptable(True):
        model = timm.create_model(name, num_classes=0, embed_dim=32).eval()
    scripted = torch.jit.script(FeatureGraphNet(model, out_indices=(0, 1, 2, 3)))
    x = torch.randn(1, 3, 64, 48)
    with torch.inference_mode():
        got = scripted(x)
        want = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
    assert isinstance(got, list) and len(got) == 4
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MINIS)
def test_jit_traced_model_matches_eager_and_reloads_as_plain_aten(name, tmp_path):
    """torch.jit.trace (and the legacy ONNX exporter, which traces): sizes are tensors there, and the
    graph records the gather path (plain ATen ops, as scripting runs), so the saved file loads
    without this repo's kernels; its sanity check re-traces and compares the two graphs."""
    torch.manual_seed(0)
    model = timm.create_model(name, embed_dim=16, num_heads=[1, 2, 2, 4]).eval()
    x = torch.randn(1, 3, 72, 56)  # DiNAT's last stage (3 x 2) is padded to its window
    traced = torch.jit.trace(model, x)  # check_trace: a second trace must give the same graph
    assert "_na2d" not in str(traced.inlined_graph) and "nat_" not in str(traced.inlined_graph)
    torch.jit.save(traced, tmp_path / "m.pt")
    with torch.inference_mode():
        torch.testing.assert_close(torch.jit.load(tmp_path / "m.pt")(x), model(x), rtol=1e-5, atol=1e-5)
