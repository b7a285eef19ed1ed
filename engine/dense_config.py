"""The dense run's config and everything built from it: the schema (`DEFAULTS`, checked like
train.py's: an unknown key names its nearest valid one; `load_dense_config`), the datasets
(`build_data`), the backbone (`build_backbone`: the one place a dense backbone is made and its
classification checkpoint loaded) and the detector / segmenter (`build_model`).

engine/dense.py trains what this builds; engine/dense_eval.py scores and reports it.
"""

from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path

import torch
import yaml

import configs
from configs import ConfigError
from engine.errors import CheckpointError, first_line

_logger = logging.getLogger("train")

TASKS = ("detection", "segmentation")
DEFAULTS: dict = {
    "backbone": {
        "name": "nat_mini",  # any timm model with features_only (nat_*, dinat_*, swin_*, convnext_*, ...)
        "model_config": None,  # or a train.py config (configs/demo_nat.yaml): its model name and kwargs
        "kwargs": {},  # timm.create_model kwargs; on top of a --pretrained checkpoint's own model kwargs
        "out_indices": None,  # feature levels; None: every stage the model has
        "drop_path_rate": 0.1,  # over the checkpoint's; backbone.kwargs.drop_path_rate wins; None: keep
        "checkpoint": None,  # a classification checkpoint (train.py's run folder or .pth.tar)
        "pad_multiple": 1,  # pad inputs to a multiple (Swin: patch x 2^(stages-1))
    },
    "data": {
        "layout": "embedded",  # embedded (generated under root) | folders (the paths below, under root)
        "root": "datasets/dense-shapes",
        "embedded": {
            "num_classes": 4,
            "train_images": 800,
            "val_images": 200,
            "image_size": 64,
            "objects": [2, 4],
            "seed": 0,
            "polarity": "light",
        },
        "train_images": "images/training",
        "val_images": "images/validation",
        "train_instances": "annotations/instances_train.json",  # COCO format (detection)
        "val_instances": "annotations/instances_val.json",
        "train_masks": "annotations/training",  # ADE20K-style PNG masks (segmentation)
        "val_masks": "annotations/validation",
        "num_classes": None,  # segmentation classes; None: the embedded task's (shapes + background)
        "reduce_zero_label": False,  # ADE20K: mask value 0 is "other" (ignored), k -> class k-1
        # detection: shorter side; segmentation: the training crop's side and the validation images'
        # shorter side (aspect ratio kept; data.dense.SemanticFolder)
        "img_size": 64,
        "max_size": None,  # detection: longer side cap (None: img_size x 1333 / 800, torchvision's ratio)
        # segmentation training: the shorter side rescaled to img_size x r, r uniform in this range,
        # before the crop (mmseg's ADE20K recipe: [0.5, 2.0]; the embedded task's images are img_size)
        "scale_range": [1.0, 1.0],
        "mean": [0.5, 0.5, 0.5],  # the demo classification recipe's (what --pretrained saw)
        "std": [0.25, 0.25, 0.25],
        "hflip": True,
        "workers": 0,
    },
    "detection": {
        "detector": "mask_rcnn",  # mask_rcnn | fcos
        "fpn_channels": 64,
        "box_head": 256,
        "rois_per_image": 64,
        "rpn_batch": 64,
        "proposals": 200,
        "mask_channels": 64,
        "mask_convs": 4,
        "fcos_convs": 2,
        "detections_per_image": 20,
        "anchor_scale": 2.0,
    },
    "segmentation": {"decoder_channels": 64},
    "optim": {"lr": 1e-3, "weight_decay": 0.05, "clip_grad": 5.0},
    "sched": {"epochs": 12, "warmup_updates": 50, "min_lr": 1e-5},
    "train": {
        "batch_size": 8,
        "seed": 0,
        "output": "runs/dense",
        "experiment": None,
        "log_interval": 20,
        "eval_interval": 1,
        "progress": True,  # a line every log_interval updates
    },
}
FREEFORM = {"backbone.kwargs"}
NULLABLE = {
    "backbone.out_indices": list,
    "backbone.drop_path_rate": float,
    "backbone.checkpoint": str,
    "backbone.model_config": str,
    "data.num_classes": int,
    "data.max_size": int,
    "train.experiment": str,
}
CHOICES = {"data.layout": ("embedded", "folders"), "detection.detector": ("mask_rcnn", "fcos")}
QUICK = [  # --quick: each task end to end in well under a minute on 2 cores
    "data.root=datasets/dense-shapes-quick",
    "data.embedded.train_images=48",
    "data.embedded.val_images=16",
    "sched.epochs=2",
    "sched.warmup_updates=2",
    "train.batch_size=8",
    "train.log_interval=2",
]


