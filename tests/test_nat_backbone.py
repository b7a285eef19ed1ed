"""NAT / DiNAT as dense backbones: the official detection / segmentation layout, its checkpoints (the
official mmdet / mmseg `backbone.*` weights, Hugging Face NatBackbone / DinatBackbone), the official
dense dilations, frozen stages, any input size.

Reference: the official dense backbone (SHI-Labs/Neighborhood-Attention-Transformer, detection/nat.py
= segmentation/nat.py; DiNAT is the same class with dilations) re-written below on test_nat's official
module tree: a level's features are taken before its downsampler, normed by `norm{i}`, returned NCHW.
Its state_dict is an official dense checkpoint, and its forward (float64, query-by-query NA of
na_reference) checks our wiring independently.
"""

import re

import pytest
import timm
import torch
from test_nat import TINY_DINAT, TINY_NAT, RefNAT, RefTokenizer, randomized, ref_levels
from test_weights_interop import to_hf
from timm.models import group_parameters
from torch import nn

import models  # noqa: F401  (registers the family)
from models.nat import _ARCHS, DENSE_DILATIONS, NAT, checkpoint_filter_fn


class RefDenseNAT(nn.Module):  # official detection/nat.py NAT (and DiNAT)
    def __init__(
        self,
        embed_dim,
        depths,
        num_heads,
        mlp_ratio,
        kernel_size=7,
        dilations=None,
        layer_scale=None,
        out_indices=(0, 1, 2, 3),
        in_chans=3,
        **_,
    ):
        super().__init__()
        self.patch_embed = RefTokenizer(in_chans, embed_dim)
        self.levels = ref_levels(embed_dim, depths, num_heads, mlp_ratio, kernel_size, dilations, layer_scale)
        self.out_indices = out_indices
        for i in out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(embed_dim * 2**i))

    def forward(self, x):
        x = self.patch_embed(x)
        outs = []
        for i, level in enumerate(self.levels):
            for blk in level.blocks:
                x = blk(x)
            if i in self.out_indices:  # NATBlock returns (downsample(x), x): outputs are pre-downsample
                outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
            if level.downsample is not None:
                x = level.downsample(x)
        return outs


def ref_dense(arch: dict) -> RefDenseNAT:
    return randomized(RefDenseNAT(**arch)).double().eval()


def mmdet_checkpoint(ref: nn.Module) -> dict:
    """What mmdet / mmseg save: the detector's state_dict under 'state_dict', backbone under `backbone.`."""
    sd = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    sd["neck.lateral_convs.0.conv.weight"] = torch.zeros(8, 16, 1, 1)
    sd["rpn_head.rpn_cls.weight"] = torch.zeros(3, 8, 1, 1)
    return {"meta": {"epoch": 36}, "state_dict": sd}


def dense_backbone(arch: dict, pretrained=False, **kwargs) -> nn.Module:
    """The documented route: features_only + stage_norms through timm.create_model."""
    return timm.create_model(
        "nat_mini",
        pretrained=pretrained,
        features_only=True,
        stage_norms=True,
        **arch,
        **{"drop_path_rate": 0.0, **kwargs},
    ).eval()


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def assert_features_match(model, ref, x):
    with torch.no_grad():
        want = ref(x.double())
        got = model(x)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        if got[0].dtype == torch.float64:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
        else:
            assert max_rel_error(g, w) < 1e-4
    return got


# ------------------------------------------------------------------------------------------------
# Official checkpoints give the official features


@pytest.mark.parametrize("arch", [TINY_NAT, TINY_DINAT], ids=["nat", "dinat"])
def test_official_dense_checkpoint_gives_official_features(arch, tmp_path):
    ref = ref_dense(arch)
    path = tmp_path / "mask_rcnn.pth"
    torch.save(mmdet_checkpoint(ref), path)
    model = dense_backbone(arch, pretrained=str(path))
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    # square, odd and non-square (not a multiple of 32), and smaller than DiNAT's dilated windows
    for size in [(64, 64), (37, 53), (16, 16)]:
        x = torch.randn(2, 3, *size)
        got = assert_features_match(model, ref, x)  # float32 model vs float64 reference: rel. error < 1e-4
        h, w = size
        for i, g in enumerate(got):  # stride-2 convs with padding 1: each halving rounds up
            h, w = (h + 1) // 2, (w + 1) // 2
            if i == 0:
                h, w = (h + 1) // 2, (w + 1) // 2
            assert g.shape[-2:] == (h, w) and g.is_contiguous()
    assert_features_match(model.double(), ref, torch.randn(1, 3, 37, 53, dtype=torch.float64))


