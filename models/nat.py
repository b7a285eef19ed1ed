"""NAT and DiNAT: Neighborhood Attention Transformers, as a timm model family.

* NAT: `Neighborhood Attention Transformer` - https://arxiv.org/abs/2204.07143
* DiNAT: `Dilated Neighborhood Attention Transformer` - https://arxiv.org/abs/2209.15001

Architecture, hyper-parameters and checkpoints follow the official repository,
https://github.com/SHI-Labs/Neighborhood-Attention-Transformer (classification/nat.py, dinat.py).
DiNAT is NAT with per-block dilations: within each stage blocks alternate NA (dilation 1) and
dilated NA, with the dilation picked so the dilated window spans the stage's map at the training
resolution (224: 8/4/2/1, 384: 13/6/3/1).

Internal names are timm's (`stem`, `stages.N.downsample`, `stages.N.blocks.M`, `norm`, `head.fc`);
`checkpoint_filter_fn` maps the official key layout (`patch_embed`, `levels`, `head`) and Hugging Face
transformers' (`nat.embeddings`, `nat.encoder.levels`, `classifier`) onto them.
The official repo puts the downsampler at the end of level i, here it opens stage i + 1.

Inputs of any size work: a map smaller than a layer's window (kernel_size * dilation) is
zero-padded then cropped by `NeighborhoodAttention2D`, what the official models got from natten
0.14. The official code does not shrink dilations for small inputs, so neither does this one.
The stem and downsamplers are stride-2 3x3 convs with padding 1, as the official ones: any H x W
(odd, non-square) gives maps of ceil(H / 4), then half of that rounded up per stage.

Dense backbones (detection / segmentation): `stage_norms=True` gives the layout of the official
repo's `detection/` and `segmentation/` backbones and Hugging Face's NatBackbone / DinatBackbone,
one LayerNorm per stage output (features taken before the next stage's downsampler, which is what a
stage returns here), no final norm; `frozen_stages` freezes the stem and the first levels as mmdet's
ResNet / Swin do (the official configs freeze nothing); `dilations="coco"` / `"ade20k"` /
`"ade20k_640"` set the official dense configs' dilations:

    timm.create_model("dinat_tiny", features_only=True, stage_norms=True, dilations="coco",
                      frozen_stages=1, pretrained="dinat_tiny_in1k_224.pth")  # -> 4 NCHW maps
"""

import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.error import URLError

import torch
from safetensors import SafetensorError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, LayerScale, Mlp, register_notrace_module, trunc_normal_
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table_simple
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._helpers import clean_state_dict
from torch import nn

from .layers import NeighborhoodAttention2D
from .layers.block_ops import (
    conv2d_nhwc_bf16,
    fusable_conv,
    fusable_layer_norm,
    fused_bf16_applies,
    layer_norm_bf16,
    residual_add_bf16,
    residual_layer_norm_bf16,
)
from .mixers import build_mixer, check_mixer

__all__ = ["DENSE_DILATIONS", "NAT", "checkpoint_filter_fn", "dinat_dilations", "named_dilations"]

_logger = logging.getLogger(__name__)

# A leaf for timm's FX tracer (FeatureGraphNet, timm's FX tests): the traced graph then calls the module,
# so a traced NAT scripts (TorchScript takes the module's `is_scripting` path instead of compiling the
# backend dispatcher, which it can't).
register_notrace_module(NeighborhoodAttention2D)


# Per-stage dilation patterns, cycled over a stage's blocks, of the official configs (kernel 7):
# classification at 224 (DiNAT's rule, = dinat_dilations(depths, (8, 4, 2, 1))); detection/configs/dinat/
# (Mask / Cascade Mask R-CNN, COCO 800 x 1333); segmentation/configs/dinat/ (UPerNet, ADE20K 512 x 512,
# and DiNAT-L's 640 x 640, whose third stage is not a 6-block cycle).
DENSE_DILATIONS: dict[str, tuple[tuple[int, ...], ...]] = {
    "imagenet": ((1, 8), (1, 4), (1, 2), (1, 1)),
    "coco": ((1, 28, 1), (1, 7, 1, 14), (1, 3, 1, 5, 1, 7), (1, 3)),
    "ade20k": ((1, 16, 1), (1, 4, 1, 8), (1, 2, 1, 3, 1, 4), (1, 2)),
    "ade20k_640": ((1, 20, 1), (1, 5, 1, 10), (1, 2, 1, 3, 1, 4, 1, 5, 1, 2, 1, 3, 1, 4, 1, 5, 1, 5), (1, 2)),
}