# ---------------------------------------------------------------- config


def _check(tree: dict, schema: dict, where: str, prefix: str = "") -> dict:
    """`tree` checked against `schema` (unknown key -> its nearest neighbour; wrong type -> the type)."""
    out = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if name not in schema:
            near = difflib.get_close_matches(str(name), list(schema), n=1, cutoff=0.0)
            raise ConfigError(f"unknown config key '{key}'{where}; did you mean '{prefix}{near[0]}'?")
        default = schema[name]
        if isinstance(default, dict) and key not in FREEFORM:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}'{where} is a section: give a mapping, got {value!r}")
            out[name] = _check(value, default, where, key + ".")
            continue
        want = NULLABLE.get(key) or type(default)
        if value is None and key in NULLABLE:
            out[name] = None
        elif want is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                out[name] = float(value)
            except ValueError:
                raise ConfigError(f"config key '{key}'{where} must be a number, got {value!r}") from None
        elif isinstance(value, want) and not (want is int and isinstance(value, bool)):
            out[name] = value
        else:
            raise ConfigError(f"config key '{key}'{where} must be {want.__name__}, got {value!r}")
        if key in CHOICES and out[name] not in CHOICES[key]:
            raise ConfigError(f"config key '{key}'{where} must be one of {CHOICES[key]}, got {value!r}")
    return out


def _read_yaml(path) -> dict:
    path = configs.resolve_path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of sections")
    tree = {}
    for base in [raw.pop("base")] if isinstance(raw.get("base"), str) else raw.pop("base", None) or []:
        tree = configs.merge(tree, _read_yaml(configs.resolve_path(base, path.parent)))
    return configs.merge(tree, _check(raw, DEFAULTS, f" in {path}"))


def load_dense_config(paths=(), overrides=()) -> dict:
    """DEFAULTS <- YAML files (with `base:`) <- `section.key=value` overrides, every key checked."""
    cfg = copy.deepcopy(DEFAULTS)
    for p in paths:
        cfg = configs.merge(cfg, _read_yaml(p))
    for text in overrides:
        tree = configs.parse_override(text)
        key = text.partition("=")[0].strip()
        if key.startswith("backbone.kwargs."):  # one key inside the free-form kwargs
            cfg["backbone"]["kwargs"] = {**cfg["backbone"]["kwargs"], **tree["backbone"]["kwargs"]}
            continue
        cfg = configs.merge(cfg, _check(tree, DEFAULTS, f" (override '{text}')"))
    if cfg["train"]["batch_size"] < 1 or cfg["sched"]["epochs"] < 1:
        raise ConfigError("config keys 'train.batch_size' and 'sched.epochs' must be >= 1")
    scale_range = cfg["data"]["scale_range"]
    if not (
        len(scale_range) == 2
        and all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in scale_range)
        and scale_range[0] <= scale_range[1]
    ):
        raise ConfigError(
            f"config key 'data.scale_range' must be [low, high], 0 < low <= high, got {scale_range!r}"
        )
    return cfg


# ---------------------------------------------------------------- data


