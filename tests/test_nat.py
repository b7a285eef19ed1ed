"""NAT / DiNAT family: architecture, official-checkpoint loading, timm contract.

The reference below re-writes the official model (SHI-Labs/Neighborhood-Attention-Transformer,
classification/nat.py with natten 0.14's NeighborhoodAttention2D) with its module names, so its
state_dict *is* an official-layout checkpoint, and its forward (float64, query-by-query NA from
na_reference) is an independent check of our wiring: downsampler placement, layer scale, padding.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from na_reference import reference_na2d
from torch import nn

import models  # noqa: F401  (registers the family)
from models.nat import _ARCHS, NAT, checkpoint_filter_fn, dinat_dilations

# ------------------------------------------------------------------------------------------------
# Reference: the official module tree


class RefAttention(nn.Module):
    """natten 0.14 NeighborhoodAttention2D: pad to the window before qkv, crop before proj."""

    def __init__(self, dim, num_heads, kernel_size, dilation):
        super().__init__()
        self.num_heads, self.kernel_size, self.dilation = num_heads, kernel_size, dilation
        self.qkv = nn.Linear(dim, dim * 3)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, H, W, C = x.shape
        window = self.kernel_size * self.dilation
        pad_r, pad_b = max(0, window - W), max(0, window - H)
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        q, k, v = self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, C // self.num_heads).unbind(3)
        out = reference_na2d(q, k, v, self.kernel_size, self.dilation, self.rpb).to(x.dtype)
        return self.proj(out.reshape(B, Hp, Wp, C)[:, :H, :W])


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefLayer(nn.Module):  # official NATLayer
    def __init__(self, dim, num_heads, kernel_size, dilation, mlp_ratio, layer_scale):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RefAttention(dim, num_heads, kernel_size, dilation)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        g1, g2 = (self.gamma1, self.gamma2) if self.layer_scale else (1.0, 1.0)
        x = x + g1 * self.attn(self.norm1(x))
        return x + g2 * self.mlp(self.norm2(x))


class RefDownsampler(nn.Module):  # official ConvDownsampler
    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x):
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class RefLevel(nn.Module):  # official NATBlock: blocks, then the downsampler
    def __init__(self, dim, depth, num_heads, kernel_size, dilations, mlp_ratio, layer_scale, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(
            RefLayer(dim, num_heads, kernel_size, dilations[i], mlp_ratio, layer_scale) for i in range(depth)
        )
        self.downsample = RefDownsampler(dim) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class RefTokenizer(nn.Module):  # official ConvTokenizer
    def __init__(self, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, 3, 2, 1), nn.Conv2d(embed_dim // 2, embed_dim, 3, 2, 1)
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def ref_levels(embed_dim, depths, num_heads, mlp_ratio, kernel_size, dilations, layer_scale) -> nn.ModuleList:
    """The official levels (NATBlocks): stage i is embed_dim * 2**i wide, downsampled unless last."""
    dilations = dilations or [[1] * d for d in depths]
    return nn.ModuleList(
        RefLevel(
            embed_dim * 2**i,
            depths[i],
            num_heads[i],
            kernel_size,
            dilations[i],
            mlp_ratio,
            layer_scale,
            i < len(depths) - 1,
        )
        for i in range(len(depths))
    )


class RefNAT(nn.Module):  # official NAT / DiNAT
    def __init__(
        self,
        embed_dim,
        depths,
        num_heads,
        mlp_ratio,
        kernel_size=7,
        dilations=None,
        layer_scale=None,
        num_classes=1000,
        in_chans=3,
        **_,
    ):
        super().__init__()
        self.patch_embed = RefTokenizer(in_chans, embed_dim)
        self.levels = ref_levels(embed_dim, depths, num_heads, mlp_ratio, kernel_size, dilations, layer_scale)
        self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1))
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(embed_dim * 2 ** (len(depths) - 1), num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        x = self.norm(x).flatten(1, 2)
        return self.head(torch.flatten(self.avgpool(x.transpose(1, 2)), 1))


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (LN, gammas and RPB included), so a mis-mapped one shows up in outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return module


TINY_NAT = dict(
    embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4), kernel_size=3, mlp_ratio=2.0, layer_scale=1e-5
)
TINY_DINAT = dict(
    embed_dim=16,
    depths=(2, 2, 2, 1),
    num_heads=(2, 2, 4, 4),
    kernel_size=3,
    mlp_ratio=3.0,
    dilations=((1, 4), (1, 2), (1, 2), (1,)),
)


def tiny(arch: dict, **kwargs) -> NAT:
    return NAT(**arch, num_classes=kwargs.pop("num_classes", 7), drop_path_rate=0.0, **kwargs)


def ref_tiny(arch: dict, num_classes: int = 7) -> RefNAT:
    return randomized(RefNAT(**arch, num_classes=num_classes)).double().eval()


def official_zeros(variant: str, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """An official-layout state dict of a registered variant, built from the key names and shapes only."""
    with torch.device("meta"):
        ref = RefNAT(**_ARCHS[variant], num_classes=num_classes)
    return {k: torch.zeros(v.shape) for k, v in ref.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Architecture of the registered variants

PARAMS = dict(
    nat_mini=19_984_174,
    nat_tiny=27_901_582,
    nat_small=50_743_297,
    nat_base=89_769_652,
    dinat_mini=19_984_174,
    dinat_tiny=27_901_582,
    dinat_small=50_719_681,
    dinat_base=89_769_652,
    dinat_large=200_943_514,
)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_counts_equal_reference(name):
    with torch.device("meta"):  # shapes only: counts without paying for the init
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", ["nat_small", "dinat_small", "dinat_large"])
def test_param_counts_of_official_module_tree(name):
    with torch.device("meta"):
        ref = RefNAT(**_ARCHS[name])
    assert sum(p.numel() for p in ref.parameters()) == PARAMS[name]


def test_param_count_on_cpu():
    model = timm.create_model("nat_mini")
    assert sum(p.numel() for p in model.parameters()) == PARAMS["nat_mini"]


def test_dinat_small_is_nat_small_without_layer_scale():
    with torch.device("meta"):
        nat, dinat = timm.create_model("nat_small"), timm.create_model("dinat_small")
    gammas = sum(p.numel() for n, p in nat.named_parameters() if n.endswith(".gamma"))
    assert gammas == 2 * sum(d * 96 * 2**i for i, d in enumerate((3, 4, 18, 5)))
    assert PARAMS["nat_small"] - PARAMS["dinat_small"] == gammas
    assert not any(n.endswith(".gamma") for n, _ in dinat.named_parameters())


def test_variant_hyperparameters_follow_the_papers():
    expect = {  # embed_dim, heads, mlp_ratio, layer scale, drop path, kernel
        "nat_mini": (64, (2, 4, 8, 16), 3.0, None, 0.2, 7),
        "nat_tiny": (64, (2, 4, 8, 16), 3.0, None, 0.2, 7),
        "nat_small": (96, (3, 6, 12, 24), 2.0, 1e-5, 0.3, 7),
        "nat_base": (128, (4, 8, 16, 32), 2.0, 1e-5, 0.5, 7),
        "dinat_small": (96, (3, 6, 12, 24), 2.0, None, 0.3, 7),
        "dinat_base": (128, (4, 8, 16, 32), 2.0, 1e-5, 0.5, 7),
        "dinat_large": (192, (6, 12, 24, 48), 2.0, None, 0.35, 7),
        "dinat_large_384_11x11": (192, (6, 12, 24, 48), 2.0, None, 0.35, 11),
    }
    for name, (dim, heads, mlp, ls, dpr, k) in expect.items():
        with torch.device("meta"):
            m = timm.create_model(name)
        assert (m.embed_dim, m.num_heads, m.mlp_ratio, m.layer_scale) == (dim, heads, mlp, ls), name
        assert m.kernel_size == (k,) * 4
        # the official schedule: linear from 0 over every block, in order (torch.linspace(0, rate, n))
        blocks = [b for stage in m.stages for b in stage.blocks]
        want = [i * dpr / (len(blocks) - 1) for i in range(len(blocks))]
        got = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in blocks]
        assert got == pytest.approx(want, abs=1e-6), name
        assert [float(getattr(b.drop_path2, "drop_prob", 0.0)) for b in blocks] == pytest.approx(
            want, abs=1e-6
        )
        assert m.stages[0].blocks[0].attn.kernel_size == k
        assert m.stages[1].downsample.conv.bias is None


def test_dinat_dilation_schedules_are_the_official_ones():
    official_224 = [
        [1, 8, 1],
        [1, 4, 1, 4],
        [1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2],
        [1, 1, 1, 1, 1],
    ]
    official_384 = [
        [1, 13, 1],
        [1, 6, 1, 6],
        [1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3],
        [1, 1, 1, 1, 1],
    ]
    mini = [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]]
    as_lists = lambda d: [list(s) for s in d]
    assert as_lists(_ARCHS["dinat_mini"]["dilations"]) == mini
    for name in ("dinat_tiny", "dinat_small", "dinat_base", "dinat_large", "dinat_large_384_11x11"):
        assert as_lists(_ARCHS[name]["dilations"]) == official_224, name
    assert as_lists(_ARCHS["dinat_large_384"]["dilations"]) == official_384
    for name in ("nat_mini", "nat_tiny", "nat_small", "nat_base"):
        assert "dilations" not in _ARCHS[name]
    with torch.device("meta"):
        m = timm.create_model("dinat_large_384")
    assert [[b.attn.dilation for b in s.blocks] for s in m.stages] == official_384


def test_registry_and_pretrained_cfgs():
    assert timm.list_models("nat*") == ["nat_base", "nat_mini", "nat_small", "nat_tiny"]
    assert set(timm.list_models("dinat*")) >= {
        "dinat_mini",
        "dinat_tiny",
        "dinat_small",
        "dinat_base",
        "dinat_large",
        "dinat_large_384",
        "dinat_large_384_11x11",
    }
    assert "dinat_large.in22k" in timm.list_pretrained("dinat_large*")
    with torch.device("meta"):
        m = timm.create_model("nat_tiny")
        large384 = timm.create_model("dinat_large_384")
        in22k = timm.create_model("dinat_large.in22k")
    cfg = m.pretrained_cfg
    assert cfg["url"] == "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_tiny.pth"
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["num_classes"] == 1000
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert (
        large384.pretrained_cfg["input_size"] == (3, 384, 384) and large384.pretrained_cfg["crop_pct"] == 1.0
    )
    assert large384.pretrained_cfg["url"].endswith("imagenet1k/dinat_large_in22k_in1k_384.pth")
    assert in22k.num_classes == 21841 and in22k.pretrained_cfg["url"].endswith("dinat_large_in22k_224.pth")


# ------------------------------------------------------------------------------------------------
# Forward equals the official model


@pytest.mark.parametrize("arch", [TINY_NAT, TINY_DINAT], ids=["nat", "dinat"])
@pytest.mark.parametrize("size", [(48, 48), (40, 24), (16, 16)])
def test_official_checkpoint_gives_official_outputs(arch, size):
    ref = ref_tiny(arch)
    model = tiny(arch).double().eval()
    model.load_state_dict(checkpoint_filter_fn({"model": ref.state_dict()}, model), strict=True)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-9, atol=1e-9)


def test_filter_maps_official_names_one_to_one():
    ref = ref_tiny(TINY_NAT)
    sd = ref.state_dict()
    out = checkpoint_filter_fn(sd, tiny(TINY_NAT).double())
    expect = {
        "stem.conv1.weight": "patch_embed.proj.0.weight",
        "stem.conv2.bias": "patch_embed.proj.1.bias",
        "stem.norm.weight": "patch_embed.norm.weight",
        "stages.1.downsample.conv.weight": "levels.0.downsample.reduction.weight",
        "stages.3.downsample.norm.bias": "levels.2.downsample.norm.bias",
        "stages.2.blocks.1.attn.rpb": "levels.2.blocks.1.attn.rpb",
        "stages.2.blocks.1.ls1.gamma": "levels.2.blocks.1.gamma1",
        "stages.0.blocks.0.ls2.gamma": "levels.0.blocks.0.gamma2",
        "stages.3.blocks.0.mlp.fc2.weight": "levels.3.blocks.0.mlp.fc2.weight",
        "norm.weight": "norm.weight",
        "head.fc.weight": "head.weight",
    }
    for ours, official in expect.items():
        assert torch.equal(out[ours], sd[official]), ours
    assert len(out) == len(sd)
    # values are moved, never changed, when shapes agree
    assert sorted(v.data_ptr() for v in out.values()) == sorted(v.data_ptr() for v in sd.values())


def test_timm_native_state_dict_round_trips():
    model = randomized(tiny(TINY_DINAT))
    fresh = tiny(TINY_DINAT)
    fresh.load_state_dict(checkpoint_filter_fn({"state_dict": model.state_dict()}, fresh))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


# ------------------------------------------------------------------------------------------------
# Loading through timm / torch.hub with real variants


@pytest.fixture(scope="module")
def nat_mini_official(tmp_path_factory):
    """An official-layout nat_mini checkpoint (random weights), wrapped under 'model' like some releases."""
    torch.manual_seed(0)
    ref = RefNAT(**_ARCHS["nat_mini"]).eval()
    with torch.no_grad():  # non-trivial RPB and head so a dropped one would show
        for name, p in ref.named_parameters():
            if name.endswith("rpb") or name.startswith("head"):
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "nat_mini_official.pth"
    torch.save({"model": ref.state_dict()}, path)
    return ref, path


@pytest.fixture(scope="module")
def tiny_official(tmp_path_factory):
    """An official-layout checkpoint of a tiny NAT (float32, every weight random)."""
    ref = randomized(RefNAT(**TINY_NAT, num_classes=1000)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny_official.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def _assert_loaded(model, ref, skip_head=False):
    mapped = checkpoint_filter_fn(ref.state_dict(), model)
    for k, v in model.state_dict().items():
        if skip_head and k.startswith("head."):
            continue
        assert torch.equal(v, mapped[k]), k


def test_pretrained_cfg_overlay_file_loads_offline(nat_mini_official):
    ref, path = nat_mini_official
    model = timm.create_model("nat_mini", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    _assert_loaded(model, ref)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_local_path_and_torch_hub_load(tiny_official):
    # registered entry points with the tiny architecture swapped in through kwargs
    ref, path = tiny_official
    by_path = timm.create_model("nat_mini", pretrained=str(path), **TINY_NAT)
    _assert_loaded(by_path, ref)
    root = str(Path(__file__).resolve().parents[1])
    hub = torch.hub.load(root, "nat_mini", source="local", pretrained=path, **TINY_NAT)
    _assert_loaded(hub, ref)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hub.eval()(x), ref(x), rtol=1e-4, atol=1e-4)
    fresh = torch.hub.load(root, "dinat_mini", source="local", pretrained=False, num_classes=3, **TINY_DINAT)
    assert fresh.num_classes == 3 and fresh.pretrained_cfg["architecture"] == "dinat_mini"


def test_other_num_classes_resets_or_drops_the_head(tiny_official):
    ref, path = tiny_official
    ten = timm.create_model("nat_mini", pretrained=str(path), num_classes=10, **TINY_NAT)
    assert ten.get_classifier().out_features == 10
    _assert_loaded(ten, ref, skip_head=True)
    headless = timm.create_model("nat_mini", pretrained=str(path), num_classes=0, **TINY_NAT)
    assert isinstance(headless.get_classifier(), nn.Identity)
    _assert_loaded(headless, ref, skip_head=True)
    assert headless(torch.randn(1, 3, 32, 32)).shape == (1, 128)
    # a file with another class count than the pretrained cfg: the head is re-initialized, the rest loads
    path10 = path.with_name("tiny_10.pth")
    torch.save(
        dict(ref.state_dict(), **{"head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)}), path10
    )
    thousand = timm.create_model("nat_mini", pretrained=str(path10), **TINY_NAT)
    assert thousand.get_classifier().out_features == 1000
    _assert_loaded(thousand, ref, skip_head=True)


def test_mismatched_variant_names_both():
    sd = official_zeros("nat_tiny")
    with torch.device("meta"):
        model = timm.create_model("nat_mini")
    with pytest.raises(
        ValueError, match=r"looks like nat_tiny / dinat_tiny \(.*depths \(3, 4, 18, 5\).*model is nat_mini"
    ):
        checkpoint_filter_fn(sd, model)
    # same shapes except the layer-scale gammas
    sd = official_zeros("nat_small")
    with torch.device("meta"):
        model = timm.create_model("dinat_small")
    with pytest.raises(ValueError, match=r"looks like nat_small \(.*layer scale yes\), model is dinat_small"):
        checkpoint_filter_fn(sd, model)
    # a model with fewer stages: the checkpoint's variant still named, its heads not cut to the model's
    sd = official_zeros("nat_mini")
    with torch.device("meta"):
        model = timm.create_model("nat_mini", depths=(3, 4, 6), num_heads=(2, 4, 8))
    with pytest.raises(ValueError, match=r"looks like nat_mini / dinat_mini \(.*heads \(2, 4, 8, 16\)"):
        checkpoint_filter_fn(sd, model)


def test_mismatched_file_fails_through_create_model(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(official_zeros("nat_tiny"), path)
    with pytest.raises(ValueError, match="looks like nat_tiny / dinat_tiny.*model is nat_mini"):
        timm.create_model("nat_mini", pretrained=str(path))


def test_left_over_or_missing_keys_are_errors():
    ref = ref_tiny(TINY_NAT)
    model = tiny(TINY_NAT).double()
    extra = dict(ref.state_dict(), **{"levels.0.blocks.0.attn.relative_position_index": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected \['stages.0.blocks.0.attn.relative_position_index'\]"):
        checkpoint_filter_fn(extra, model)
    missing = dict(ref.state_dict())
    del missing["levels.1.blocks.1.mlp.fc1.bias"]
    with pytest.raises(ValueError, match=r"missing \['stages.1.blocks.1.mlp.fc1.bias'\]"):
        checkpoint_filter_fn(missing, model)
    with pytest.raises(ValueError, match="not a NAT/DiNAT state dict"):
        checkpoint_filter_fn({"conv.weight": torch.zeros(1)}, model)


def test_rpb_is_interpolated_bicubically_for_a_larger_kernel():
    arch7 = dict(TINY_NAT, kernel_size=7)
    ref = randomized(RefNAT(**arch7, num_classes=7))
    model = tiny(dict(arch7, kernel_size=11))
    out = checkpoint_filter_fn(ref.state_dict(), model)
    model.load_state_dict(out, strict=True)
    rpb7 = ref.levels[2].blocks[1].attn.rpb.detach()
    expect = F.interpolate(rpb7[None], size=(21, 21), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(model.stages[2].blocks[1].attn.rpb.detach(), expect)
    assert model.stages[2].blocks[1].attn.rpb.shape == (2, 21, 21)
    # corners and centre of the 13x13 grid land on the same relative offsets of the 21x21 one
    assert torch.equal(model.stages[0].blocks[0].attn.qkv.weight, ref.levels[0].blocks[0].attn.qkv.weight)


def test_checkpoints_load_with_weights_only(tmp_path, tiny_official):
    ref, _ = tiny_official
    bad = tmp_path / "pickled.pth"
    torch.save({"model": ref.state_dict(), "args": math.sqrt}, bad)  # a Python object: refused unpickling
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        timm.create_model("nat_mini", pretrained=str(bad), **TINY_NAT)


def test_missing_file_and_offline_download_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        timm.create_model("nat_mini", pretrained=str(tmp_path / "nope.pth"))

    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="could not download the nat_mini checkpoint.*pretrained="):
        timm.create_model("nat_mini", pretrained=True)


# ------------------------------------------------------------------------------------------------
# timm contract


def test_forward_any_size_and_heads():
    model = tiny(TINY_DINAT).eval()
    for size in [(64, 64), (33, 47), (8, 8), (1, 1)]:
        assert model(torch.randn(2, 3, *size)).shape == (2, 7)
    x = torch.randn(2, 3, 64, 48)
    feats = model.forward_features(x)
    assert feats.shape == (2, 2, 2, 128)  # NHWC, stride 32
    pooled = model.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(pooled, feats.mean((1, 2)))
    torch.testing.assert_close(model.forward_head(feats), model.get_classifier()(pooled))
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 128) and isinstance(model.get_classifier(), nn.Identity)


def test_forward_intermediates():
    model = tiny(TINY_NAT).eval()
    x = torch.randn(2, 3, 64, 64)
    final, inter = model.forward_intermediates(x)
    assert [t.shape for t in inter] == [
        (2, 16, 16, 16),
        (2, 32, 8, 8),
        (2, 64, 4, 4),
        (2, 128, 2, 2),
    ]
    for info, t in zip(model.feature_info, inter, strict=True):
        assert t.shape[1] == info["num_chs"] and 64 // t.shape[-1] == info["reduction"]
    torch.testing.assert_close(final, model.forward_features(x))
    nhwc = model.forward_intermediates(
        x, indices=[1, 3], output_fmt="NHWC", intermediates_only=True, norm=True
    )
    torch.testing.assert_close(nhwc[0], inter[1].permute(0, 2, 3, 1))
    torch.testing.assert_close(nhwc[1], final)  # norm applies to the last stage only
    early = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[1], inter[3])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_features_only():
    model = timm.create_model("nat_mini", features_only=True, out_indices=(1, 3), **TINY_NAT).eval()
    assert model.feature_info.channels() == [32, 128]
    assert model.feature_info.reduction() == [8, 32]
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape for f in feats] == [(1, 32, 8, 8), (1, 128, 2, 2)]
    pruned = timm.create_model("dinat_mini", features_only=True, out_indices=(0, 1), **TINY_DINAT)
    assert len(pruned.model.stages) == 2  # later stages pruned away
    assert [f.shape for f in pruned(torch.randn(1, 3, 64, 64))] == [(1, 16, 16, 16), (1, 32, 8, 8)]


def test_grad_checkpointing_gives_same_outputs_and_grads():
    torch.manual_seed(0)
    model = tiny(TINY_DINAT).train()
    model.head.fc.weight.data.normal_()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    out2 = model(x)
    out2.square().sum().backward()
    torch.testing.assert_close(out2, out)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_no_weight_decay_and_optimizer_groups():
    model = tiny(TINY_NAT)
    nwd = model.no_weight_decay()
    assert "stages.0.blocks.0.attn.rpb" in nwd
    assert {"stem.norm.weight", "norm.bias", "stages.1.blocks.0.ls1.gamma", "head.fc.bias"} <= nwd
    assert "stages.0.blocks.0.attn.qkv.bias" in nwd
    assert not nwd & {"stages.0.blocks.0.attn.qkv.weight", "stem.conv1.weight", "head.fc.weight"}
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.stages[0].blocks[0].attn.rpb) not in decayed
    assert id(model.stages[0].blocks[0].attn.qkv.weight) in decayed


def test_group_matcher_orders_layers_for_layer_decay():
    from timm.models import group_parameters

    model = tiny(TINY_NAT)
    groups = group_parameters(model, model.group_matcher(), reverse=False)
    layer_of = {name: gid for gid, names in groups.items() for name in names}
    assert set(layer_of) == {n for n, _ in model.named_parameters()}
    assert layer_of["stem.conv1.weight"] == 0
    # timm's convention (convnext, mambaout): a stage's downsample shares block 0's layer id
    assert layer_of["stages.1.downsample.conv.weight"] == layer_of["stages.1.blocks.0.attn.rpb"]
    assert layer_of["stages.1.blocks.0.attn.rpb"] < layer_of["stages.1.blocks.1.attn.rpb"]
    assert layer_of["stages.0.blocks.0.norm1.weight"] < layer_of["stages.1.downsample.conv.weight"]
    # (99999,) is timm's MATCH_PREV_GROUP: the final norm trains with the last block, as in swin
    assert layer_of["stages.3.blocks.0.mlp.fc1.weight"] == layer_of["norm.weight"]
    assert layer_of["head.fc.weight"] == max(layer_of.values())
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) > 4 and scales[-1] == 1.0


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="dilations must give one value per block"):
        NAT(embed_dim=16, depths=(1, 2), num_heads=(1, 2), dilations=((1,), (1,)))
    with pytest.raises(ValueError, match="num_heads"):
        NAT(embed_dim=16, depths=(1, 2), num_heads=(1,))
    # a window without a centre, or a dilation below 1, is refused when the model is made (not at its
    # first forward, inside a trace or an export)
    with pytest.raises(ValueError, match="kernel_size must be an odd integer >= 1, got 6"):
        NAT(embed_dim=16, depths=(1, 2), num_heads=(1, 2), kernel_size=6)
    with pytest.raises(ValueError, match="dilations must be >= 1"):
        NAT(embed_dim=16, depths=(1, 2), num_heads=(1, 2), dilations=((1,), (0, 1)))
    assert dinat_dilations((3, 2), (8, 4)) == ((1, 8, 1), (1, 4))