def hf_backbone_state_dict(model: NAT, ref: RefDenseNAT, stages: list[int]) -> dict[str, torch.Tensor]:
    """A transformers NatBackbone / DinatBackbone state dict with out_features stage{i+1} for i in stages:
    test_weights_interop's independent HF mapping of the body, `hidden_states_norms` from the reference's
    norm{i}, no final `layernorm` (the backbone has none)."""
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("stage_norms.")}
    sd["norm.weight"] = sd["norm.bias"] = torch.zeros(1)  # to_hf maps a final norm, dropped below
    hf = {k: v for k, v in to_hf(sd, model, base=None).items() if not k.startswith("layernorm.")}
    for i in stages:
        norm = getattr(ref, f"norm{i}")
        hf[f"hidden_states_norms.stage{i + 1}.weight"] = norm.weight.detach().clone()
        hf[f"hidden_states_norms.stage{i + 1}.bias"] = norm.bias.detach().clone()
    return hf


@pytest.mark.parametrize("arch", [TINY_NAT, TINY_DINAT], ids=["NatBackbone", "DinatBackbone"])
def test_hugging_face_backbone_gives_official_features(arch):
    ref = ref_dense(arch)
    body = NAT(**arch, num_classes=0, stage_norms=True, drop_path_rate=0.0).double()
    body.load_state_dict(checkpoint_filter_fn(mmdet_checkpoint(ref), body))
    hf = hf_backbone_state_dict(body, ref, stages=[0, 1, 2, 3])
    assert not any(k.startswith(("stage_norms", "norm", "layernorm", "backbone")) for k in hf)
    model = dense_backbone(arch).double()
    model.model.load_state_dict(checkpoint_filter_fn(hf, model.model))
    assert_features_match(model, ref, torch.randn(2, 3, 40, 56, dtype=torch.float64))

    # transformers' default out_features (the last stage only): the other stage norms keep their
    # fresh init (identity), as the official backbones' norms do under a classification checkpoint
    last_only = hf_backbone_state_dict(body, ref, stages=[3])
    model = dense_backbone(arch).double()
    model.model.load_state_dict(checkpoint_filter_fn(last_only, model.model))
    for i in range(3):
        nn.init.ones_(getattr(ref, f"norm{i}").weight)
        nn.init.zeros_(getattr(ref, f"norm{i}").bias)
    assert_features_match(model, ref, torch.randn(1, 3, 32, 48, dtype=torch.float64))


def test_classification_checkpoint_loads_as_the_official_backbones_load_it(tmp_path):
    """The official dense backbones load ImageNet weights with strict=False: `norm`/`head` ignored,
    norm0..3 fresh. Through timm.create_model(pretrained=...) this layout does the same."""
    classifier = randomized(RefNAT(**TINY_DINAT, num_classes=7)).double()
    path = tmp_path / "dinat_in1k.pth"
    torch.save({"model": classifier.state_dict()}, path)
    ref = RefDenseNAT(**TINY_DINAT).double().eval()
    missing, unexpected = ref.load_state_dict(classifier.state_dict(), strict=False)
    assert sorted(missing) == [f"norm{i}.{p}" for i in range(4) for p in ("bias", "weight")]
    assert sorted(unexpected) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    model = dense_backbone(TINY_DINAT, pretrained=str(path))
    assert_features_match(model, ref, torch.randn(1, 3, 48, 40))


