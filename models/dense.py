"""Dense heads over any timm backbone: an FPN adapter for torchvision's detectors, Mask R-CNN and FCOS
with head sizes to match small backbones, and UPerNet from segmentation_models_pytorch.

`TimmFPN` turns a timm `features_only` model (NAT, DiNAT, Swin, ConvNeXt, ...) into what torchvision's
detectors take (as torchvision's `BackboneWithFPN`): `out_channels` and an OrderedDict of maps "0",
"1", ... (strides from the backbone's `feature_info`) plus the extra levels. NHWC features (timm's
Swin) are permuted; `pad_multiple` pads the input on the bottom/right (Swin's windows: the input must
divide into patches x windows at every stage) and the maps are used as they come.

torchvision's default heads (256-channel FPN and mask head, 1024-wide box head, 512 RoIs per image,
800-1333 px resizing) are sized for ResNet-50 on COCO; on a ~0.5M-parameter backbone they are nearly
all of the compute. `HeadSizes` sets them; the defaults suit the demo backbones on 64-128 px images.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class TimmFPN(nn.Module):
    """timm features_only model + torchvision FeaturePyramidNetwork; `out_channels` as detectors need."""

    def __init__(self, body: nn.Module, out_channels: int = 64, extra: str = "pool", pad_multiple: int = 1):
        from torchvision.ops.feature_pyramid_network import (
            FeaturePyramidNetwork,
            LastLevelMaxPool,
            LastLevelP6P7,
        )

        super().__init__()
        self.body, self.out_channels, self.pad_multiple = body, out_channels, pad_multiple
        self.nhwc = str(getattr(body, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC")
        self.strides = list(body.feature_info.reduction())
        extra_block = {"pool": LastLevelMaxPool, "p6p7": lambda: LastLevelP6P7(out_channels, out_channels)}
        if extra not in extra_block:
            raise ValueError(f"extra={extra!r}: use 'pool' (Mask R-CNN) or 'p6p7' (RetinaNet / FCOS)")
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels, extra_blocks=extra_block[extra]()
        )

    def forward(self, x: torch.Tensor) -> OrderedDict:
        h, w = x.shape[-2:]
        m = self.pad_multiple
        if m > 1 and (h % m or w % m):
            x = F.pad(x, (0, -w % m, 0, -h % m))
        feats = self.body(x)
        if self.nhwc:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return self.fpn(OrderedDict((str(i), f.contiguous()) for i, f in enumerate(feats)))


@dataclass
class HeadSizes:
    """Detector head sizes (torchvision's defaults in brackets)."""

    fpn_channels: int = 64  # [256]
    box_head: int = 256  # Mask R-CNN box MLP width [1024]
    rois_per_image: int = 64  # RoIs sampled per image for the box head [512]
    rpn_batch: int = 64  # anchors sampled per image for the RPN [256]
    proposals: int = 200  # RPN proposals kept after NMS, train and test [2000 / 1000]
    mask_channels: int = 64  # mask head conv width [256]
    mask_convs: int = 4  # [4]
    fcos_convs: int = 2  # FCOS tower depth [4]
    detections_per_image: int = 20  # [100]
    anchor_scale: float = 2.0  # Mask R-CNN anchor side = 2 x scale x level stride [scale 4]; FCOS: unused
    extra: dict = field(default_factory=dict)  # more torchvision kwargs, passed as they are


def _anchors(strides, scale, ratios):
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    return AnchorGenerator(tuple((int(scale * s),) for s in strides), (ratios,) * len(strides))


def mask_rcnn(fpn: TimmFPN, num_classes: int, heads: HeadSizes, image_size, mean, std):
    """torchvision Mask R-CNN over `fpn`; `num_classes` counts the background (K shape classes + 1).

    RoIs pool from the backbone's levels ("0".."L-1"), anchors also cover the max-pool level; images
    are resized to `image_size` = (min side, max side)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    levels = [str(i) for i in range(len(fpn.strides))]
    strides = [*fpn.strides, 2 * fpn.strides[-1]]
    c = fpn.out_channels
    return MaskRCNN(
        fpn,
        num_classes=None,  # given through box_predictor (torchvision refuses both)
        min_size=image_size[0],
        max_size=image_size[1],
        image_mean=list(mean),
        image_std=list(std),
        rpn_anchor_generator=_anchors(strides, heads.anchor_scale * 2, (0.5, 1.0, 2.0)),
        rpn_batch_size_per_image=heads.rpn_batch,
        rpn_pre_nms_top_n_train=2 * heads.proposals,
        rpn_pre_nms_top_n_test=heads.proposals,
        rpn_post_nms_top_n_train=heads.proposals,
        rpn_post_nms_top_n_test=heads.proposals,
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=TwoMLPHead(c * 7 * 7, heads.box_head),
        box_predictor=FastRCNNPredictor(heads.box_head, num_classes),
        box_batch_size_per_image=heads.rois_per_image,
        box_detections_per_img=heads.detections_per_image,
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
        mask_head=MaskRCNNHeads(c, [heads.mask_channels] * heads.mask_convs, 1),
        mask_predictor=MaskRCNNPredictor(heads.mask_channels, heads.mask_channels, num_classes),
        **heads.extra,
    )


def fcos(fpn: TimmFPN, num_classes: int, heads: HeadSizes, image_size, mean, std):
    """torchvision FCOS (single stage, anchor-free) over `fpn` built with extra='p6p7'. `num_classes`
    counts an unused class 0, as torchvision's COCO FCOS (91 = 90 + 1): labels index the sigmoid
    class scores directly and start at 1."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.fcos import FCOSHead

    strides = [*fpn.strides, 2 * fpn.strides[-1], 4 * fpn.strides[-1]]
    c = fpn.out_channels
    return FCOS(
        fpn,
        num_classes=num_classes,
        min_size=image_size[0],
        max_size=image_size[1],
        image_mean=list(mean),
        image_std=list(std),
        anchor_generator=_anchors(strides, 1.0, (1.0,)),  # FCOS: one "anchor" per location = the stride
        head=FCOSHead(c, 1, num_classes, num_convs=heads.fcos_convs),
        detections_per_img=heads.detections_per_image,
        **heads.extra,
    )


def upernet(encoder_name: str, num_classes: int, depth: int, decoder_channels: int = 64, **timm_kwargs):
    """segmentation_models_pytorch UPerNet on timm's universal encoder `tu-<encoder_name>`.

    `depth`: smp's encoder depth, which counts a stride-2 level (a backbone whose first map is at
    stride 4, as NAT, Swin and ConvNeXt, gets an empty one: depth = its levels + 1); `timm_kwargs`
    go to timm.create_model (model kwargs). Weights: load a features_only state dict into
    `model.encoder.model` (same timm module)."""
    import segmentation_models_pytorch as smp

    return smp.UPerNet(
        encoder_name=f"tu-{encoder_name}",
        encoder_weights=None,
        encoder_depth=depth,
        decoder_channels=decoder_channels,
        classes=num_classes,
        **timm_kwargs,
    )
