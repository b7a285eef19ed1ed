"""Scoring and reporting dense runs: COCO box and mask AP through pycocotools (`coco_ap`), mIoU from
a confusion matrix (`confusion_matrix`, `miou`), one pass over a val loader (`evaluate`), and the
finished-run tools: `draw_predictions` (a predictions picture), `interleaved_speeds` (img/s timed
side by side) and `report` (the comparison table and learning curves of a folder of runs).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from configs import ConfigError
from data.dense import IGNORE_INDEX
from engine.dense_config import TASKS, Normalise, build_data, build_model, collate, training_loss
from engine.errors import CheckpointError

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
        if int(output["labels"][i]) not in label_to_category:  # FCOS's unused label 0: no category
            continue
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


def same_size_batches(images) -> list[tuple[list[int], torch.Tensor]]:
    """`images` (a list of 3 x H x W) as stacked batches of one size each, with their positions:
    validation images keep their aspect ratio, so a loader's batch may mix sizes."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    return [(idx, torch.stack([images[i] for i in idx])) for idx in groups.values()]


def segment(model, images, sizes, scales=(1.0,), flip: bool = False) -> list[torch.Tensor]:
    """Class maps of `images` at `sizes` (each image's mask size): the logits upsampled bilinearly
    where the image was rescaled (mmseg's scoring at the annotation's resolution). Several `scales`
    and/or `flip`: mmseg's multi-scale test, the softmax of every rescaled (and mirrored) input's
    logits, each upsampled to the mask, averaged."""
    out: list[torch.Tensor | None] = [None] * len(images)
    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    for idx, batch in same_size_batches(images):
        total: list[torch.Tensor | float] = [0.0] * len(idx)
        for scale, mirrored in views:
            x = (
                batch
                if scale == 1
                else F.interpolate(batch, scale_factor=scale, mode="bilinear", align_corners=False)
            )
            logits = model(x.flip(-1)).flip(-1) if mirrored else model(x)
            for j, (i, lg) in enumerate(zip(idx, logits, strict=True)):
                size = tuple(sizes[i])
                if tuple(lg.shape[-2:]) != size:
                    lg = F.interpolate(lg[None], size=size, mode="bilinear", align_corners=False)[0]
                total[j] = total[j] + (lg.softmax(0) if len(views) > 1 else lg)
        for i, summed in zip(idx, total, strict=True):
            out[i] = summed.argmax(0)
    return out


@torch.no_grad()
def evaluate(model, loader, task: str, val_set, num_classes: int, scales=(1.0,), flip: bool = False) -> dict:
    """Detection: box (and mask) AP / AP50 / AP75; segmentation: mIoU, pixel accuracy (at `scales`,
    `flip`: see `segment`); plus img/s."""
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
        # a mask head's AP is reported even for an epoch without detections (0, as the box AP)
        roi_heads = getattr(model, "roi_heads", None)
        if roi_heads is not None and roi_heads.has_mask():
            metrics.update({f"mask_{k}": v for k, v in coco_ap(val_set.coco_gt, results, "segm").items()})
    else:
        conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        for images, masks in loader:
            preds = segment(model, images, [m.shape for m in masks], scales, flip)
            for pred, mask in zip(preds, masks, strict=True):
                conf += confusion_matrix(pred, mask, num_classes)
            seen += len(images)
        elapsed = time.perf_counter() - start
        metrics = {
            "mIoU": miou(conf)[0],
            "pixel_acc": 100 * float(conf.diag().sum() / conf.sum().clamp(min=1)),
        }
    metrics["eval_img_per_sec"] = seen / elapsed
    return metrics


# ---------------------------------------------------------------- comparison report, pictures