@pytest.mark.parametrize("name", ["nat_small", "dinat_tiny"])
def test_full_size_official_dense_checkpoint_fits_one_to_one(name):
    """The key names and shapes of an official detection backbone of a registered variant (layer scale
    in nat_small) map onto the dense layout with nothing missing or left over."""
    with torch.device("meta"):
        ref = RefDenseNAT(**_ARCHS[name])
        model = timm.create_model(name, num_classes=0, stage_norms=True)
    ckpt = {f"backbone.{k}": torch.zeros(v.shape) for k, v in ref.state_dict().items()}
    out = checkpoint_filter_fn({"state_dict": ckpt}, model)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert len(out) == len(ckpt)


def test_dense_checkpoints_need_the_dense_layout():
    ref = ref_dense(TINY_NAT)
    classification = NAT(**TINY_NAT, num_classes=0)
    with pytest.raises(ValueError, match=r"dense backbone's .*with stage_norms=True"):
        checkpoint_filter_fn(mmdet_checkpoint(ref), classification)
    body = NAT(**TINY_NAT, num_classes=0, stage_norms=True)
    hf = hf_backbone_state_dict(body, ref, stages=[3])
    hf["hidden_states_norms.stem.weight"] = hf["hidden_states_norms.stem.bias"] = torch.zeros(16)
    with pytest.raises(ValueError, match="norm on the 'stem' output"):
        checkpoint_filter_fn(hf, body)


# ------------------------------------------------------------------------------------------------
# The official dense configs' dilations

# copied from the official configs (detection/configs/dinat/*, segmentation/configs/dinat/*)
COCO_MINI = [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7], [1, 3, 1, 3, 1]]
COCO_TINY = [
    [1, 28, 1],
    [1, 7, 1, 14],
    [1, 3, 1, 5, 1, 7, 1, 3, 1, 5, 1, 7, 1, 3, 1, 5, 1, 7],
    [1, 3, 1, 3, 1],
]
ADE_MINI = [[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4], [1, 2, 1, 2, 1]]
ADE_TINY = [[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4, 1, 2, 1, 3, 1, 4, 1, 2, 1, 3, 1, 4], [1, 2, 1, 2, 1]]
ADE_640_LARGE = [
    [1, 20, 1],
    [1, 5, 1, 10],
    [1, 2, 1, 3, 1, 4, 1, 5, 1, 2, 1, 3, 1, 4, 1, 5, 1, 5],
    [1, 2, 1, 2, 1],
]


@pytest.mark.parametrize(
    "name,dilations,table",
    [
        ("dinat_mini", "coco", COCO_MINI),
        ("dinat_tiny", "coco", COCO_TINY),
        ("dinat_small", "coco", COCO_TINY),
        ("dinat_base", "coco", COCO_TINY),
        ("dinat_large", "coco", COCO_TINY),
        ("dinat_mini", "ade20k", ADE_MINI),
        ("dinat_base", "ade20k", ADE_TINY),
        ("dinat_large", "ade20k_640", ADE_640_LARGE),
    ],
)
def test_named_dilations_are_the_official_dense_configs(name, dilations, table):
    with torch.device("meta"):
        model = timm.create_model(name, dilations=dilations)
    assert [list(d) for d in model.dilations] == table
    assert [blk.attn.dilation for blk in model.stages[0].blocks] == table[0]


def test_named_dilations_errors_and_the_imagenet_set():
    with torch.device("meta"):
        # the registered variants' own (ImageNet 224) schedule, by name
        assert (
            timm.create_model("dinat_tiny", dilations="imagenet").dilations
            == _ARCHS["dinat_tiny"]["dilations"]
        )
    with pytest.raises(ValueError, match=r"dilations 'voc' is not a known set: use one of \['ade20k'"):
        NAT(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), dilations="voc")
    with pytest.raises(ValueError, match="official 4-stage ones; this model has 3 stages"):
        NAT(embed_dim=16, depths=(1, 1, 1), num_heads=(1, 1, 1), dilations="coco")
    assert set(DENSE_DILATIONS) == {"imagenet", "coco", "ade20k", "ade20k_640"}


# ------------------------------------------------------------------------------------------------
# features_only, frozen stages, layer decay