def named_dilations(name: str, depths: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The official dilations called `name` (a key of DENSE_DILATIONS) for a 4-stage model of `depths`:
    block j of stage i gets pattern[i][j % len(pattern[i])] (DiNAT-T/S/B/L's 18-block stage 3 is the
    6-block pattern three times)."""
    if name not in DENSE_DILATIONS:
        raise ValueError(f"dilations {name!r} is not a known set: use one of {sorted(DENSE_DILATIONS)}")
    if len(depths) != 4:
        raise ValueError(
            f"dilations {name!r} are the official 4-stage ones; this model has {len(depths)} stages "
            f"(depths {tuple(depths)}): give one dilation per block instead"
        )
    return tuple(
        tuple(pattern[j % len(pattern)] for j in range(depth))
        for depth, pattern in zip(depths, DENSE_DILATIONS[name], strict=True)
    )


def dinat_dilations(depths: Sequence[int], stage_dilations: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """DiNAT's schedule: in each stage, even blocks use NA (dilation 1), odd blocks dilated NA."""
    return tuple(
        tuple(1 if j % 2 == 0 else d for j in range(depth))
        for depth, d in zip(depths, stage_dilations, strict=True)
    )


def _stage_mixers(
    mixer: str | Sequence[str | Sequence[str]],
    mixer_kwargs: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None,
    num_stages: int,
) -> tuple[tuple[str | tuple[str, ...], ...], tuple[dict[str, Any], ...]]:
    """Per-stage mixers (a name, or names cycled over the blocks) and options, all checked up front."""

    def entry(m: Any) -> str | tuple[str, ...]:  # () for anything else: the error below
        return m if isinstance(m, str) else tuple(m) if isinstance(m, Sequence) else ()

    per_stage = (mixer,) * num_stages if isinstance(mixer, str) else entry(mixer)
    mixers = tuple(entry(m) for m in per_stage)
    if len(mixers) != num_stages or any(not m for m in mixers):
        raise ValueError(
            f"mixer {mixer!r} must be a name or one entry per stage ({num_stages}): a name or a non-empty "
            "sequence of names cycled over the stage's blocks"
        )
    if mixer_kwargs is None or isinstance(mixer_kwargs, Mapping):
        options = (dict(mixer_kwargs or {}),) * num_stages
    else:
        options = tuple(dict(o or {}) for o in mixer_kwargs)
        if len(options) != num_stages:
            raise ValueError(
                f"mixer_kwargs must be one dict or one dict per stage ({num_stages}), got {len(options)}"
            )
    for names, opts in zip(mixers, options, strict=True):
        for name in (names,) if isinstance(names, str) else names:
            check_mixer(name, opts)
    return mixers, options


@torch.fx.wrap
def _mix(mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`mixer(x)`, recorded by FX (torchvision / timm feature extraction) as one call that runs eagerly:
    the zoo's mixers pick block sizes, paddings and paths from the map's size."""
    return mixer(x)


class ConvStem(nn.Module):
    """Tokenizer: two 3x3 stride-2 convs (embed_dim/2, then embed_dim) and a LayerNorm, NCHW -> NHWC."""

    def __init__(self, in_chans: int, embed_dim: int, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last convs: oneDNN's native layout on CPU (stem + downsamplers fwd+bwd 90 -> 74 ms
        # at 224, batch 8), and the permute below is then a free view instead of a copy.
        x = self.conv2(self.conv1(x.contiguous(memory_format=torch.channels_last))).permute(0, 2, 3, 1)
        if not torch.jit.is_scripting() and self._fused_bf16_applies(x):
            return self._norm_fused_bf16(x)
        return self.norm(x)

    @torch.jit.unused
    def _fused_bf16_applies(self, x: torch.Tensor) -> bool:
        return fused_bf16_applies(x) and fusable_layer_norm(self.norm)  # x first: FX proxies say False

    @torch.jit.unused
    def _norm_fused_bf16(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_bf16(x, self.norm)


class ConvDownsample(nn.Module):
    """3x3 stride-2 conv (no bias) to `out_dim` channels and a LayerNorm, NHWC in and out."""

    def __init__(self, dim: int, out_dim: int, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._fused_bf16_applies(x):
            return self._forward_fused_bf16(x)
        x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.norm(x)

    @torch.jit.unused
    def _fused_bf16_applies(self, x: torch.Tensor) -> bool:
        """bf16 autocast on CPU: the conv's weight gradient as one GEMM, the LayerNorm in one pass
        (layers/block_ops.py)."""
        return fused_bf16_applies(x) and fusable_conv(self.conv) and fusable_layer_norm(self.norm)

    @torch.jit.unused
    def _forward_fused_bf16(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_bf16(conv2d_nhwc_bf16(x, self.conv), self.norm)


class NATBlock(nn.Module):
    """LN -> NA (with RPB) -> [layer scale] -> drop-path residual; LN -> MLP -> [layer scale] -> residual.

    `mixer` names another token mixer of the attention zoo (`models.mixers.MIXERS`) in NA's place,
    with `mixer_kwargs` as its options; the default "na" is `NeighborhoodAttention2D`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        layer_scale: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        attn_backend: str = "auto",
        mixer: str = "na",
        mixer_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = build_mixer(
            mixer,
            dim,
            num_heads,
            kernel_size=kernel_size,
            dilation=dilation,
            backend=attn_backend,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            options=mixer_kwargs,
        )
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._fused_bf16_applies(x):
            return self._forward_fused_bf16(x)
        if torch.jit.is_scripting() or isinstance(self.attn, NeighborhoodAttention2D):
            mixed = self.attn(self.norm1(x))  # NA traces through (its shape-dependent parts are FX leaves)
        else:
            mixed = _mix(self.attn, self.norm1(x))
        x = x + self.drop_path1(self.ls1(mixed))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    @torch.jit.unused
    def _fused_bf16_applies(self, x: torch.Tensor) -> bool:
        """bf16 autocast on CPU, with affine float32 LayerNorms: LayerNorms and drop-path residual adds
        in one pass each (layers/block_ops.py)."""
        # x first: under FX it is a proxy, and this says False
        return fused_bf16_applies(x) and fusable_layer_norm(self.norm1) and fusable_layer_norm(self.norm2)

    @torch.jit.unused
    def _forward_fused_bf16(self, x: torch.Tensor) -> torch.Tensor:
        x, normed = residual_layer_norm_bf16(
            x, self.ls1(self.attn(layer_norm_bf16(x, self.norm1))), self.drop_path1, self.norm2
        )
        return residual_add_bf16(x, self.ls2(self.mlp(normed)), self.drop_path2)


class NATStage(nn.Module):
    """Optional downsampler (stages 1..N-1) followed by `depth` NAT blocks; NHWC in and out.

    `mixer`: the blocks' token mixer, or a sequence cycled over the blocks (Swin's alternation:
    ("window", "shifted_window")).
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        kernel_size: int,
        dilations: Sequence[int],
        downsample: bool,
        drop_path: Sequence[float],
        norm_layer: type[nn.Module] = nn.LayerNorm,
        mixer: str | Sequence[str] = "na",
        **block_kwargs: Any,
    ):
        super().__init__()
        mixers = (mixer,) if isinstance(mixer, str) else tuple(mixer)
        self.grad_checkpointing = False
        self.downsample = ConvDownsample(dim, out_dim, norm_layer) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                NATBlock(
                    out_dim,
                    num_heads,
                    kernel_size=kernel_size,
                    dilation=dilations[i],
                    drop_path=drop_path[i],
                    norm_layer=norm_layer,
                    mixer=mixers[i % len(mixers)],
                    **block_kwargs,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x)
        else:
            x = self.blocks(x)
        return x


class NAT(nn.Module):
    """Neighborhood Attention Transformer; with `dilations` set, DiNAT.

    Args:
        in_chans: Input image channels.
        num_classes: Classifier outputs; 0 for no classifier (`forward` returns pooled features).
        global_pool: Pooling before the classifier ('avg', as the official models, or any timm pool).
        embed_dim: Channels of stage 0; each later stage doubles them.
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        kernel_size: NA window size (odd); an int for all stages or one per stage.
        dilations: Per stage, one dilation per block (DiNAT); None means all 1 (NAT); or the name of
            an official set in DENSE_DILATIONS ("coco", "ade20k", "ade20k_640", "imagenet").
        mlp_ratio: MLP hidden width / block width.
        qkv_bias: Bias in the qkv projection.
        qk_scale: Attention logit scale; None means head_dim ** -0.5.
        layer_scale: Initial value of the layer-scale gammas; None for no layer scale.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after the attention projection and in the MLP (the official `drop_rate`).
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth, linearly increasing over all blocks up to this value.
        norm_layer: Normalization (channels-last).
        attn_backend: NA backend for every block ('auto', 'cpp', 'torch', 'naive', 'natten', 'flex').
        mixer: Token mixer of every block, or one per stage: a name in `models.mixers.MIXERS`
            ("na", the default, builds NAT exactly; "full", "window", "bigbird", ...); a stage's
            entry may be a sequence of names, cycled over its blocks (("window", "shifted_window")).
        mixer_kwargs: The mixers' options: one dict for all stages or one dict (or None) per stage.
            `kernel_size`, the dilations (> 1) and `attn_backend` reach mixers that take them.
        stage_norms: The official dense backbones' layout: one LayerNorm per stage output
            (`stage_norms.i`; official `norm{i}`, Hugging Face `hidden_states_norms.stage{i+1}`),
            applied by `forward_intermediates` (so `features_only` returns them) and, for the last
            stage, by `forward_features` in place of the final `norm`, which this layout has not.
        frozen_stages: -1 trains everything; 0 freezes the stem; n freezes the stem and the first n
            levels as the official layout groups them (a level's blocks, the downsampler after them,
            its output norm): parameters without grad, modules kept in eval mode (mmdet's ResNet / Swin
            numbering; the official NAT code numbers as the original Swin, where 1 freezes only the
            stem, and its configs use -1).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depths: Sequence[int] = (3, 4, 6, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        kernel_size: int | Sequence[int] = 7,
        dilations: Sequence[Sequence[int]] | str | None = None,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        layer_scale: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        attn_backend: str = "auto",
        mixer: str | Sequence[str | Sequence[str]] = "na",
        mixer_kwargs: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
        stage_norms: bool = False,
        frozen_stages: int = -1,
    ):
        super().__init__()
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(
                f"num_heads {tuple(num_heads)} must give one value per stage of depths {tuple(depths)}"
            )
        kernel_sizes = (kernel_size,) * num_stages if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(kernel_sizes) != num_stages:
            raise ValueError(
                f"kernel_size {kernel_size} must be an int or one value per stage ({num_stages})"
            )
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(
                f"frozen_stages must be -1 (none), 0 (the stem) .. {num_stages} (every stage), "
                f"got {frozen_stages}"
            )
        if dilations is None:
            dilations = tuple((1,) * d for d in depths)
        elif isinstance(dilations, str):
            dilations = named_dilations(dilations, depths)
        dilations = tuple(tuple(int(d) for d in stage) for stage in dilations)
        if [len(s) for s in dilations] != list(depths):
            raise ValueError(
                f"dilations must give one value per block: got lengths {[len(s) for s in dilations]} "
                f"for depths {tuple(depths)}"
            )
        if any(d < 1 for stage in dilations for d in stage):
            raise ValueError(f"dilations must be >= 1 (1: no dilation), got {[list(s) for s in dilations]}")
        mixers, mixer_options = _stage_mixers(mixer, mixer_kwargs, num_stages)

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        self.embed_dim = embed_dim
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.kernel_size = kernel_sizes
        self.dilations = dilations
        self.mlp_ratio = float(mlp_ratio)
        self.layer_scale = layer_scale
        self.mixer = mixers
        dims = [int(embed_dim * 2**i) for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem = ConvStem(in_chans, embed_dim, norm_layer)
        # one linspace over all blocks, as the official code, then cut per stage
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            first = sum(depths[:i])
            stages.append(
                NATStage(
                    dim=dims[max(i - 1, 0)],
                    out_dim=dims[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    kernel_size=kernel_sizes[i],
                    dilations=dilations[i],
                    downsample=i > 0,
                    drop_path=dpr[first : first + depths[i]],
                    norm_layer=norm_layer,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    layer_scale=layer_scale,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    attn_backend=attn_backend,
                    mixer=mixers[i],
                    mixer_kwargs=mixer_options[i],
                )
            )
            out_module = f"stage_norms.{i}" if stage_norms else f"stages.{i}"
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=out_module))
        self.stages = nn.Sequential(*stages)
        if stage_norms:
            self.stage_norms = nn.ModuleList([norm_layer(d) for d in dims])
            self.norm = nn.Identity()
        else:
            self.stage_norms = None
            self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC"
        )
        self.apply(self._init_weights)
        self.frozen_stages = frozen_stages
        for module in self._frozen_modules():
            module.requires_grad_(False)

    def _frozen_modules(self) -> list[nn.Module]:
        """The stem and levels 0..frozen_stages-1, a level as the official layout has it: stage i's
        blocks, then the downsampler opening stage i + 1 (mmdet's Swin freezes its patch merging alike),
        and the level's output norm."""
        if self.frozen_stages < 0:
            return []
        frozen: list[nn.Module] = [self.stem]
        num_stages = len(self.stages)  # fewer after prune_intermediate_layers
        for i in range(min(self.frozen_stages, num_stages)):
            frozen.append(self.stages[i].blocks)
            if i + 1 < num_stages:
                frozen.append(self.stages[i + 1].downsample)
            if self.stage_norms is not None and i < len(self.stage_norms):
                frozen.append(self.stage_norms[i])
        return frozen

    def train(self, mode: bool = True) -> "NAT":
        super().train(mode)
        for module in self._frozen_modules():  # frozen parts stay in eval mode (no drop path, no dropout)
            module.eval()
        return self

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # as the official code: linear trunc-normal(0.02) with zero bias, LN identity; convs keep torch's init
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """RPB tables, norm weights, biases and layer-scale gammas: all but weight matrices and kernels;
        plus what a block's mixer names in its own `no_weight_decay()` (e.g. learned global tokens)."""
        skip = {n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith(".rpb")}
        for name, module in self.stages.named_modules(prefix="stages"):
            if hasattr(module, "no_weight_decay"):
                skip |= {f"{name}.{n}" for n in module.no_weight_decay()}
        return skip

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        """The official model's keyword list. Its training code's timm never read it (only
        `no_weight_decay`), so the official ImageNet runs did decay the RPB tables; `no_weight_decay`
        leaves them out, as Swin's tables are and the official detection/segmentation configs do."""
        return {"rpb"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stage_norms\.(\d+)", (99999,)),  # with the last block of its stage
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features)
        self.head.fc.apply(self._init_weights)
        self.head_hidden_size = self.head.num_features
        if global_pool is not None:
            self.global_pool = global_pool

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward that also returns stage outputs.

        Args:
            x: Input images (B, C, H, W).
            indices: Take the last n stages if int, all if None, these stages if a sequence.
            norm: Apply the final norm to the last stage's output (the only one it is sized for).
                With `stage_norms`, every intermediate gets its stage's norm whatever this says.
            stop_early: Stop after the last stage asked for.
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or (final features NHWC, intermediates).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        x = self.stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                if self.stage_norms is not None:
                    x_inter = self.stage_norms[i](x)
                else:
                    x_inter = self.norm(x) if norm and i == last else x
                if output_fmt == "NCHW":
                    x_inter = x_inter.permute(0, 3, 1, 2).contiguous()
                intermediates.append(x_inter)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x) if self.stage_norms is None else self.stage_norms[last](x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and norm / head / stage norms) that the intermediates at `indices` don't need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if self.stage_norms is not None:  # no unused parameters (DDP would complain of them)
            self.stage_norms = nn.ModuleList(
                [
                    n if i in take_indices else nn.Identity()
                    for i, n in enumerate(self.stage_norms[: max_index + 1])
                ]
            )
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normed last-stage map (B, H/32, W/32, C), channels-last."""
        x = self.stem(x)
        x = self.stages(x)
        if self.stage_norms is not None:
            return self.stage_norms[-1](x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------------
# Official checkpoints

_OFFICIAL_PREFIXES = ("patch_embed.", "levels.")


def _remap_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official NAT/DiNAT key layout -> this module's."""
    out = {}
    for k, v in state_dict.items():
        new = k
        new = re.sub(r"^patch_embed\.proj\.0\.", "stem.conv1.", new)
        new = re.sub(r"^patch_embed\.proj\.1\.", "stem.conv2.", new)
        new = re.sub(r"^patch_embed\.norm\.", "stem.norm.", new)
        new = re.sub(r"^levels\.(\d+)\.blocks\.(\d+)\.gamma([12])$", r"stages.\1.blocks.\2.ls\3.gamma", new)
        new = re.sub(r"^levels\.(\d+)\.blocks\.", r"stages.\1.blocks.", new)
        # the official level i ends with the downsampler that opens stage i + 1 here
        m = re.match(r"^levels\.(\d+)\.downsample\.(reduction|norm)\.(.*)$", k)
        if m:
            part = "conv" if m.group(2) == "reduction" else "norm"
            new = f"stages.{int(m.group(1)) + 1}.downsample.{part}.{m.group(3)}"
        new = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", new)
        new = re.sub(r"^norm(\d+)\.", r"stage_norms.\1.", new)  # the dense backbones' output norms
        out[new] = v
    return out


