"""The attention zoo (`models.mixers`).

* Registry contract, parametrized over every registered mixer (the other families' too): any map
  size runs, every parameter learns, eval is deterministic and survives a state-dict round trip, a
  tiny NAT built with the mixer trains.
* Backbone plumbing: `timm.create_model(..., mixer=..., mixer_kwargs=...)`, the default is NAT
  exactly, options and errors, features, FLOPs, configs.
* Semantics of the local / sparse mixers: each equals a float64 dense softmax attention (the
  mixer's own projections) masked by an attention pattern built HERE from the mechanism's
  definition, outputs and gradients (input and every parameter), on odd sizes, maps smaller than
  the window / block, batch 2.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from na_reference import natten_window_start
from torch import nn

from configs import load_config
from models import MIXERS, NAT, count_flops
from models.layers import NeighborhoodAttention2D
from models.mixers import build_mixer

DIM, HEADS = 8, 2
# this file's families (tests/test_mixers_global.py has the others' semantics)
LOCAL_MIXERS = (
    "bigbird",
    "dilated",
    "full",
    "global",
    "halo",
    "longformer",
    "na",
    "sasa",
    "shifted_window",
    "window",
)
# kernelized mixers: no attention matrix, so attn_drop > 0 is one ValueError (tests/test_mixers_global.py)
NO_ATTENTION_MATRIX = ("linear", "performer")
SMALL = dict(embed_dim=16, num_heads=(2, 4), num_classes=4)  # depths given by each test
TINY = dict(embed_dim=16, depths=(1, 1), num_heads=(2, 4), mlp_ratio=2.0, kernel_size=3, num_classes=4)


# ------------------------------------------------------------------------------------------------
# Registry contract (every mixer)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_any_map_size_runs(name):
    torch.manual_seed(0)
    mixer = MIXERS[name](DIM, HEADS).eval()
    for size in [(1, 1), (1, 5), (2, 3), (7, 9), (64, 64)]:
        out = mixer(torch.randn(2, *size, DIM))
        assert out.shape == (2, *size, DIM) and torch.isfinite(out).all(), size


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    mixer = MIXERS[name](DIM, HEADS).train()
    out = mixer(torch.randn(2, 9, 10, DIM))
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}: {pname} gets no gradient"


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_eval_depends_only_on_weights_and_input(name):
    torch.manual_seed(0)
    mixer = MIXERS[name](DIM, HEADS)
    mixer.train()(torch.randn(2, 6, 7, DIM))  # a training step in between must not change eval
    mixer.eval()
    x = torch.randn(2, 11, 13, DIM)
    first = mixer(x)
    assert torch.equal(first, mixer(x))
    torch.manual_seed(123)  # another RNG state, another init: the state dict alone must decide
    twin = MIXERS[name](DIM, HEADS).eval()
    twin.load_state_dict(copy.deepcopy(mixer.state_dict()))
    assert torch.equal(first, twin(x))


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_inference_mode_first_then_training(name):
    # index / mask caches first built under inference_mode must still serve autograd
    mixer = MIXERS[name](DIM, HEADS)
    x = torch.randn(1, 5, 6, DIM)
    with torch.inference_mode():
        expected = mixer.eval()(x)
    mixer.train()(x.requires_grad_()).sum().backward()  # (training may draw noise: no comparison)
    assert x.grad is not None
    torch.testing.assert_close(mixer.eval()(x), expected)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_attention_dropout_only_in_training(name):
    if name in NO_ATTENTION_MATRIX:  # nothing to apply it to: refused, not silently ignored
        with pytest.raises(ValueError, match=rf"mixer '{name}' forms no attention matrix to drop out"):
            MIXERS[name](DIM, HEADS, attn_drop=0.5)
        return
    torch.manual_seed(0)
    plain = MIXERS[name](DIM, HEADS).eval()
    dropping = MIXERS[name](DIM, HEADS, attn_drop=0.5)
    dropping.load_state_dict(plain.state_dict())
    x = torch.randn(2, 9, 10, DIM)
    assert torch.equal(dropping.eval()(x), plain(x))
    if name in LOCAL_MIXERS:  # (a mixer without attention weights may have nothing to drop)
        assert not torch.allclose(dropping.train()(x), plain(x))


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_tiny_nat_with_the_mixer_trains(name):
    torch.manual_seed(0)
    model = timm.create_model("nat_mini", mixer=name, drop_path_rate=0.0, **TINY)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


# ------------------------------------------------------------------------------------------------
# Backbone


def test_default_mixer_is_nat_exactly():
    torch.manual_seed(0)
    default = NAT(**TINY)
    torch.manual_seed(0)
    explicit = NAT(**TINY, mixer="na")
    assert all(type(b.attn) is NeighborhoodAttention2D for s in default.stages for b in s.blocks)
    assert list(default.state_dict()) == list(explicit.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(default.eval()(x), explicit.eval()(x))
    # parameter counts and checkpoints are tests/test_nat.py's; here: DiNAT's dilations still reach NA
    dinat = timm.create_model("dinat_mini")
    assert [b.attn.dilation for b in dinat.stages[1].blocks] == [1, 4, 1, 4]


def test_per_stage_mixers_and_options_reach_the_blocks():
    model = timm.create_model(
        "dinat_mini",
        mixer=("window", "dilated", "longformer", "na"),
        mixer_kwargs=(dict(window_size=4), None, dict(num_global=2), {}),
        kernel_size=(7, 5, 3, 3),
    )
    assert model.mixer == ("window", "dilated", "longformer", "na")
    s0, s1, s2, s3 = (stage.blocks for stage in model.stages)
    assert type(s0[0].attn) is MIXERS["window"] and s0[0].attn.window_size == 4
    # NAT's kernel size reaches mixers that take one; a DiNAT dilation > 1 too, 1 keeps the default
    assert [(b.attn.kernel_size, b.attn.dilation) for b in s1] == [(5, 2), (5, 4), (5, 2), (5, 4)]
    assert [b.attn.head_dilations for b in s2[:2]] == [(1, 1, 1, 1, 2, 2, 2, 2), (1, 1, 1, 1, 2, 2, 2, 2)]
    assert s2[0].attn.num_global == 2 and s2[0].attn.kernel_size == 3
    assert type(s3[0].attn) is NeighborhoodAttention2D and s3[0].attn.kernel_size == 3
    # a stage entry that is a sequence is cycled over the blocks: Swin's W-MSA / SW-MSA alternation
    swin = timm.create_model("nat_mini", mixer=[["window", "shifted_window"], "na"], depths=(3, 1), **SMALL)
    assert [b.attn.shift_size for b in swin.stages[0].blocks] == [0, 3, 0]
    assert type(swin.stages[1].blocks[0].attn) is NeighborhoodAttention2D
    one_dict = timm.create_model("nat_mini", mixer="halo", mixer_kwargs=dict(block_size=4, halo=2), **TINY)
    assert all(b.attn.block_size == 4 and b.attn.halo == 2 for s in one_dict.stages for b in s.blocks)


def test_block_arguments_pass_through():
    mixer = build_mixer(
        "window", 8, 2, kernel_size=3, qkv_bias=False, qk_scale=0.5, attn_drop=0.1, proj_drop=0.2
    )
    assert (
        mixer.qkv.bias is None and mixer.scale == 0.5 and mixer.attn_drop == 0.1 and mixer.proj_drop.p == 0.2
    )
    na = build_mixer("na", 8, 2, kernel_size=5, dilation=3, backend="naive")
    assert (na.kernel_size, na.dilation, na.backend) == (5, 3, "naive")


def test_bad_mixers_and_options_raise_one_clear_error():
    with pytest.raises(ValueError, match=r"unknown mixer 'bogus'; choose one of: .*bigbird.*window"):
        timm.create_model("nat_mini", mixer="bogus")
    with pytest.raises(
        ValueError, match=r"mixer 'sasa' does not take option\(s\) window_size; its options: kernel"
    ):
        timm.create_model("nat_mini", mixer="sasa", mixer_kwargs=dict(window_size=3))
    with pytest.raises(ValueError, match="qkv_bias: set on the model"):
        NAT(**TINY, mixer="full", mixer_kwargs=dict(qkv_bias=False))
    with pytest.raises(ValueError, match="one entry per stage"):
        NAT(**TINY, mixer=("full", "na", "na"))
    with pytest.raises(ValueError, match="one entry per stage"):
        NAT(**TINY, mixer=("full", []))
    with pytest.raises(ValueError, match="one entry per stage"):
        NAT(**TINY, mixer=("full", 3))
    with pytest.raises(ValueError, match="unknown mixer 'swin'"):
        NAT(**TINY, mixer=("full", ("window", "swin")))
    with pytest.raises(ValueError, match="one dict per stage"):
        NAT(**TINY, mixer_kwargs=[{}])
    impossible = [
        ("window", dict(window_size=0), "window_size must be an integer >= 1"),
        ("shifted_window", dict(window_size=-2), "'shifted_window': window_size must be an integer >= 1"),
        ("halo", dict(block_size=0), "block_size must be an integer >= 1"),
        ("halo", dict(halo=-1), "halo must be an integer >= 0"),
        ("sasa", dict(kernel_size=4), "kernel_size must be an odd integer"),
        ("global", dict(num_global=0), "num_global must be an integer >= 1"),
        ("longformer", dict(dilation=0), "dilation must be an integer >= 1"),
        ("bigbird", dict(block_size=2.5), "block_size must be an integer >= 1"),
        ("bigbird", dict(num_random=-1), "num_random must be an integer >= 0"),
    ]
    for name, options, message in impossible:
        with pytest.raises(ValueError, match=message):
            NAT(**TINY, mixer=name, mixer_kwargs=options)


def test_features_and_intermediates_with_mixers():
    kwargs = dict(
        TINY, mixer=("bigbird", "shifted_window"), mixer_kwargs=(dict(block_size=3), dict(window_size=3))
    )
    torch.manual_seed(0)
    features = timm.create_model("nat_mini", features_only=True, out_indices=(0, 1), **kwargs).eval()
    x = torch.randn(2, 3, 40, 24)
    assert [f.shape for f in features(x)] == [(2, 16, 10, 6), (2, 32, 5, 3)]
    torch.manual_seed(0)  # the same weights (and random blocks) as `features`
    model = timm.create_model("nat_mini", **kwargs).eval()
    final, inter = model.forward_intermediates(x)
    assert [t.shape for t in inter] == [(2, 16, 10, 6), (2, 32, 5, 3)]
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(inter[1], features(x)[1])


def test_global_tokens_skip_weight_decay():
    model = NAT(**TINY, mixer=("global", "bigbird"))
    skip = model.no_weight_decay()
    assert {"stages.0.blocks.0.attn.global_tokens", "stages.1.blocks.0.attn.global_tokens"} <= skip
    assert "stages.0.blocks.0.attn.rpb" in skip and "stages.0.blocks.0.attn.qkv.weight" not in skip


class _MapModel(nn.Module):
    """A mixer alone, taking `count_flops`' NCHW input."""

    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer(x.permute(0, 2, 3, 1))


