"""count_flops: multiply-adds with NA at the paper's cost (k*k keys per query)."""

from __future__ import annotations

import pytest
import timm
import torch

from models import count_flops
from models.nat import _ARCHS, NAT

TINY_NAT = dict(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4), kernel_size=3, mlp_ratio=2.0)
TINY_DINAT = dict(
    embed_dim=16,
    depths=(2, 2, 2, 1),
    num_heads=(2, 2, 4, 4),
    kernel_size=5,
    mlp_ratio=3.0,
    layer_scale=1e-5,
    dilations=((1, 4), (1, 2), (1, 2), (1,)),
)


def hand_count(arch: dict, height: int, width: int, num_classes: int, in_chans: int = 3) -> int:
    """Convs, linears and NA's QK / AV, from the architecture alone.

    NA pads a map smaller than its window (k * dilation) before qkv, so qkv and attention run on
    the padded map and proj / MLP on the cropped one.
    """
    out = lambda n: (n - 1) // 2 + 1  # 3x3, stride 2, padding 1
    dim = arch["embed_dim"]
    k = arch["kernel_size"]
    h, w = out(height), out(width)
    macs = (dim // 2) * in_chans * 9 * h * w
    h, w = out(h), out(w)
    macs += dim * (dim // 2) * 9 * h * w
    for i, depth in enumerate(arch["depths"]):
        if i:
            h, w = out(h), out(w)
            macs += 2 * dim * dim * 9 * h * w
            dim *= 2
        dilations = arch.get("dilations", [[1] * d for d in arch["depths"]])[i]
        hidden = int(dim * arch["mlp_ratio"])
        for j in range(depth):
            window = k * dilations[j]
            padded = max(h, window) * max(w, window)
            macs += padded * dim * 3 * dim  # qkv
            macs += 2 * padded * k * k * dim  # QK^T and AV: k*k keys per query, all heads
            macs += h * w * (dim * dim + 2 * dim * hidden)  # proj, MLP
    return macs + dim * num_classes


@pytest.mark.parametrize("arch", [TINY_NAT, TINY_DINAT], ids=["nat", "dinat"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80), (20, 20)])
def test_count_matches_hand_count(arch, size):
    model = NAT(**arch, num_classes=10)
    assert count_flops(model, (3, *size)) == hand_count(arch, *size, num_classes=10)


def test_batch_size_scales_and_model_state_is_kept():
    model = NAT(**TINY_NAT, num_classes=10).train()
    one = count_flops(model, (3, 32, 32))
    assert count_flops(model, (3, 32, 32), batch_size=3) == 3 * one
    assert model.training


def test_bad_input_size():
    with pytest.raises(ValueError, match="input_size must be"):
        count_flops(NAT(**TINY_NAT), (32, 32))


# NAT paper, Table 2 (and DiNAT's, same counts): GFLOPs (multiply-adds) at 224x224, to 0.1G
PAPER_GMACS = {"nat_mini": 2.7, "nat_tiny": 4.3, "nat_small": 7.8, "nat_base": 13.7}


@pytest.mark.parametrize("name", list(PAPER_GMACS))
def test_paper_flops_at_224(name):
    with torch.device("meta"):  # shapes are all FlopCounterMode needs: no weights, no activations
        model = timm.create_model(name)
    assert round(count_flops(model, (3, 224, 224)) / 1e9, 1) == PAPER_GMACS[name]


def test_meta_and_cpu_counts_agree():
    model = timm.create_model("nat_mini")
    with torch.device("meta"):
        meta = timm.create_model("nat_mini")
    assert count_flops(model) == count_flops(meta) == 2_694_812_672


def test_dinat_large_within_half_a_percent_of_the_dinat_table():
    # the DiNAT table's 30.6 / 89.7 / 92.4 G also count a few non-matmul ops (LN, RPB add): ~0.3% more
    for name, paper in [("dinat_large", 30.6), ("dinat_large_384", 89.7), ("dinat_large_384_11x11", 92.4)]:
        with torch.device("meta"):
            model = timm.create_model(name)
        macs = count_flops(model, model.pretrained_cfg["input_size"])
        assert macs / 1e9 == pytest.approx(paper, rel=5e-3), name


def test_dilation_does_not_change_the_cost_at_224():
    arch = dict(embed_dim=32, depths=(3, 4, 6, 5), num_heads=(1, 2, 4, 8), mlp_ratio=3.0)
    nat = NAT(**arch)
    dinat = NAT(**arch, dilations=_ARCHS["dinat_mini"]["dilations"])  # 7 * 8 = 56: no padding at 224
    assert count_flops(nat) == count_flops(dinat)