# Hugging Face transformers' NatModel / DinatModel (their *ForImageClassification wrap it in `nat.` /
# `dinat.` and add `classifier`): modeling_nat.py / modeling_dinat.py, the shi-labs/*-in1k-224 hub weights.
_HF_PREFIXES = ("nat.", "dinat.", "embeddings.patch_embeddings.", "encoder.levels.")
_HF_BLOCK = r"^encoder\.levels\.(\d+)\.layers\.(\d+)\."
_HF_BLOCK_QKV = r"^(encoder\.levels\.(\d+)\.layers\.(\d+)\.attention\.self\.)(query|key|value)\.(\w+)$"
_HF_RENAMES = (
    (r"^embeddings\.patch_embeddings\.projection\.0\.", "stem.conv1."),
    (r"^embeddings\.patch_embeddings\.projection\.1\.", "stem.conv2."),
    (r"^embeddings\.norm\.", "stem.norm."),
    (_HF_BLOCK + r"layernorm_before\.", r"stages.\1.blocks.\2.norm1."),
    (_HF_BLOCK + r"attention\.self\.rpb$", r"stages.\1.blocks.\2.attn.rpb"),
    (_HF_BLOCK + r"attention\.output\.dense\.", r"stages.\1.blocks.\2.attn.proj."),
    (_HF_BLOCK + r"layernorm_after\.", r"stages.\1.blocks.\2.norm2."),
    (_HF_BLOCK + r"intermediate\.dense\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (_HF_BLOCK + r"output\.dense\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head.fc."),
)


def _remap_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face NAT/DiNAT key layout -> this module's.

    Separate query / key / value linears are packed into `qkv` (rows q, k, v: the `(3, heads, head_dim)`
    layout NeighborhoodAttention2D splits), the (2, dim) `layer_scale_parameters` split into ls1 / ls2,
    and level i's downsampler opens stage i + 1 (as in the official layout)."""
    sd = dict(state_dict)
    for base in ("nat.", "dinat."):  # the *ForImageClassification wrapper; `classifier` sits outside it
        if any(k.startswith(base) for k in sd) and all(k.startswith((base, "classifier.")) for k in sd):
            sd = {k.removeprefix(base): v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        # NatBackbone's output norms, keyed by stage name: "stem", "stage1" .. "stage4"
        m = re.match(r"^hidden_states_norms\.(\w+)\.(weight|bias)$", k)
        if m:
            if not m.group(1).startswith("stage"):
                raise ValueError(
                    f"checkpoint is a Hugging Face NatBackbone / DinatBackbone state dict with a norm on the "
                    f"{m.group(1)!r} output ({k}), which the NAT dense layout has not (stage outputs only); "
                    "drop those keys or export a backbone with out_features stage1..stage4"
                )
            out[f"stage_norms.{int(m.group(1).removeprefix('stage')) - 1}.{m.group(2)}"] = v
            continue
        m = re.match(_HF_BLOCK_QKV, k)
        if m:
            head, stage, block, which, kind = m.groups()
            parts = [sd.get(f"{head}{name}.{kind}") for name in ("query", "key", "value")]
            if all(t is not None for t in parts):  # a lone q/k/v stays unmatched: the key check reports it
                if which == "query":
                    out[f"stages.{stage}.blocks.{block}.attn.qkv.{kind}"] = torch.cat(parts)
                continue
        m = re.match(_HF_BLOCK + r"layer_scale_parameters$", k)
        if m and v.ndim == 2 and v.shape[0] == 2:
            out[f"stages.{m.group(1)}.blocks.{m.group(2)}.ls1.gamma"] = v[0]
            out[f"stages.{m.group(1)}.blocks.{m.group(2)}.ls2.gamma"] = v[1]
            continue
        m = re.match(r"^encoder\.levels\.(\d+)\.downsample\.(reduction|norm)\.(.*)$", k)
        if m:
            part = "conv" if m.group(2) == "reduction" else "norm"
            out[f"stages.{int(m.group(1)) + 1}.downsample.{part}.{m.group(3)}"] = v
            continue
        new = k
        for pattern, repl in _HF_RENAMES:
            new = re.sub(pattern, repl, new)
        out[new] = v
    return out


def _describe(arch: dict[str, Any]) -> str:
    return (
        f"embed_dim {arch['embed_dim']}, depths {arch['depths']}, heads {arch['num_heads']}, "
        f"mlp_ratio {arch['mlp_ratio']:g}, layer scale {'yes' if arch['layer_scale'] else 'no'}"
    )


def _arch_of_model(model: NAT) -> dict[str, Any]:
    return dict(
        embed_dim=model.embed_dim,
        depths=tuple(model.depths),
        num_heads=tuple(model.num_heads),
        mlp_ratio=float(model.mlp_ratio),
        layer_scale=model.layer_scale is not None,
    )


def _arch_of_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """Read the structure (what the weights fix, not kernel size / dilation / classes) off a state dict."""
    try:
        embed_dim = sd["stem.conv2.weight"].shape[0]
        blocks: dict[int, set[int]] = {}
        for k in sd:
            m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.", k)
            if m:
                blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        num_stages = max(blocks) + 1
        depths = tuple(max(blocks.get(i, {-1})) + 1 for i in range(num_stages))
        # None where a zoo mixer keeps no RPB table (nothing in the weights tells its head count)
        heads = tuple(
            sd[rpb].shape[0] if (rpb := f"stages.{i}.blocks.0.attn.rpb") in sd else None
            for i in range(num_stages)
        )
        if all(h is None for h in heads) and not any(".attn." in k for k in sd):
            return None
        hidden = sd["stages.0.blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError):
        return None
    return dict(
        embed_dim=int(embed_dim),
        depths=depths,
        num_heads=heads,
        mlp_ratio=hidden / embed_dim,
        layer_scale=any(k.endswith(".ls1.gamma") for k in sd),
    )


def _names_for(arch: dict[str, Any]) -> str:
    names = [n for n, a in _ARCHS.items() if _arch_of_model_args(a) == arch]
    return " / ".join(names) if names else "an unregistered NAT/DiNAT configuration"


def _arch_of_model_args(args: dict[str, Any]) -> dict[str, Any]:
    return dict(
        embed_dim=args["embed_dim"],
        depths=tuple(args["depths"]),
        num_heads=tuple(args["num_heads"]),
        mlp_ratio=float(args["mlp_ratio"]),
        layer_scale=args.get("layer_scale") is not None,
    )


def _unwrap(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    sd = clean_state_dict(state_dict)
    if any(k.startswith("backbone.") for k in sd):  # an official mmdet / mmseg detector or segmenter
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def native_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint's NAT/DiNAT weights in this module's key names, wrappers and official / Hugging
    Face layouts undone, nothing checked or dropped (what `checkpoint_filter_fn` starts from; also what
    reads a file's class count before the model is made)."""
    sd = _unwrap(state_dict)
    if any(k.startswith(_OFFICIAL_PREFIXES) for k in sd):
        return _remap_official(sd)
    if any(k.startswith(_HF_PREFIXES) for k in sd):
        return _remap_hf(sd)
    return sd


def checkpoint_filter_fn(state_dict: dict[str, Any], model: NAT) -> dict[str, torch.Tensor]:
    """Turn an official NAT/DiNAT checkpoint, a Hugging Face one (NatForImageClassification /
    DinatForImageClassification / NatModel / DinatModel / NatBackbone / DinatBackbone), or one of this
    module's, into `model`'s state dict.

    Unwraps 'model' / 'state_dict' wrappers and an official detector's or segmenter's `backbone.` (its
    neck and heads are dropped), renames official / Hugging Face keys (packing HF's q/k/v),
    bicubically resizes RPB tables when the kernel size differs (how DiNAT's 11x11 weights were made
    from the 7x7 ones), and resets the classifier when the class count differs (drops it for
    `num_classes=0`). A `stage_norms` model (the dense layout) takes a classification checkpoint as the
    official backbones do: the final norm is dropped and the stage norms keep their fresh init (also
    those a Hugging Face backbone has not: its out_features); a dense checkpoint needs such a model.
    Everything else must match exactly: a checkpoint of another variant, or a key missing / left over,
    raises ValueError.
    """
    sd = native_state_dict(state_dict)
    model_sd = model.state_dict()
    model_name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "this NAT model")
    if getattr(model, "stage_norms", None) is None and any(k.startswith("stage_norms.") for k in sd):
        raise ValueError(
            "checkpoint is a dense backbone's (an output norm per stage: official norm0..3 / Hugging Face "
            f"hidden_states_norms, no final norm); create {model_name} with stage_norms=True to load it"
        )
    if getattr(model, "stage_norms", None) is not None:
        if any(k.startswith("norm.") for k in sd):
            _logger.info("Dropping the checkpoint's final norm: the dense layout (stage_norms) has none")
            sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
        fresh = sorted({k for k in model_sd if k.startswith("stage_norms.")} - set(sd))
        if fresh:
            _logger.info(f"Stage norms not in the checkpoint keep their fresh init: {fresh}")
            sd.update({k: model_sd[k] for k in fresh})

    ckpt_arch = _arch_of_state_dict(sd)
    model_arch = _arch_of_model(model)
    if ckpt_arch is None:
        raise ValueError(
            f"checkpoint is not a NAT/DiNAT state dict (no stem.conv2 / stages.*.blocks.*.attn.rpb / "
            f"mlp keys; first keys: {list(sd)[:5]}); model is {model_name}"
        )
    # a stage whose mixer has no RPB table matches any head count; the key check below does the rest
    # (only between equal stage counts: another count is another variant, named by its own heads)
    if len(ckpt_arch["num_heads"]) == len(model_arch["num_heads"]):
        ckpt_arch["num_heads"] = tuple(
            m if c is None else c
            for c, m in zip(ckpt_arch["num_heads"], model_arch["num_heads"], strict=True)
        )
    if ckpt_arch != model_arch:
        raise ValueError(
            f"checkpoint looks like {_names_for(ckpt_arch)} ({_describe(ckpt_arch)}), "
            f"model is {model_name} ({_describe(model_arch)}); create the model that matches the checkpoint"
        )

    out = {}
    for k, v in sd.items():
        if k.endswith(".attn.rpb") and k in model_sd and v.shape != model_sd[k].shape:
            target = model_sd[k].shape
            kernel = (target[-1] + 1) // 2
            _logger.info(f"Resizing {k} from {tuple(v.shape)} to {tuple(target)} (bicubic, kernel {kernel})")
            v = resize_rel_pos_bias_table_simple(v.float(), (kernel, kernel), target).to(v.dtype)
        out[k] = v

    head_keys = [k for k in ("head.fc.weight", "head.fc.bias") if k in model_sd]
    if not head_keys:
        for k in ("head.fc.weight", "head.fc.bias"):
            out.pop(k, None)
    elif any(k not in out or out[k].shape != model_sd[k].shape for k in head_keys):
        have = out["head.fc.weight"].shape[0] if "head.fc.weight" in out else 0
        _logger.warning(
            f"Checkpoint classifier has {have} classes, model has {model.num_classes}: "
            "keeping the model's freshly initialized classifier"
        )
        for k in head_keys:
            out[k] = model_sd[k]

    missing = sorted(set(model_sd) - set(out))
    unexpected = sorted(set(out) - set(model_sd))
    if missing or unexpected:
        more_missing = " ..." if len(missing) > 8 else ""
        more_unexpected = " ..." if len(unexpected) > 8 else ""
        raise ValueError(
            f"checkpoint does not fit {model_name}: missing {missing[:8]}{more_missing}, "
            f"unexpected {unexpected[:8]}{more_unexpected}"
        )
    return out


# ------------------------------------------------------------------------------------------------
# Variants

_DILATIONS_224 = (8, 4, 2, 1)  # dilated window of stage i spans its map at 224 (56, 28, 14, 7)
_DILATIONS_384 = (13, 6, 3, 1)  # ... and at 384 (96, 48, 24, 12), floor(map / kernel)

_D18 = (3, 4, 18, 5)
_MINI = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path_rate=0.2)
_TINY = dict(embed_dim=64, depths=_D18, num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path_rate=0.2)
_SMALL = dict(embed_dim=96, depths=_D18, num_heads=(3, 6, 12, 24), mlp_ratio=2.0, drop_path_rate=0.3)
_BASE = dict(embed_dim=128, depths=_D18, num_heads=(4, 8, 16, 32), mlp_ratio=2.0, drop_path_rate=0.5)
_LARGE = dict(embed_dim=192, depths=_D18, num_heads=(6, 12, 24, 48), mlp_ratio=2.0, drop_path_rate=0.35)


def _dinat(arch: dict[str, Any], stage_dilations=_DILATIONS_224, **overrides: Any) -> dict[str, Any]:
    return dict(arch, dilations=dinat_dilations(arch["depths"], stage_dilations), **overrides)


# model args per registered variant (kernel 7 unless given), as in the official nat.py / dinat.py
_ARCHS: dict[str, dict[str, Any]] = {
    "nat_mini": dict(_MINI),
    "nat_tiny": dict(_TINY),
    "nat_small": dict(_SMALL, layer_scale=1e-5),
    "nat_base": dict(_BASE, layer_scale=1e-5),
    "dinat_mini": _dinat(_MINI),
    "dinat_tiny": _dinat(_TINY),
    "dinat_small": _dinat(_SMALL),  # no layer scale, unlike nat_small
    "dinat_base": _dinat(_BASE, layer_scale=1e-5),
    "dinat_large": _dinat(_LARGE),
    "dinat_large_384": _dinat(_LARGE, _DILATIONS_384),
    # 11x11 kernels keep the 224 dilations (8 * 11 = 88 <= 96 at 384)
    "dinat_large_384_11x11": _dinat(_LARGE, kernel_size=11),
    # the ImageNet-22k 11x11 weights (RPB interpolated from 7x7), at 224; official drop-path for 22k: 0.2
    "dinat_large_11x11": _dinat(_LARGE, kernel_size=11, drop_path_rate=0.2),
}


def _create_nat(variant: str, pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> NAT:
    # `pretrained` may be a local checkpoint path: same as pretrained_cfg_overlay=dict(file=path)
    if isinstance(pretrained, (str, os.PathLike)):
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        overlay["file"] = os.fspath(pretrained)
        kwargs["pretrained_cfg_overlay"] = overlay
        pretrained = True
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and overlay.get("file") and not os.path.isfile(overlay["file"]):
        raise FileNotFoundError(f"checkpoint file {overlay['file']!r} for {variant} does not exist")
    model_args = dict(_ARCHS[variant])
    model_args.update(kwargs)
    if model_args.get("features_only"):  # no classifier to build, nor to warn about when loading
        model_args.setdefault("num_classes", 0)
    feature_cls = model_args.get("feature_cls", "getter")
    if model_args.get("features_only") and model_args.get("stage_norms") and feature_cls != "getter":
        # fx / hook features are taken from forward(), which never runs the inner stages' norms
        raise ValueError(
            f"features_only with feature_cls={feature_cls!r} and stage_norms=True: the stage norms run in "
            "forward_intermediates only; drop feature_cls (the default 'getter' takes them from there)"
        )
    # features_only defaults to every stage the model has (a 3-stage NAT as well as the 4-stage ones)
    out_indices = model_args.pop("out_indices", tuple(range(len(model_args["depths"]))))
    try:
        return build_model_with_cfg(
            NAT,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
            **model_args,
        )
    except SafetensorError as e:  # timm's loader reads a .safetensors file: name it, not just the header
        raise ValueError(
            f"cannot read safetensors file {overlay.get('file')!r} for {variant} ({str(e).strip()[:200]}); "
            "it must be a safetensors file of tensors (e.g. written by scripts/export_weights.py)"
        ) from None
    except (EOFError, pickle.UnpicklingError, RuntimeError) as e:  # torch.load of an empty / cut file
        if not overlay.get("file") or (isinstance(e, RuntimeError) and "PytorchStreamReader" not in str(e)):
            raise
        raise ValueError(
            f"cannot read checkpoint file {overlay['file']!r} for {variant} "
            f"({(str(e).strip() or type(e).__name__)[:120]}); it is empty, cut short or not a checkpoint"
        ) from None
    except URLError as e:
        raise RuntimeError(
            f"could not download the {variant} checkpoint ({e.reason}); offline, pass a local file with "
            f"pretrained='/path/to/{variant}.pth' or pretrained_cfg_overlay=dict(file=...)"
        ) from e


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "license": "mit",
        "origin_url": "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
        "paper_ids": "arXiv:2204.07143",
        "paper_name": "Neighborhood Attention Transformer",
        **kwargs,
    }


_NAT_URL = "https://shi-labs.com/projects/nat/checkpoints/CLS/"
_DINAT_URL = "https://shi-labs.com/projects/dinat/checkpoints/"
_DINAT_PAPER = dict(paper_ids="arXiv:2209.15001", paper_name="Dilated Neighborhood Attention Transformer")
_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
_IN22K = dict(num_classes=21841)

default_cfgs = generate_default_cfgs(
    {
        "nat_mini.in1k": _cfg(_NAT_URL + "nat_mini.pth"),
        "nat_tiny.in1k": _cfg(_NAT_URL + "nat_tiny.pth"),
        "nat_small.in1k": _cfg(_NAT_URL + "nat_small.pth"),
        "nat_base.in1k": _cfg(_NAT_URL + "nat_base.pth"),
        "dinat_mini.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_mini_in1k_224.pth", **_DINAT_PAPER),
        "dinat_tiny.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_tiny_in1k_224.pth", **_DINAT_PAPER),
        "dinat_small.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_small_in1k_224.pth", **_DINAT_PAPER),
        "dinat_base.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_base_in1k_224.pth", **_DINAT_PAPER),
        "dinat_large.in22k_ft_in1k": _cfg(
            _DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_224.pth", **_DINAT_PAPER
        ),
        "dinat_large.in22k": _cfg(
            _DINAT_URL + "imagenet22k/dinat_large_in22k_224.pth", num_classes=21841, **_DINAT_PAPER
        ),
        "dinat_large_384.in22k_ft_in1k": _cfg(
            _DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_384.pth", **_384, **_DINAT_PAPER
        ),
        "dinat_large_384_11x11.in22k_ft_in1k": _cfg(
            _DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_384_11x11.pth", **_384, **_DINAT_PAPER
        ),
        "dinat_large_11x11.in22k": _cfg(
            _DINAT_URL + "imagenet22k/dinat_large_in22k_224_11x11interp.pth", **_IN22K, **_DINAT_PAPER
        ),
    }
)