@pytest.mark.parametrize(
    "name, options, qkv_tokens, logits",
    [
        # a 13 x 11 map (143 tokens); maps padded to a window / block multiple are 16 x 12 = 192 tokens;
        # logits: query-key products per head (averaged over heads), masked ones included
        ("full", {}, 143, 143 * 143),
        ("na", dict(kernel_size=5), 143, 143 * 25),
        # blocked (7 x 7 query blocks): 14 x 14 query slots, each block against the union of its
        # queries' windows, at most (7 + k - 1) per axis: 9 x 9 for k = 5
        ("sasa", dict(kernel_size=5), 143, 196 * 81),
        ("window", dict(window_size=4), 192, 192 * 16),
        ("shifted_window", dict(window_size=4), 192, 192 * 16),
        ("halo", dict(block_size=4, halo=1), 192, 192 * 36),
        # blocked as sasa: 8 x 8 window keys for k = 3, + the global tokens
        ("global", dict(kernel_size=3, num_global=2), 143, 196 * (64 + 2)),
        # head 1 as global; head 2 (dilation 2) blocked per dilation group: 14 x 12 query slots
        # against 7 x 6 keys
        ("longformer", dict(kernel_size=3, num_global=1), 143, (196 * (64 + 1) + 168 * (42 + 1)) // 2),
        # 4 x 3 blocks of 16: a 3 x 3 window of blocks + 1 random block + 2 global tokens
        ("bigbird", dict(block_size=4, num_random=1, num_global=2), 192, 192 * (10 * 16 + 2)),
    ],
)
def test_flops_charge_each_mixer_what_it_computes(name, options, qkv_tokens, logits):
    H, W, C = 13, 11, DIM
    mixer = MIXERS[name](C, HEADS, **options)
    expected = qkv_tokens * 3 * C * C + H * W * C * C  # qkv (on the padded map if padded), proj
    expected += 2 * logits * C  # QK^T and AV
    G = options.get("num_global", 0)
    # global tokens: their qkv, their attention over the map and each other, proj, updated keys/values
    expected += G * 3 * C * C + 2 * G * (H * W + G) * C + G * C * C + G * 2 * C * C
    assert count_flops(_MapModel(mixer), (C, H, W)) == expected


def test_count_flops_sees_full_attention_on_cpu():
    # torch's counter does not know the CPU flash kernel: without count_flops' formula this is linears only
    mixer = MIXERS["full"](DIM, HEADS)
    assert count_flops(_MapModel(mixer), (DIM, 40, 40)) == 4 * 1600 * DIM * DIM + 2 * 1600**2 * DIM


def test_config_selects_mixers():
    cfg = load_config(["configs/zoo_demo.yaml"])
    model = timm.create_model(cfg["model"]["name"], **cfg["model"]["kwargs"])
    assert model.mixer == ("halo", "full", "full") and model.stages[0].blocks[1].attn.block_size == 4
    cfg = load_config(
        ["configs/zoo_demo.yaml"], ["model.kwargs={depths: [1, 1], num_heads: [2, 4], mixer: sasa}"]
    )
    model = timm.create_model(cfg["model"]["name"], **cfg["model"]["kwargs"])
    assert model.mixer == ("sasa", "sasa")


# ------------------------------------------------------------------------------------------------
# Semantics: dense float64 attention masked by patterns built from each mechanism's definition

NEG = float("-inf")


def _grid(H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each token, row-major, `(N,)` each."""
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return yy.flatten(), xx.flatten()


def _attend(mixer, q, k, v, allowed, bias=None):
    """Dense softmax over keys: q (B, h, Nq, D), k/v (B, h, Nk, D), allowed (h or 1, Nq, Nk)."""
    logits = q @ k.transpose(-1, -2) * mixer.scale
    if bias is not None:
        logits = logits + bias
    return logits.masked_fill(~allowed, NEG).softmax(-1) @ v


def _qkv(mixer, x):
    """The mixer's own projections, `(B, h, N, D)` each (row-major tokens)."""
    B, H, W, C = x.shape
    qkv = mixer.qkv(x).reshape(B, H * W, 3, mixer.num_heads, C // mixer.num_heads)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _out(mixer, o, H, W):
    B, h, _, D = o.shape
    return mixer.proj(o.transpose(1, 2).reshape(B, H, W, h * D))


def _with_global_keys(mixer, k, v):
    """The map's keys/values `(B, h, N, D)` followed by the global tokens', after the tokens' own step:
    each attends to every map token and every token, and is updated residually through `proj`."""
    B, h, N, D = k.shape
    G, g = mixer.num_global, mixer.global_tokens
    qg, kg, vg = mixer.qkv(g).reshape(G, 3, h, D).permute(1, 2, 0, 3)
    every = torch.ones(1, G, N + G, dtype=torch.bool)
    pooled = _attend(
        mixer,
        qg.expand(B, -1, -1, -1),
        torch.cat([k, kg.expand(B, -1, -1, -1)], 2),
        torch.cat([v, vg.expand(B, -1, -1, -1)], 2),
        every,
    )
    updated = g + mixer.proj(pooled.transpose(1, 2).reshape(B, G, h * D))
    _, k2, v2 = mixer.qkv(updated).reshape(B, G, 3, h, D).permute(2, 0, 3, 1, 4)
    return torch.cat([k, k2], 2), torch.cat([v, v2], 2)


def dense_reference(mixer, x, allowed, bias=None):
    """Self-attention of the map on itself with the pattern `allowed` (h or 1, N, N) and `bias` (h, N, N)."""
    q, k, v = _qkv(mixer, x)
    return _out(mixer, _attend(mixer, q, k, v, allowed, bias), *x.shape[1:3])


def _table(rpb, rows, cols):
    """Bias of each (query, key) pair from a `(h, S, S)` table at (rows, cols) `(Nq, Nk)`."""
    return rpb[:, rows, cols]


def sasa_pattern(mixer, H, W):
    r = mixer.kernel_size // 2
    y, x = _grid(H, W)
    dy, dx = y[None] - y[:, None], x[None] - x[:, None]  # key minus query
    allowed = (dy.abs() <= r) & (dx.abs() <= r)
    bias = _table(mixer.rpb, (dy + r).clamp(0, 2 * r), (dx + r).clamp(0, 2 * r))
    return allowed[None], bias


def _swin_groups(length, w, shift):
    if length <= w:
        return torch.zeros(length, dtype=torch.long)
    return (torch.arange(length) + w - shift) // w


def window_pattern(mixer, H, W, shifted=False):
    w = mixer.window_size
    s = w // 2 if shifted else 0  # Swin's shift
    y, x = _grid(H, W)
    gy, gx = _swin_groups(H, w, s)[y], _swin_groups(W, w, s)[x]
    allowed = (gy[:, None] == gy[None]) & (gx[:, None] == gx[None])
    dy, dx = y[None] - y[:, None], x[None] - x[:, None]
    return allowed[None], _table(
        mixer.rpb, (dy + w - 1).clamp(0, 2 * w - 2), (dx + w - 1).clamp(0, 2 * w - 2)
    )


def shifted_window_pattern(mixer, H, W):
    return window_pattern(mixer, H, W, shifted=True)


def halo_pattern(mixer, H, W):
    b, h = mixer.block_size, mixer.halo
    y, x = _grid(H, W)
    by, bx = min(b, H), min(b, W)
    top, left = (y // by) * by, (x // bx) * bx  # each query's block origin
    allowed = (
        (y[None] >= top[:, None] - h)
        & (y[None] < top[:, None] + by + h)
        & (x[None] >= left[:, None] - h)
        & (x[None] < left[:, None] + bx + h)
    )
    c = b + h - 1
    dy, dx = y[None] - y[:, None], x[None] - x[:, None]
    return allowed[None], _table(mixer.rpb, (dy + c).clamp(0, 2 * c), (dx + c).clamp(0, 2 * c))


def na_axis(length, kernel_size, dilation):
    """Key positions of each query on one axis, natten's definition (tests/na_reference.py)."""
    return [
        [natten_window_start(i, length, kernel_size, dilation) + dilation * t for t in range(kernel_size)]
        for i in range(length)
    ]


def na_pattern(kernel_size, dilation, H, W, rpb):
    """NA's pattern on an H x W map (at least kernel_size * dilation on each axis)."""
    rows, cols = na_axis(H, kernel_size, dilation), na_axis(W, kernel_size, dilation)
    y, x = _grid(H, W)
    allowed = torch.zeros(H * W, H * W, dtype=torch.bool)
    for n in range(H * W):
        in_rows = torch.isin(y, torch.tensor(rows[y[n]]))
        allowed[n] = in_rows & torch.isin(x, torch.tensor(cols[x[n]]))
    c = kernel_size - 1
    dy, dx = (y[None] - y[:, None]) // dilation, (x[None] - x[:, None]) // dilation
    return allowed, _table(rpb, (dy + c).clamp(0, 2 * c), (dx + c).clamp(0, 2 * c))


def na_reference(mixer, x):
    """NeighborhoodAttention2D's definition: zero-pad the map to the window, NA on it, crop."""
    H, W = x.shape[1:3]
    window = mixer.kernel_size * mixer.dilation
    padded = F.pad(x, (0, 0, 0, max(0, window - W), 0, max(0, window - H)))
    Hp, Wp = padded.shape[1:3]
    allowed, bias = na_pattern(mixer.kernel_size, mixer.dilation, Hp, Wp, mixer.rpb)
    q, k, v = _qkv(mixer, padded)
    o = _attend(mixer, q, k, v, allowed[None], bias)
    o = o.unflatten(2, (Hp, Wp))[:, :, :H, :W].flatten(2, 3)
    return _out(mixer, o, H, W)


def global_reference(mixer, x, head_dilations):
    """Two steps: global tokens attend to everything; the map attends to NA windows + updated tokens."""
    H, W = x.shape[1:3]
    h = mixer.num_heads
    k_size = mixer.kernel_size
    local, bias = [], []
    for head, d in enumerate(head_dilations):
        # NA on the map padded to the window, padded keys never attended; queries of the real map
        Hp, Wp = max(H, k_size * d), max(W, k_size * d)
        allowed, b = na_pattern(k_size, d, Hp, Wp, mixer.rpb[head : head + 1])
        real = (torch.arange(Hp) < H)[:, None] & (torch.arange(Wp) < W)
        keep = real.flatten()
        local.append(allowed[keep][:, keep])
        bias.append(b[:, keep][:, :, keep])
    local, bias = torch.stack(local), torch.cat(bias)
    q, k, v = _qkv(mixer, x)
    k, v = _with_global_keys(mixer, k, v)
    G = mixer.num_global
    allowed = torch.cat([local, torch.ones(h, H * W, G, dtype=torch.bool)], -1)
    bias = torch.cat([bias, torch.zeros(h, H * W, G, dtype=bias.dtype)], -1)
    return _out(mixer, _attend(mixer, q, k, v, allowed, bias), H, W)


def bigbird_reference(mixer, x):
    """Block pattern: 3x3 clamped block window + the mixer's random blocks (checked) + global tokens."""
    B, H, W, C = x.shape
    b = mixer.block_size
    bh, bw = min(b, H), min(b, W)
    gh, gw = -(-H // bh), -(-W // bw)
    y, xx = _grid(H, W)
    block = (y // bh) * gw + xx // bw  # block of each token, row-major over the grid

    def window(n, i):
        k = min(3, n)
        start = min(max(i - 1, 0), n - k)
        return set(range(start, start + k))

    index, used = mixer.key_blocks(gh, gw)
    sees = torch.zeros(mixer.num_heads, gh * gw, gh * gw, dtype=torch.bool)  # query block -> key block
    for qb in range(gh * gw):
        near = {r * gw + c for r in window(gh, qb // gw) for c in window(gw, qb % gw)}
        for head in range(mixer.num_heads):
            drawn = index[head, qb][used[head, qb]].tolist()
            others = gh * gw - len(near)
            # the random blocks: distinct, outside the window, as many as the grid allows
            assert len(set(drawn)) == len(drawn) and len(drawn) == len(near) + min(mixer.num_random, others)
            assert set(drawn) >= near and all(0 <= d < gh * gw for d in drawn)
            sees[head, qb, drawn] = True
    allowed = sees[:, block][:, :, block]  # (h, N, N)
    q, k, v = _qkv(mixer, x)
    if mixer.num_global == 0:
        return _out(mixer, _attend(mixer, q, k, v, allowed), H, W)
    k, v = _with_global_keys(mixer, k, v)
    G, h = mixer.num_global, mixer.num_heads
    allowed = torch.cat([allowed, torch.ones(h, H * W, G, dtype=torch.bool)], -1)
    return _out(mixer, _attend(mixer, q, k, v, allowed), H, W)


def _pattern_reference(pattern):
    def reference(mixer, x):
        allowed, bias = pattern(mixer, *x.shape[1:3])
        return dense_reference(mixer, x, allowed, bias)

    return reference


SEMANTIC_CASES = [
    ("full", {}, lambda m, x: dense_reference(m, x, torch.ones(1, 1, 1, dtype=torch.bool))),
    ("na", dict(kernel_size=3), na_reference),
    ("na", dict(kernel_size=5), na_reference),
    ("dilated", dict(kernel_size=3), na_reference),  # dilation 2 by default
    ("dilated", dict(kernel_size=3, dilation=3), na_reference),
    ("sasa", dict(kernel_size=3), _pattern_reference(sasa_pattern)),
    ("sasa", dict(kernel_size=5), _pattern_reference(sasa_pattern)),
    ("window", dict(window_size=4), _pattern_reference(window_pattern)),
    ("window", dict(window_size=3), _pattern_reference(window_pattern)),
    ("shifted_window", dict(window_size=4), _pattern_reference(shifted_window_pattern)),
    ("shifted_window", dict(window_size=5), _pattern_reference(shifted_window_pattern)),
    ("halo", dict(block_size=4, halo=1), _pattern_reference(halo_pattern)),
    ("halo", dict(block_size=3, halo=2), _pattern_reference(halo_pattern)),
    ("global", dict(kernel_size=3, num_global=2), lambda m, x: global_reference(m, x, (1, 1))),
    ("longformer", dict(kernel_size=3, dilation=2), lambda m, x: global_reference(m, x, (1, 2))),
    # sides of 1-3 with dilation 3: fewer dilation groups than the dilation (DiNAT at small inputs)
    ("longformer", dict(kernel_size=3, dilation=3), lambda m, x: global_reference(m, x, (1, 3))),
    ("bigbird", dict(block_size=3, num_random=1, num_global=1), bigbird_reference),
    ("bigbird", dict(block_size=2, num_random=2, num_global=0), bigbird_reference),
]


@pytest.mark.parametrize(
    "name, options, reference",
    SEMANTIC_CASES,
    ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o, _ in SEMANTIC_CASES],
)
def test_mixer_equals_dense_attention_with_its_pattern(name, options, reference):
    torch.manual_seed(0)
    mixer = MIXERS[name](DIM, HEADS, **options).double().eval()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.5)  # large enough that biases and patterns matter
    params = list(mixer.parameters())
    for size in [(7, 9), (13, 11), (2, 3), (1, 1)]:
        x = torch.randn(2, *size, DIM, dtype=torch.float64, requires_grad=True)
        out, expected = mixer(x), reference(mixer, x)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9, msg=f"{name} {size}")
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, *params], grad)
        want = torch.autograd.grad(expected, [x, *params], grad)
        for (pname, _), a, b in zip([("input", x), *mixer.named_parameters()], got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"{name} {size} grad of {pname}")


def test_checkpoint_of_a_zoo_model_loads_through_the_filter(tmp_path):
    kwargs = dict(TINY, mixer=("full", "window"), mixer_kwargs=(None, dict(window_size=2)))
    torch.manual_seed(0)
    trained = timm.create_model("nat_mini", **kwargs).eval()
    path = tmp_path / "zoo.pth"
    torch.save({"state_dict": trained.state_dict()}, path)
    loaded = timm.create_model("nat_mini", pretrained=str(path), **kwargs).eval()
    x = torch.randn(1, 3, 32, 32)
    # (timm re-initialises the classifier: the pretrained cfg has 1000 classes)
    assert torch.equal(loaded.forward_features(x), trained.forward_features(x))
    with pytest.raises(
        ValueError, match=r"does not fit nat_mini: missing \['stages.0.blocks.0.attn.global_tokens'"
    ):
        timm.create_model("nat_mini", pretrained=str(path), **dict(kwargs, mixer=("global", "window")))


def test_every_local_mixer_is_registered_and_checked_against_its_pattern():
    assert set(LOCAL_MIXERS) <= set(MIXERS)
    assert {name for name, _, _ in SEMANTIC_CASES} == set(LOCAL_MIXERS)