def build_data(cfg: dict, task: str, train_split: bool = True):
    """(train dataset, val dataset, class names); the embedded task is generated first if needed.
    `train_split=False` (scoring and drawing a finished run): the train set is None and not read, so
    a machine holding only the val split can evaluate."""
    from data.dense import CocoInstances, SemanticFolder, generate_dense_dataset
    from data.errors import DataError

    d = cfg["data"]
    root = Path(d["root"])
    num_classes = d["num_classes"]
    if d["layout"] == "embedded":
        e = d["embedded"]
        generate_dense_dataset(root, **e)
        num_classes = num_classes or e["num_classes"] + 1
    built = {}
    for split in ("train", "val") if train_split else ("val",):
        train = split == "train"
        if task == "detection":
            ds = CocoInstances(
                root / d[f"{split}_images"],
                root / d[f"{split}_instances"],
                hflip=train and d["hflip"],
                masks=cfg["detection"]["detector"] == "mask_rcnn",  # FCOS trains and scores boxes only
            )
        else:
            if num_classes is None:
                raise ConfigError(
                    "data.num_classes is needed for a segmentation folder (e.g. 150 for ADE20K)"
                )
            ds = SemanticFolder(
                root / d[f"{split}_images"],
                root / d[f"{split}_masks"],
                num_classes,
                d["reduce_zero_label"],
                d["img_size"],
                hflip=train and d["hflip"],
                scale_range=tuple(d["scale_range"]) if train else None,
            )
        if ds.skipped_line():
            _logger.info(ds.skipped_line())
        built[split] = ds
    train_set, val_set = built.get("train"), built["val"]
    if task == "detection":
        if train_set is not None and train_set.label_to_category != val_set.label_to_category:
            train_ids, val_ids = (set(s.label_to_category.values()) for s in (train_set, val_set))
            only_train, only_val = sorted(train_ids - val_ids), sorted(val_ids - train_ids)
            raise DataError(
                f"{d['train_instances']} and {d['val_instances']} list different categories (ids only in "
                f"train: {only_train}, only in val: {only_val}); give both files COCO's one category list "
                "(labels are numbered from it)"
            )
        names = val_set.class_names
    else:
        from data.dense import SHAPE_NAMES

        embedded = d["layout"] == "embedded" and not d["reduce_zero_label"]
        names = (
            ["background", *SHAPE_NAMES[: num_classes - 1]]
            if embedded
            else [str(i) for i in range(num_classes)]
        )
    return train_set, val_set, names


def collate(batch):
    return tuple(zip(*batch, strict=True))


# ---------------------------------------------------------------- models