@register_model
def nat_mini(pretrained: bool | str = False, **kwargs: Any) -> NAT:
    """NAT-Mini: 20.0M params, 2.7 GMACs at 224."""
    return _create_nat("nat_mini", pretrained, **kwargs)


@register_model
def nat_tiny(pretrained: bool | str = False, **kwargs: Any) -> NAT:
    """NAT-Tiny: 27.9M params, 4.3 GMACs at 224."""
    return _create_nat("nat_tiny", pretrained, **kwargs)


@register_model
def nat_small(pretrained: bool | str = False, **kwargs: Any) -> NAT:
    """NAT-Small: 50.7M params, 7.8 GMACs at 224, layer scale."""
    return _create_nat("nat_small", pretrained, **kwargs)


@register_model
def nat_base(pretrained: bool | str = False, **kwargs: Any) -> NAT:
    """NAT-Base: 89.8M params, 13.7 GMACs at 224, layer scale."""
    return _create_nat("nat_base", pretrained, **kwargs)


@register_model
def dinat_mini(pretrained: bool | str = False, **kwargs: Any) -> NAT:
    """DiNAT-Mini: NAT-Mini with dilations 8/4/2/1 on every other block."""
    return _create_nat("dinat_mini", pretrained, **kwargs)


@register_model
def dinat_tiny(pretrained: bool | str = False, **kwargs: Any) -> NAT:
    """DiNAT-Tiny: NAT-Tiny with dilations 8/4/2/1 on every other block."""
    return _create_nat("dinat_tiny", pretrained, **kwargs)


