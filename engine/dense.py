"""Dense prediction runs: detection (torchvision Mask R-CNN / FCOS) and semantic segmentation (smp
UPerNet) over any timm backbone, trained and scored from a YAML config; scripts/dense.py's command.

Owns the dense config schema (`DEFAULTS`, checked like train.py's: an unknown key names its nearest
valid one), the backbone construction (`build_backbone`: the one place a dense backbone is made and
its classification checkpoint loaded), the train / evaluate loop, and the metrics: COCO box and mask
AP through pycocotools (`coco_ap`) and mIoU from a confusion matrix (`confusion_matrix`, `miou`).

A run folder holds config.yaml, train.log, tb/ (TensorBoard), summary.csv, last.pth.tar /
model_best.pth.tar (the repo's atomic saver) and results.json (the final metrics, params, FLOPs,
train and inference img/s). `--resume RUN` continues a run from its last epoch checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import json
import logging
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml

import configs
from configs import ConfigError
from engine.errors import EXIT_ERROR, CheckpointError, TrainingError, first_line, user_errors

_logger = logging.getLogger("train")

TASKS = ("detection", "segmentation")
DEFAULTS: dict = {
    "backbone": {
        "name": "nat_mini",  # any timm model with features_only (nat_*, dinat_*, swin_*, convnext_*, ...)
        "model_config": None,  # or a train.py config (configs/demo_nat.yaml): its model name and kwargs
        "kwargs": {},  # timm.create_model kwargs; on top of a --pretrained checkpoint's own model kwargs
        "out_indices": None,  # feature levels; None: every stage the model has
        "drop_path_rate": 0.1,
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
        "img_size": 64,  # detection: shorter side; segmentation: images resized square
        "max_size": None,  # detection: longer side cap (None: img_size)
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
    return cfg


# ---------------------------------------------------------------- data


def build_data(cfg: dict, task: str):
    """(train dataset, val dataset, class names); the embedded task is generated first if needed."""
    from data.dense import CocoInstances, SemanticFolder, generate_dense_dataset

    d = cfg["data"]
    root = Path(d["root"])
    num_classes = d["num_classes"]
    if d["layout"] == "embedded":
        e = d["embedded"]
        generate_dense_dataset(root, **e)
        num_classes = num_classes or e["num_classes"] + 1
    sets = []
    for split in ("train", "val"):
        train = split == "train"
        if task == "detection":
            ds = CocoInstances(
                root / d[f"{split}_images"], root / d[f"{split}_instances"], hflip=train and d["hflip"]
            )
        else:
            if num_classes is None:
                raise ConfigError(
                    "data.num_classes is needed for a segmentation folder (e.g. 150 for ADE20K)"
                )
            size = d["img_size"]
            ds = SemanticFolder(
                root / d[f"{split}_images"],
                root / d[f"{split}_masks"],
                num_classes,
                d["reduce_zero_label"],
                size,
                hflip=train and d["hflip"],
            )
        if ds.skipped_line():
            _logger.info(ds.skipped_line())
        sets.append(ds)
    if task == "detection":
        names = sets[1].class_names
    else:
        from data.dense import SHAPE_NAMES

        embedded = d["layout"] == "embedded" and not d["reduce_zero_label"]
        names = (
            ["background", *SHAPE_NAMES[: num_classes - 1]]
            if embedded
            else [str(i) for i in range(num_classes)]
        )
    return sets[0], sets[1], names


def _collate(batch):
    return tuple(zip(*batch, strict=True))


# ---------------------------------------------------------------- models


def build_backbone(cfg_backbone: dict):
    """(timm features_only backbone, model name, create_model kwargs, levels): the one place a dense
    backbone is made. `checkpoint` (a classification run of train.py) brings its weights and its
    model kwargs (the config's `kwargs` go on top: e.g. DiNAT dilations for the dense input size);
    its classifier is dropped, every other weight must fit."""
    import timm

    from engine.checkpoint import checkpoint_num_classes, extract_state_dict, load_checkpoint
    from engine.factory import check_model_name

    b = dict(cfg_backbone)
    kwargs, pretrained = {}, {}
    if b["model_config"]:  # a classification config: the same model its train.py run trains
        model = configs.load_config([b["model_config"]])["model"]
        b["name"], kwargs = model["name"], dict(model["kwargs"])
    check_model_name(b["name"])
    if b["checkpoint"]:
        ckpt = load_checkpoint(b["checkpoint"])
        sd = extract_state_dict(ckpt, b["checkpoint"])
        kwargs.update(ckpt.get("model_kwargs") or {} if isinstance(ckpt, dict) else {})
    kwargs.update(b["kwargs"] or {})
    if b["drop_path_rate"] is not None:
        kwargs["drop_path_rate"] = b["drop_path_rate"]
    try:
        probe = timm.create_model(b["name"], pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(
            f"backbone '{b['name']}' rejected its kwargs ({first_line(e)}); fix backbone.kwargs"
        ) from None
    levels = b["out_indices"] or list(range(len(probe.feature_info)))
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
    return body, b["name"], kwargs, levels


def build_model(cfg: dict, task: str, num_classes: int):
    """(detector or segmenter of `cfg`, backbone name); num_classes: detection without background,
    segmentation all."""
    from models import dense

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
    size = (d["img_size"], d["max_size"] or d["img_size"])
    build = dense.mask_rcnn if mcnn else dense.fcos
    return build(fpn, num_classes + 1, heads, size, d["mean"], d["std"]), name


def _optimizer(model, cfg):
    from timm.optim import param_groups_weight_decay

    o = cfg["optim"]
    # no weight decay on norms, biases, relative position biases (1-d tensors), as the official recipes
    groups = param_groups_weight_decay(model, o["weight_decay"], no_weight_decay_list=("rpb",))
    return torch.optim.AdamW(groups, lr=o["lr"])


def _lr_at(step: int, total: int, cfg: dict) -> float:
    """Linear warm-up, then cosine to min_lr, per update."""
    lr, min_lr, warm = cfg["optim"]["lr"], cfg["sched"]["min_lr"], cfg["sched"]["warmup_updates"]
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


# ---------------------------------------------------------------- metrics


def coco_ap(coco_gt: dict, results: list, iou_type: str) -> dict:
    """{"AP", "AP50", "AP75"} (percent) of `results` (COCO result dicts) against the annotation dict
    `coco_gt`, by pycocotools' COCOeval (`iou_type` "bbox" or "segm"); 0 when there are no results."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = copy.deepcopy(coco_gt)
        gt.dataset.setdefault("info", {})
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {
        "AP": 100 * float(ev.stats[0]),
        "AP50": 100 * float(ev.stats[1]),
        "AP75": 100 * float(ev.stats[2]),
    }


def detections_to_coco(output: dict, image_id: int, label_to_category: dict) -> list:
    """torchvision detector output for one image -> COCO result dicts (masks thresholded at 0.5)."""
    from data.dense import encode_mask

    boxes = output["boxes"].detach().cpu().numpy()
    results = []
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        r = {
            "image_id": int(image_id),
            "category_id": int(label_to_category[int(output["labels"][i])]),
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "score": float(output["scores"][i]),
        }
        if "masks" in output:
            r["segmentation"] = encode_mask(output["masks"][i, 0].detach().cpu().numpy() > 0.5)
        results.append(r)
    return results


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255):
    """num_classes x num_classes counts, rows = true class, columns = predicted; ignored pixels left out."""
    keep = target != ignore_index
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou(conf: torch.Tensor) -> tuple[float, list]:
    """(mean IoU in percent over the classes that occur in the target or the prediction, per-class IoU
    (nan for a class in neither))."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    valid = ~iou.isnan()
    return 100 * float(iou[valid].mean()), [float(v) for v in iou]


@torch.no_grad()
def evaluate(model, loader, task: str, val_set, num_classes: int) -> dict:
    """Detection: box (and mask) AP / AP50 / AP75; segmentation: mIoU, pixel accuracy; plus img/s."""
    model.eval()
    start, seen = time.perf_counter(), 0
    if task == "detection":
        results = []
        for images, targets in loader:
            for out, t in zip(model(list(images)), targets, strict=True):
                results += detections_to_coco(out, t["image_id"], val_set.label_to_category)
            seen += len(images)
        elapsed = time.perf_counter() - start
        metrics = {f"box_{k}": v for k, v in coco_ap(val_set.coco_gt, results, "bbox").items()}
        if results and "segmentation" in results[0]:
            metrics.update({f"mask_{k}": v for k, v in coco_ap(val_set.coco_gt, results, "segm").items()})
    else:
        conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        for images, masks in loader:
            logits = model(torch.stack(images))
            conf += confusion_matrix(logits.argmax(1), torch.stack(masks), num_classes)
            seen += len(images)
        elapsed = time.perf_counter() - start
        metrics = {
            "mIoU": miou(conf)[0],
            "pixel_acc": 100 * float(conf.diag().sum() / conf.sum().clamp(min=1)),
        }
    metrics["eval_img_per_sec"] = seen / elapsed
    return metrics


# ---------------------------------------------------------------- the run


class _Normalise(torch.nn.Module):
    """Segmenter input normalisation inside the model (the detectors' transform does theirs)."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def _count_flops(model, task, size) -> dict:
    """Multiply-adds at one val-size image: the backbone (+ FPN for detection) and the whole model."""
    from models.flops import count_flops

    inner = model.model if task == "segmentation" else model
    backbone = inner.encoder if task == "segmentation" else inner.backbone
    out = {}
    for name, m in (("backbone_flops", backbone), ("flops", inner)):
        try:
            out[name] = int(count_flops(m, (3, size, size)))
        except Exception as e:  # a counting failure must not lose a finished run's metrics
            _logger.info(f"FLOPs of {name} not counted ({first_line(e)})")
    return out


def train_and_evaluate(cfg: dict, task: str, run_dir: Path, resume_ckpt: dict | None) -> dict:
    from engine.checkpoint import make_saver_class
    from engine.run_log import RunLog, fmt_time

    torch.manual_seed(cfg["train"]["seed"])
    np.random.seed(cfg["train"]["seed"])
    train_set, val_set, names = build_data(cfg, task)
    num_classes = len(names)
    model, backbone_name = build_model(cfg, task, num_classes)
    if task == "segmentation":
        model = _Normalise(model, cfg["data"]["mean"], cfg["data"]["std"])
    optimizer = _optimizer(model, cfg)
    t = cfg["train"]
    epochs = cfg["sched"]["epochs"]
    g = torch.Generator()
    loader = torch.utils.data.DataLoader(
        train_set, t["batch_size"], shuffle=True, drop_last=True, collate_fn=_collate,
        num_workers=cfg["data"]["workers"], generator=g,
    )  # fmt: skip
    val_loader = torch.utils.data.DataLoader(val_set, t["batch_size"], collate_fn=_collate)
    if len(loader) == 0:
        raise ConfigError(f"train.batch_size={t['batch_size']} exceeds the {len(train_set)} training images")
    total = epochs * len(loader)
    start_epoch, step, history = 0, 0, []
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["state_dict"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        start_epoch = resume_ckpt["epoch"] + 1
        step, history = start_epoch * len(loader), resume_ckpt.get("history", [])
    params = sum(p.numel() for p in model.parameters())
    backbone_params = sum(p.numel() for n, p in model.named_parameters() if ".body." in n or "encoder." in n)
    _logger.info(
        f"{task}: {backbone_name} ({backbone_params / 1e6:.2f}M backbone, {params / 1e6:.2f}M total), "
        f"{len(train_set)} train / {len(val_set)} val images, {num_classes} classes, {epochs} epochs"
    )
    state = {"history": history}
    saver = make_saver_class()(
        model=model,
        optimizer=optimizer,
        checkpoint_dir=str(run_dir),
        recovery_dir=str(run_dir),
        max_history=1,
        extra_state=lambda: {"task": task, "config": cfg, "history": state["history"]},
    )
    if resume_ckpt is not None and resume_ckpt.get("saver"):
        saver.load_state_dict(resume_ckpt["saver"])
    log = RunLog(run_dir, cfg, epochs, start_epoch, step, resumed=resume_ckpt is not None)
    metric_name = "box_AP50" if task == "detection" else "mIoU"
    clip = cfg["optim"]["clip_grad"]
    train_speeds = []
    try:
        for epoch in range(start_epoch, epochs):
            g.manual_seed(t["seed"] * 1000 + epoch)  # the data order depends on (seed, epoch): resumable
            model.train()
            losses, seen, t0 = [], 0, time.perf_counter()
            for images, targets in loader:
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step, total, cfg)
                if task == "detection":
                    loss_dict = model(list(images), list(targets))
                    loss = sum(loss_dict.values())
                else:
                    logits = model(torch.stack(images))
                    loss = torch.nn.functional.cross_entropy(logits, torch.stack(targets), ignore_index=255)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss is {loss.item()} at update {step}; lower optim.lr (now {cfg['optim']['lr']})"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                losses.append(loss.item())
                seen += len(images)
                step += 1
                if step % t["log_interval"] == 0:
                    rate = seen / (time.perf_counter() - t0)
                    recent = float(np.mean(losses[-t["log_interval"] :]))
                    log.update(step, recent, optimizer.param_groups[0]["lr"], rate)
                    if t["progress"]:
                        _logger.info(
                            f"  epoch {epoch + 1} update {step}/{total}  loss {recent:.4f}  {rate:.1f} img/s"
                        )
            elapsed = time.perf_counter() - t0
            train_speeds.append(seen / elapsed)
            row = {
                "epoch": epoch + 1,
                "step": step,
                "loss": float(np.mean(losses)),
                "train_img_per_sec": seen / elapsed,
            }
            if (epoch + 1) % t["eval_interval"] == 0 or epoch + 1 == epochs:
                row.update(evaluate(model, val_loader, task, val_set, num_classes))
            for k, v in row.items():
                if k not in ("epoch", "step"):
                    log.writer.add_scalar(
                        f"{'train' if k in ('loss', 'train_img_per_sec') else 'val'}/{k}", v, step
                    )
            log.writer.flush()
            history.append(row)
            state["history"] = history
            shown = "  ".join(
                f"{k} {v:.2f}"
                for k, v in row.items()
                if k not in ("epoch", "step", "loss", "train_img_per_sec")
            )
            _logger.info(
                f"epoch {epoch + 1}/{epochs}  loss {row['loss']:.4f}  {row['train_img_per_sec']:.1f} img/s  "
                f"{fmt_time(elapsed)}  | {shown}"
            )
            _write_summary(run_dir, history)
            saver.save_checkpoint(epoch, metric=row.get(metric_name))
    finally:
        log.close()
    final = dict(history[-1])
    final.update(
        task=task,
        backbone=backbone_name,
        pretrained=cfg["backbone"]["checkpoint"],
        params=params,
        backbone_params=backbone_params,
        train_img_per_sec=float(np.median(train_speeds[1:] or train_speeds)) if train_speeds else None,
        **_count_flops(model, task, cfg["data"]["img_size"]),
    )
    (run_dir / "results.json").write_text(json.dumps(final, indent=1) + "\n")
    return final


def _write_summary(run_dir: Path, history: list):
    import csv

    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(run_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(history)


def _backbone_overrides(backbone: str | None, pretrained: str | None) -> list[str]:
    """--backbone NAME | CONFIG.yaml and --pretrained CHECKPOINT as config overrides. Without
    --backbone a checkpoint of this repo names its own model (its `arch`)."""
    out = []
    if pretrained:
        out.append(f"backbone.checkpoint={pretrained}")
        if not backbone:
            from engine.checkpoint import load_checkpoint

            ckpt = load_checkpoint(pretrained)
            backbone = ckpt.get("arch") if isinstance(ckpt, dict) else None
    if backbone and backbone.endswith((".yaml", ".yml")):
        out += [f"backbone.model_config={backbone}", "backbone.kwargs={}"]
    elif backbone:
        out += [f"backbone.name={backbone}", "backbone.model_config=null", "backbone.kwargs={}"]
    return out


def run(args) -> int:
    """scripts/dense.py's command: exit 0, or 2 after one `error:` line for a user mistake."""
    from engine.run_log import setup_logging

    try:
        if args.report or args.draw:
            print(report(args.report, args.speed_rounds) if args.report else draw_predictions(args.draw))
            return 0
        resume_ckpt = None
        if args.resume:
            from engine.checkpoint import load_checkpoint

            run_dir = Path(args.resume)
            resume_ckpt = load_checkpoint(run_dir / "last.pth.tar" if run_dir.is_dir() else run_dir)
            if not isinstance(resume_ckpt, dict) or resume_ckpt.get("task") not in TASKS:
                raise CheckpointError(
                    f"'{args.resume}' is not a dense run (no task in its checkpoint); "
                    "give a run folder of scripts/dense.py"
                )
            run_dir = run_dir if run_dir.is_dir() else run_dir.parent
            cfg, task = resume_ckpt["config"], resume_ckpt["task"]
        else:
            task = args.task
            overrides = list(QUICK if args.quick else []) + _backbone_overrides(
                args.backbone, args.pretrained
            )
            overrides += list(args.set or [])
            cfg = load_dense_config(args.config or [], overrides)
            t = cfg["train"]
            name = t["experiment"] or f"{datetime.now():%Y%m%d-%H%M%S}-{task}-{cfg['backbone']['name']}"
            run_dir = Path(t["output"]) / name
            if (run_dir / "last.pth.tar").exists():
                raise ConfigError(
                    f"run folder {run_dir} already holds a run; --resume {run_dir} or pick another experiment"
                )
            run_dir.mkdir(parents=True, exist_ok=True)
            configs.dump_config(cfg, run_dir / "config.yaml")
        setup_logging(run_dir / "train.log")
        final = train_and_evaluate(cfg, task, run_dir, resume_ckpt)
        shown = ", ".join(
            f"{k} {final[k]:.2f}" for k in ("box_AP", "box_AP50", "mask_AP", "mIoU") if k in final
        )
        _logger.info(f"done: {shown}; run folder {run_dir}")
        return 0
    except user_errors() as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return EXIT_ERROR


# ---------------------------------------------------------------- comparison report, pictures


def _load_run(run_dir: Path):
    """(model with the run's best weights, config, task, val dataset, class names) of a finished run."""
    from engine.checkpoint import load_checkpoint

    ckpt_path = run_dir / "model_best.pth.tar"
    ckpt = load_checkpoint(ckpt_path if ckpt_path.is_file() else run_dir)
    if not isinstance(ckpt, dict) or ckpt.get("task") not in TASKS:
        raise CheckpointError(f"'{run_dir}' is not a dense run folder; give a run folder of scripts/dense.py")
    cfg, task = ckpt["config"], ckpt["task"]
    _, val_set, names = build_data(cfg, task)
    model, _ = build_model(cfg, task, len(names))
    if task == "segmentation":
        model = _Normalise(model, cfg["data"]["mean"], cfg["data"]["std"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), cfg, task, val_set, names


@torch.no_grad()
def draw_predictions(run_dir, out=None, count: int = 6, min_score: float = 0.5) -> Path:
    """A PNG of a run's predictions on its first `count` val images: the images, the ground truth and
    the prediction (detection: masks and boxes with class and score; segmentation: the class map)."""
    from PIL import Image, ImageDraw

    run_dir = Path(run_dir)
    model, cfg, task, val_set, names = _load_run(run_dir)
    palette = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                        [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60],
                        [250, 190, 212], [0, 128, 128], [220, 190, 255]], dtype=np.uint8)  # fmt: skip
    scale = 4
    rows = []
    for i in range(min(count, len(val_set))):
        image, target = val_set[i]
        rgb = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        panels = [rgb]
        if task == "detection":
            pred = model([image])[0]
            keep = pred["scores"] >= min_score
            truth = {
                "masks": target["masks"],
                "boxes": target["boxes"],
                "labels": target["labels"],
                "scores": None,
            }
            found = {k: v[keep] for k, v in pred.items()}
            for det in (truth, found):
                canvas = rgb.copy()
                for j, label in enumerate(det["labels"].tolist()):
                    m = det["masks"][j].squeeze(0).numpy() > 0.5
                    canvas[m] = (0.45 * canvas[m] + 0.55 * palette[label % len(palette)]).astype(np.uint8)
                big = Image.fromarray(canvas).resize((canvas.shape[1] * scale,) * 2, Image.NEAREST)
                draw = ImageDraw.Draw(big)
                for j, (box, label) in enumerate(
                    zip(det["boxes"].tolist(), det["labels"].tolist(), strict=True)
                ):
                    colour = tuple(int(c) for c in palette[label % len(palette)])
                    draw.rectangle([v * scale for v in box], outline=colour, width=2)
                    text = names[label - 1] + ("" if det["scores"] is None else f" {det['scores'][j]:.2f}")
                    draw.text((box[0] * scale + 2, box[1] * scale + 1), text, fill=(255, 255, 255))
                panels.append(np.asarray(big))
        else:
            pred = model(image[None]).argmax(1)[0].numpy()
            panels += [palette[target.clamp(max=len(palette) - 1).numpy()], palette[pred % len(palette)]]
        size = rgb.shape[0] * scale
        row = [np.asarray(Image.fromarray(p).resize((size, size), Image.NEAREST)) for p in panels]
        rows.append(np.concatenate(row, axis=1))
    out = Path(out) if out else run_dir / "predictions.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(out)
    return out


def interleaved_speeds(run_dirs: dict, rounds: int, batch: int = 8) -> dict:
    """{name: {"train": img/s, "infer": img/s}} of finished runs, timed in interleaved rounds
    (engine/bench.py: every model once per round, seconds apart, so a busy shared CPU slows all
    alike): a train step (forward + backward on `batch` training images) and inference on `batch`
    val images; the median over rounds."""
    from engine.bench import interleaved_rounds

    steps = {}
    for name, run_dir in run_dirs.items():
        model, cfg, task, val_set, _ = _load_run(Path(run_dir))
        train_set, _, _ = build_data(cfg, task)
        images, targets = _collate([train_set[i] for i in range(batch)])
        val_images = [val_set[i][0] for i in range(batch)]

        def train_step(model=model, task=task, images=images, targets=targets):
            model.train()
            if task == "detection":
                loss = sum(model(list(images), list(targets)).values())
            else:
                logits = model(torch.stack(images))
                loss = torch.nn.functional.cross_entropy(logits, torch.stack(targets), ignore_index=255)
            loss.backward()
            model.zero_grad(set_to_none=True)

        @torch.no_grad()
        def infer(model=model, task=task, val_images=val_images):
            model.eval()
            model(val_images if task == "detection" else torch.stack(val_images))

        steps[f"{name}/train"], steps[f"{name}/infer"] = train_step, infer
    times = interleaved_rounds(steps, rounds)
    kinds = ("train", "infer")
    return {name: {k: batch / float(np.median(times[f"{name}/{k}"])) for k in kinds} for name in run_dirs}


def report(out_dir, speed_rounds: int = 0) -> Path:
    """Tabulate the runs under `out_dir` (folders `<task>-<label>-s<seed>` with results.json): per task
    and label the mean (and min..max over seeds) of the metrics, params, FLOPs, img/s; learning curves.
    Writes OUT/dense_comparison.{md,json} and OUT/learning_curves.png; returns the .md path.
    `speed_rounds` > 0 adds img/s timed side by side (`interleaved_speeds`) of each seed-0 run."""
    import csv
    import re
    from collections import defaultdict

    from engine.bench import plot_panels

    out_dir = Path(out_dir)
    runs = defaultdict(list)
    for results in sorted(out_dir.glob("*/results.json")):
        match = re.fullmatch(r"(detection|segmentation)-(.+)-s(\d+)", results.parent.name)
        if match:
            runs[match[1], match[2]].append((int(match[3]), json.loads(results.read_text()), results.parent))
    if not runs:
        raise ConfigError(f"no finished runs (<task>-<label>-s<seed>/results.json) under {out_dir}")
    first = {key: min(seeds, key=lambda s: s[0])[2] for key, seeds in runs.items()}
    speeds = {}
    if speed_rounds:
        speeds = interleaved_speeds({f"{t}-{label}": d for (t, label), d in first.items()}, speed_rounds)
    metrics = {"detection": ["box_AP", "box_AP50", "mask_AP", "mask_AP50"], "segmentation": ["mIoU"]}
    lines, table, curves = [], [], {task: {} for task in TASKS}
    for task in TASKS:
        rows = [(label, seeds) for (t, label), seeds in runs.items() if t == task]
        if not rows:
            continue
        cols = [*metrics[task], "backbone params", "params", "backbone GFLOPs", "GFLOPs"]
        cols += ["train img/s", "eval img/s"] + (
            ["train img/s side by side", "infer img/s side by side"] * bool(speeds)
        )
        lines += [
            f"\n**{task}**\n",
            "| backbone | seeds | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 2) + "|",
        ]
        for label, seeds in rows:
            res = [r for _, r, _ in seeds]

            def cell(key, res=res):
                values = [r[key] for r in res if r.get(key) is not None]
                if not values:
                    return "-"
                spread = f" ({min(values):.1f}..{max(values):.1f})" if len(values) > 1 else ""
                return f"{np.mean(values):.1f}{spread}"

            cells = [cell(k) for k in metrics[task]]
            cells += [f"{res[0]['backbone_params'] / 1e6:.2f}M", f"{res[0]['params'] / 1e6:.2f}M"]
            cells += [f"{res[0].get('backbone_flops', 0) / 1e9:.3f}", f"{res[0].get('flops', 0) / 1e9:.3f}"]
            cells += [cell("train_img_per_sec"), cell("eval_img_per_sec")]
            if speeds:
                cells += [f"{speeds[f'{task}-{label}'][k]:.1f}" for k in ("train", "infer")]
            lines.append(f"| {label} | {','.join(str(s) for s, _, _ in seeds)} | " + " | ".join(cells) + " |")
            row = {"task": task, "label": label, "seeds": [s for s, _, _ in seeds], "results": res}
            table.append(dict(row, side_by_side_img_per_sec=speeds.get(f"{task}-{label}")))
            with open(first[task, label] / "summary.csv") as f:
                key = "box_AP50" if task == "detection" else "mIoU"
                curves[task][label] = [
                    (int(r["epoch"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)
                ]
    md = out_dir / "dense_comparison.md"
    md.write_text("\n".join(lines).lstrip() + "\n")
    (out_dir / "dense_comparison.json").write_text(json.dumps(table, indent=1) + "\n")
    titles = {
        "detection": "detection: val box AP50 (seed 0)",
        "segmentation": "segmentation: val mIoU (seed 0)",
    }
    plot_panels(
        [[(titles[t], curves[t]) for t in TASKS if curves[t]]],
        out_dir / "learning_curves.png",
        "epoch",
        "percent",
    )
    return md