def build_backbone(cfg_backbone: dict):
    """(timm features_only backbone, model name, create_model kwargs, levels): the one place a dense
    backbone is made. `checkpoint` (a classification run of train.py) brings its weights and its
    model kwargs (the config's `kwargs` go on top: e.g. DiNAT dilations for the dense input size, or
    NAT's official dense layout `stage_norms` / `frozen_stages`, whose stage norms the checkpoint
    filter leaves freshly initialised); its classifier is dropped, every other weight must fit."""
    import timm

    from engine.checkpoint import checkpoint_num_classes, extract_state_dict, load_checkpoint
    from engine.factory import check_model_name

    b = dict(cfg_backbone)
    kwargs, pretrained = {}, {}
    if b["model_config"]:  # a classification config: the same model its train.py run trains
        model = configs.load_config([b["model_config"]])["model"]
        b["name"], kwargs = model["name"], dict(model["kwargs"])
    check_model_name(b["name"])
    arch = None  # the model a checkpoint of this repo was trained as
    if b["checkpoint"]:
        ckpt = load_checkpoint(b["checkpoint"])
        if isinstance(ckpt, dict) and ckpt.get("task") in TASKS:
            raise CheckpointError(
                f"'{b['checkpoint']}' is a {ckpt['task']} run of scripts/dense.py, not a classification "
                "checkpoint: --pretrained takes a train.py run (continue a dense run with --resume)"
            )
        sd = extract_state_dict(ckpt, b["checkpoint"])
        arch = ckpt.get("arch") if isinstance(ckpt, dict) else None
        kwargs.update(ckpt.get("model_kwargs") or {} if isinstance(ckpt, dict) else {})
    if b["drop_path_rate"] is not None:  # over the checkpoint's rate, under one set in `kwargs`
        kwargs["drop_path_rate"] = b["drop_path_rate"]
    kwargs.update(b["kwargs"] or {})
    try:
        probe = timm.create_model(b["name"], pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        if arch and arch != b["name"]:  # the kwargs came with the checkpoint, not from the user
            raise CheckpointError(
                f"checkpoint '{b['checkpoint']}' holds {arch} weights, whose model kwargs backbone "
                f"'{b['name']}' rejects ({first_line(e)}); use --backbone {arch} or another checkpoint"
            ) from None
        raise ConfigError(
            f"backbone '{b['name']}' rejected its kwargs ({first_line(e)}); fix backbone.kwargs"
        ) from None
    stages = len(probe.feature_info)
    levels = b["out_indices"] or list(range(stages))
    wrong = [i for i in levels if not isinstance(i, int) or not -stages <= i < stages]
    levels = [i % stages for i in levels] if not wrong else levels
    if wrong or levels != sorted(set(levels)):  # an FPN takes distinct levels, finest first
        raise ConfigError(
            f"backbone.out_indices {b['out_indices']}: '{b['name']}' has {stages} stages; give distinct "
            f"stage indices in 0..{stages - 1}, in increasing order"
        )
    if b["checkpoint"]:
        # timm's own pretrained path: the family's checkpoint_filter_fn, the classifier dropped
        pretrained = dict(
            pretrained=True,
            pretrained_cfg_overlay=dict(state_dict=sd, num_classes=checkpoint_num_classes(probe, sd)),
        )
    try:
        body = timm.create_model(
            b["name"], features_only=True, out_indices=tuple(levels), **pretrained, **kwargs
        )
    except (RuntimeError, ValueError) as e:  # load_state_dict's mismatch, the NAT filter's diagnosis
        raise CheckpointError(
            f"checkpoint '{b['checkpoint']}' does not fit backbone '{b['name']}' with kwargs {kwargs} "
            f"({first_line(e)[:300]}); pick the model the checkpoint was trained with"
        ) from None
    if not hasattr(body, "no_weight_decay") and hasattr(probe, "no_weight_decay"):
        body.no_weight_decay = _renamed_no_weight_decay(probe, body)
    return body, b["name"], kwargs, levels


def _renamed_no_weight_decay(model, body):
    """`model.no_weight_decay()` for its features_only `body`: timm's FeatureListNet (Swin, ...) keeps
    the parameters but flattens the top-level names ("layers.0.x" -> "layers_0.x") and drops the
    method, so Swin's relative position tables got weight decay under a dense head."""
    wanted = {name.replace(".", "_") for name in model.no_weight_decay()}
    names = {name for name, _ in body.named_parameters() if name.replace(".", "_") in wanted}
    return lambda: names


def training_loss(model, task: str, images, targets) -> torch.Tensor:
    """The loss a training step minimises: the detector's summed losses (torchvision returns them in
    train mode), or pixel cross-entropy over the segmenter's logits (255 = ignored)."""
    if task == "detection":
        return sum(model(list(images), list(targets)).values())
    logits = model(torch.stack(images))
    return torch.nn.functional.cross_entropy(logits, torch.stack(targets), ignore_index=255)


def build_model(cfg: dict, task: str, num_classes: int):
    """(detector or segmenter of `cfg`, backbone name); num_classes: detection without background,
    segmentation all."""
    from models import dense

    if task == "segmentation" and cfg["backbone"]["out_indices"] is not None:
        raise ConfigError(
            "backbone.out_indices is for detection: UPerNet takes every level of the backbone; drop it"
        )
    body, name, kwargs, levels = build_backbone(cfg["backbone"])
    if task == "segmentation":
        # smp counts a stride-2 level; a backbone starting at stride 4 gets an empty one there
        depth = len(levels) + (body.feature_info.reduction()[0] == 4)
        model = dense.upernet(name, num_classes, depth, cfg["segmentation"]["decoder_channels"], **kwargs)
        model.encoder.model.load_state_dict(body.state_dict())  # same timm module: the backbone's weights
        return model, name
    det = cfg["detection"]
    heads = dense.HeadSizes(**{k: v for k, v in det.items() if k != "detector"})
    mcnn = det["detector"] == "mask_rcnn"
    fpn = dense.TimmFPN(
        body, det["fpn_channels"], "pool" if mcnn else "p6p7", cfg["backbone"]["pad_multiple"]
    )
    d = cfg["data"]
    # torchvision's min / max size: the shorter side to img_size unless the longer would pass max_size
    # (default: torchvision's 1333 / 800 of it; it was img_size, so a 300 x 50 image ran at 64 x 10)
    size = (d["img_size"], d["max_size"] or round(d["img_size"] * 1333 / 800))
    build = dense.mask_rcnn if mcnn else dense.fcos
    return build(fpn, num_classes + 1, heads, size, d["mean"], d["std"]), name


class Normalise(torch.nn.Module):
    """Segmenter input normalisation inside the model (the detectors' transform does theirs), and the
    padding smp's segmenters need: they take H and W only in multiples of the encoder's output stride,
    so the input is padded bottom / right to one (after normalising: the mean colour) and the logits
    cropped back, as mmseg pads to its size divisor. Any H x W in, H x W logits out."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        h, w = x.shape[-2:]
        stride = self.model.encoder.output_stride
        x = torch.nn.functional.pad((x - self.mean) / self.std, (0, -w % stride, 0, -h % stride))
        return self.model(x)[..., :h, :w]