def test_features_only_defaults_to_the_stages_the_model_has():
    # configs/demo_nat.yaml: a 3-stage NAT (refused before without out_indices)
    demo = dict(embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8], mlp_ratio=3.0, kernel_size=[7, 3, 3])
    model = timm.create_model("nat_mini", features_only=True, **demo).eval()
    assert model.feature_info.channels() == [32, 64, 128]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model(x)
        want = model.model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape for f in feats] == [(2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    for f, w in zip(feats, want, strict=True):  # the classification layout: raw stage outputs, no norm
        torch.testing.assert_close(f, w)
    assert model.model.num_classes == 0  # features_only builds no classifier


def test_pruned_outputs_keep_no_unused_stage_norms():
    torch.manual_seed(0)
    full = dense_backbone(TINY_NAT)
    part = dense_backbone(TINY_NAT, out_indices=(1, 3))
    part.model.load_state_dict(full.model.state_dict(), strict=False)  # the pruned norms are Identity
    assert [type(n) for n in part.model.stage_norms] == [nn.Identity, nn.LayerNorm, nn.Identity, nn.LayerNorm]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        all_maps = full(x)
    got = part(x)
    torch.testing.assert_close(got[0], all_maps[1])
    torch.testing.assert_close(got[1], all_maps[3])
    sum(g.sum() for g in got).backward()  # DDP-safe: every parameter gets a gradient
    assert all(p.grad is not None for p in part.parameters())


# the official layout's level i: its blocks, the downsampler after them, its output norm
FROZEN = {
    0: [r"stem\."],
    1: [r"stem\.", r"stages\.0\.blocks\.", r"stages\.1\.downsample\.", r"stage_norms\.0\."],
    2: [r"stem\.", r"stages\.[01]\.blocks\.", r"stages\.[12]\.downsample\.", r"stage_norms\.[01]\."],
}


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 2, 4])
def test_frozen_stages_as_mmdet(frozen_stages):
    torch.manual_seed(0)
    model = dense_backbone(TINY_NAT, frozen_stages=frozen_stages, drop_path_rate=0.5)
    names = [n.removeprefix("model.") for n, _ in model.named_parameters()]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    frozen = {n.removeprefix("model.") for n in frozen}
    if frozen_stages == -1:
        assert not frozen
    elif frozen_stages == 4:
        assert frozen == set(names)
    else:
        assert frozen == {n for n in names if any(re.match(p, n) for p in FROZEN[frozen_stages])}
    if frozen_stages not in (1, 2):
        return
    model.train()
    inner = model.model
    assert not inner.stem.training and not inner.stages[0].blocks.training and inner.stages[2].blocks.training
    assert not inner.stages[frozen_stages].downsample.training
    # drop path (0.5) acts only in the trained part: frozen outputs repeat, later ones don't
    x = torch.randn(2, 3, 64, 64)
    first, second = model(x), model(x)
    torch.testing.assert_close(first[frozen_stages - 1], second[frozen_stages - 1], rtol=0, atol=0)
    assert not torch.equal(first[3], second[3])
    sum(f.sum() for f in first).backward()
    for n, p in model.named_parameters():
        assert (p.grad is None) == (not p.requires_grad), n


def test_frozen_stages_out_of_range_is_one_clear_error():
    with pytest.raises(ValueError, match=r"frozen_stages must be -1 \(none\), 0 \(the stem\) .. 4 .*got 5"):
        NAT(**TINY_NAT, frozen_stages=5)


def test_layer_decay_groups_a_stage_norm_with_its_stage():
    model = NAT(**TINY_NAT, num_classes=0, stage_norms=True)
    layer_of = {n: g for g, names in group_parameters(model, model.group_matcher()).items() for n in names}
    assert set(layer_of) == {n for n, _ in model.named_parameters()}
    for i, depth in enumerate(TINY_NAT["depths"]):
        assert layer_of[f"stage_norms.{i}.weight"] == layer_of[f"stages.{i}.blocks.{depth - 1}.norm1.weight"]