@register_model
def dinat_small(pretrained: bool | str = False, **kwargs: Any) -> NAT:
    """DiNAT-Small: NAT-Small without layer scale, dilations 8/4/2/1 on every other block."""
    return _create_nat("dinat_small", pretrained, **kwargs)


@register_model
def dinat_base(pretrained: bool | str = False, **kwargs: Any) -> NAT:
    """DiNAT-Base: NAT-Base with dilations 8/4/2/1 on every other block."""
    return _create_nat("dinat_base", pretrained, **kwargs)


@register_model
def dinat_large(pretrained: bool | str = False, **kwargs: Any) -> NAT:
    """DiNAT-Large (224): 200.9M params; ImageNet-22k pre-trained."""
    return _create_nat("dinat_large", pretrained, **kwargs)


@register_model
def dinat_large_384(pretrained: bool | str = False, **kwargs: Any) -> NAT:
    """DiNAT-Large at 384: dilations 13/6/3/1."""
    return _create_nat("dinat_large_384", pretrained, **kwargs)


@register_model
def dinat_large_384_11x11(pretrained: bool | str = False, **kwargs: Any) -> NAT:
    """DiNAT-Large at 384 with 11x11 kernels, dilations 8/4/2/1."""
    return _create_nat("dinat_large_384_11x11", pretrained, **kwargs)


@register_model
def dinat_large_11x11(pretrained: bool | str = False, **kwargs: Any) -> NAT:
    """DiNAT-Large with 11x11 kernels at 224: carries the ImageNet-22k 11x11 (RPB-interpolated) weights."""
    return _create_nat("dinat_large_11x11", pretrained, **kwargs)