def _load_run(run_dir: Path):
    """(model with the run's best weights, config, task, val dataset, class names) of a finished run."""
    from engine.checkpoint import load_checkpoint

    ckpt_path = run_dir / "model_best.pth.tar"
    ckpt = load_checkpoint(ckpt_path if ckpt_path.is_file() else run_dir)
    if not isinstance(ckpt, dict) or ckpt.get("task") not in TASKS:
        raise CheckpointError(f"'{run_dir}' is not a dense run folder; give a run folder of scripts/dense.py")
    cfg, task = ckpt["config"], ckpt["task"]
    _, val_set, names = build_data(cfg, task, train_split=False)
    model, _ = build_model(cfg, task, len(names))
    if task == "segmentation":
        model = Normalise(model, cfg["data"]["mean"], cfg["data"]["std"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), cfg, task, val_set, names


def evaluate_run(run_dir, scales=(1.0,), flip: bool = False) -> dict:
    """A finished run's best weights scored on its val split (segmentation: at `scales`, `flip`, as
    mmseg's multi-scale test), written with those settings to RUN/evaluation.json (single scale) or
    RUN/evaluation-<scales>[-flip].json, so one evaluation does not overwrite another's."""
    run_dir = Path(run_dir)
    model, cfg, task, val_set, names = _load_run(run_dir)
    rescaled = tuple(scales) != (1.0,)
    if task == "detection" and (rescaled or flip):
        raise ConfigError(
            "--scales and --flip apply to segmentation runs; a detection run is scored as trained"
        )
    loader = torch.utils.data.DataLoader(val_set, cfg["train"]["batch_size"], collate_fn=collate)
    metrics = evaluate(model, loader, task, val_set, len(names), tuple(scales), flip)
    result = {"scales": list(scales), "flip": flip, **metrics}
    name = "-".join(["evaluation", *([f"{s:g}" for s in scales] if rescaled else [])])
    name += "-flip" if flip else ""
    result["file"] = str(run_dir / f"{name}.json")
    (run_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


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
        height, width = rgb.shape[:2]  # not square in general (a COCO folder): boxes stay on their masks
        panels = [rgb]
        if task == "detection":
            pred = model([image])[0]
            keep = pred["scores"] >= min_score
            truth = {k: target[k] for k in ("masks", "boxes", "labels") if k in target} | {"scores": None}
            found = {k: v[keep] for k, v in pred.items()}
            for det in (truth, found):
                canvas = rgb.copy()
                for j, label in enumerate(det["labels"].tolist() if "masks" in det else []):  # FCOS: boxes
                    m = det["masks"][j].squeeze(0).numpy() > 0.5
                    canvas[m] = (0.45 * canvas[m] + 0.55 * palette[label % len(palette)]).astype(np.uint8)
                big = Image.fromarray(canvas).resize((width * scale, height * scale), Image.NEAREST)
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
            truth = palette[(target % len(palette)).numpy()]
            truth[(target == IGNORE_INDEX).numpy()] = 128  # ignored pixels grey, not a class's colour
            panels += [truth, palette[pred % len(palette)]]
        size = (width * scale, height * scale)
        row = [np.asarray(Image.fromarray(p).resize(size, Image.NEAREST)) for p in panels]
        rows.append(np.concatenate(row, axis=1))
    widest = max(r.shape[1] for r in rows)  # images of other sizes: rows padded black on the right
    rows = [np.pad(r, ((0, 0), (0, widest - r.shape[1]), (0, 0))) for r in rows]
    out = Path(out) if out else run_dir / "predictions.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(out)
    return out


def interleaved_speeds(run_dirs: dict, rounds: int, batch: int = 8) -> dict:
    """{name: {"train": img/s, "infer": img/s}} of finished runs, timed in interleaved rounds
    (engine/bench.py: every model once per round, seconds apart, so a busy shared CPU slows all
    alike): a train step (forward + backward on `batch` training images) and inference on `batch`
    val images (fewer where a split has fewer); the median over rounds."""
    from engine.bench import interleaved_rounds

    steps, counts = {}, {}
    for name, run_dir in run_dirs.items():
        model, cfg, task, val_set, _ = _load_run(Path(run_dir))
        train_set, _, _ = build_data(cfg, task)
        images, targets = collate([train_set[i] for i in range(min(batch, len(train_set)))])
        val_images = [val_set[i][0] for i in range(min(batch, len(val_set)))]
        counts[f"{name}/train"], counts[f"{name}/infer"] = len(images), len(val_images)

        def train_step(model=model, task=task, images=images, targets=targets):
            model.train()
            loss = training_loss(model, task, images, targets)
            loss.backward()
            model.zero_grad(set_to_none=True)

        @torch.no_grad()
        def infer(model=model, task=task, val_images=val_images):
            model.eval()
            if task == "detection":
                model(val_images)
            else:
                for _, batch in same_size_batches(val_images):
                    model(batch)

        steps[f"{name}/train"], steps[f"{name}/infer"] = train_step, infer
    times = interleaved_rounds(steps, rounds)
    kinds = ("train", "infer")
    return {
        name: {k: counts[f"{name}/{k}"] / float(np.median(times[f"{name}/{k}"])) for k in kinds}
        for name in run_dirs
    }


def report(out_dir, speed_rounds: int = 0) -> Path:
    """Tabulate the finished runs under `out_dir` (folders with results.json): per task and label the
    mean (and min..max over seeds) of the metrics, params, FLOPs, img/s; learning curves. Folders named
    `<task>-<label>-s<seed>` (train.experiment) are grouped by label; others (the default
    `<date-time>-<task>-<model>`) are a row each, under their folder's name.
    Writes OUT/dense_comparison.{md,json} and OUT/learning_curves.png; returns the .md path.
    `speed_rounds` > 0 adds img/s timed side by side (`interleaved_speeds`) of each seed-0 run."""
    import csv
    import re
    from collections import defaultdict

    from engine.bench import plot_panels

    out_dir = Path(out_dir)
    runs = defaultdict(list)
    for results in sorted(out_dir.glob("*/results.json")):
        run, res = results.parent, json.loads(results.read_text())
        match = re.fullmatch(r"(detection|segmentation)-(.+)-s(\d+)", run.name)
        if match:
            runs[match[1], match[2]].append((int(match[3]), res, run))
        elif res.get("task") in TASKS:
            seed = yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"]
            runs[res["task"], run.name].append((seed, res, run))
    if not runs:
        raise ConfigError(f"no finished runs (RUN/results.json) under {out_dir}")
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
            cells += [f"{res[0][k] / 1e9:.3f}" if k in res[0] else "-" for k in ("backbone_flops", "flops")]
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
