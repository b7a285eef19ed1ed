"""Evaluating a checkpoint: top-1 / top-5 / loss / img/s / per-class accuracy on a dataset or a class
subset, for our checkpoints, timm's and official NAT/DiNAT files.

Owns how a checkpoint's classes are matched to a dataset's (by name: the checkpoint's class list, or
ImageNet-1k wnid order for a 1000-class model; integer-named folders, ImageNetV2's `0`..`999`, by
output index; a val folder holding some of the classes scores those) and which data settings win
(checkpoint <- -c configs <- flags, the transform too). `run(args)` is the command behind eval.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import configs
from configs import ConfigError
from engine.bench import usable_cpus
from engine.checkpoint import checkpoint_settings, extract_state_dict, load_checkpoint
from engine.errors import EXIT_ERROR, CheckpointError, first_line, user_errors
from engine.factory import (
    check_model_name,
    checkpoint_data_config,
    create_model_for_checkpoint,
    data_build_config,
)
from engine.precision import cpu_precision_notes

_logger = logging.getLogger(__name__)


def data_settings(args, ckpt: dict, has_settings: bool) -> dict:
    """The data config: checkpoint's (a training checkpoint's config) <- -c configs <- flags."""
    if args.config:
        cfg = configs.load_config(args.config)
    elif isinstance(ckpt.get("config"), dict):
        cfg = configs.validate(ckpt["config"])
    else:
        cfg = configs.load_config()
        if not args.data_dir:
            what = (
                "carries its model and transform settings but not its dataset (exported weights)"
                if has_settings
                else "has no dataset settings (not a training checkpoint of this repo)"
            )
            raise ConfigError(f"this checkpoint {what}: pass --data-dir DIR (or -c CONFIG)")
    d = dict(cfg["data"])
    if args.data_dir:
        d["root"] = args.data_dir
    if args.dataset:
        d["dataset"] = args.dataset
    if args.class_list:
        d["class_list"] = args.class_list
        d["num_classes"] = None
    if args.max_per_class is not None:
        d["max_per_class_val"] = args.max_per_class
    if args.split:
        d["val_split"] = args.split
    if args.workers is not None:
        d["workers"] = args.workers
    else:  # the config's (default 4) on the CPUs this process may use: more only queue (torch warns)
        d["workers"] = min(d["workers"], usable_cpus())
    return d


def build_eval_dataset(d: dict, model_classes: list[str] | None, subset_trained: bool = False):
    """(dataset, class names) for the eval split. Folder data: only the eval split is read; with the
    model's class names and no subset asked for, the split's class folders (all or some of them).
    `subset_trained`: the model saw a subset of the folders, so others are left out without a word."""
    from data import DataError, build_datasets, build_image_folder, resolve_classes
    from data.folder import class_folders

    if d["dataset"] in ("folder", "imagefolder", ""):
        root = Path(d["root"])
        split_dir = root / d["val_split"]
        if not split_dir.is_dir():  # (resolve_classes would call it the train folder, and blame the config)
            raise DataError(f"eval folder {split_dir} does not exist; check --data-dir and --split")
        if d["class_list"] is None and d["num_classes"] is None and model_classes:
            present = class_folders(split_dir)
            # the model's order for the folders that are (some of) its classes, others left out as
            # training left them out; else the folders' own (integer names: output indices)
            known = [c for c in model_classes if c in present]
            extra = sorted(set(present) - set(model_classes))
            if known and extra and not subset_trained:
                _logger.warning(
                    f"warning: {len(extra)} class folder(s) of {split_dir} are not among the checkpoint's "
                    f"classes (e.g. '{extra[0]}'): not scored"
                )
            classes = known or present or list(model_classes)  # no class folders: build_image_folder says why
        else:
            # a subset is drawn from the train split's classes (as training did); else the split's own
            train_dir = root / d["train_split"]
            classes = resolve_classes(
                train_dir if train_dir.is_dir() else split_dir, d["class_list"], d["num_classes"], d["seed"]
            )
        ds = build_image_folder(split_dir, classes, max_per_class=d["max_per_class_val"], seed=d["seed"])
        return ds, classes
    bundle = build_datasets(data_build_config({"data": d}))
    return bundle.val, list(bundle.classes)


def integer_classes(ds_classes: list[str], num_outputs: int) -> list[int] | None:
    """The output indices that integer-named class folders (ImageNetV2 keeps `0`..`999`) stand for."""
    if all(c.isdigit() and int(c) < num_outputs for c in ds_classes):
        return [int(c) for c in ds_classes]
    return None


def class_index_map(
    ds_classes: list[str], model_classes: list[str] | None, num_outputs: int
) -> list[int] | None:
    """For each dataset class, the model output that predicts it (None: identity)."""
    if model_classes:
        missing = [c for c in ds_classes if c not in model_classes]
        idx = integer_classes(ds_classes, len(model_classes)) if missing else None
        if missing and idx is None:
            raise CheckpointError(
                f"{len(missing)} dataset classes are not among the checkpoint's {len(model_classes)} classes "
                f"(e.g. '{missing[0]}'); evaluate on the classes it was trained on (or on folders named "
                "by output index, 0..N-1)"
            )
        idx = idx or [model_classes.index(c) for c in ds_classes]
        if set(model_classes) <= set(ds_classes):
            # every named class is here: outputs past the names (model.num_classes above the dataset's
            # classes) stay scored, never a target, as training scored them
            idx += list(range(len(model_classes), num_outputs))
        return None if idx == list(range(num_outputs)) else idx
    if integer_classes(ds_classes, num_outputs) is not None:
        idx = integer_classes(ds_classes, num_outputs)
        return None if idx == list(range(num_outputs)) else idx
    if num_outputs == 1000 and len(ds_classes) != 1000:
        from timm.data import ImageNetInfo

        wnids = ImageNetInfo().label_names()
        if all(c in wnids for c in ds_classes):
            return [wnids.index(c) for c in ds_classes]
    if len(ds_classes) == num_outputs:
        return None
    raise CheckpointError(
        f"the model has {num_outputs} outputs but the dataset has {len(ds_classes)} classes and the "
        "checkpoint names none; evaluate on a dataset with the same classes "
        "(or ImageNet wnid folders for a 1k model)"
    )


def evaluate(args) -> dict:
    """Score the checkpoint `args.checkpoint` (eval.py's options); the result that goes to the JSON."""
    from timm.data import create_loader
    from timm.utils import accuracy

    from data import corrupt_count
    from data.folder import UNREADABLE

    ckpt_path = Path(args.checkpoint)
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / "model_best.pth.tar"
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"'{ckpt_path}' holds a {type(ckpt).__name__}, not a model state_dict")
    settings = checkpoint_settings(ckpt)
    name = args.model or settings.get("arch")
    if not name:
        raise ConfigError(f"'{ckpt_path}' does not name its model: pass --model NAME (e.g. --model nat_mini)")
    check_model_name(name)
    sd = extract_state_dict(ckpt, ckpt_path, use_ema=args.use_ema)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)

    # outputs: what the checkpoint says (ours), else its classifier's rows, else the model default
    model, kwargs = create_model_for_checkpoint(
        name, ckpt, sd, ckpt_path, model_kwargs=args.model_kwargs, num_classes=args.num_classes
    )
    num_outputs = model.num_classes
    same_arch = settings.get("arch") == name
    model_classes = settings.get("classes") if same_arch else None

    d = data_settings(args, ckpt if settings else {}, bool(settings))
    subset = d["class_list"] is not None or d["num_classes"] is not None
    if model_classes and subset and not args.class_list:
        # the checkpoint names the subset it trained on: score those classes in whatever folder holds
        # them (drawn again from another folder's classes, the subset came out different)
        d = dict(d, class_list=None, num_classes=None)
    dataset, ds_classes = build_eval_dataset(d, model_classes, subset_trained=subset)
    if hasattr(dataset, "unreadable_target"):
        dataset.unreadable_target = UNREADABLE  # left out of the scores, not replaced by a neighbour
    index_map = class_index_map(ds_classes, model_classes, num_outputs)

    # the transform: the checkpoint's run config <- its eval transform <- -c configs <- flags
    saved = settings.get("data_config") if same_arch else None
    data_config = checkpoint_data_config(
        model,
        *((saved, d) if args.config else (d, saved)),
        {"img_size": args.img_size, "crop_pct": args.crop_pct, "interpolation": args.interpolation},
    )
    loader = create_loader(
        dataset,
        input_size=data_config["input_size"],
        batch_size=args.batch_size,
        is_training=False,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode"),
        num_workers=d["workers"],
        pin_memory=device.type == "cuda",
        device=device,
        use_prefetcher=False,
    )
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    use_amp = args.amp and device.type in ("cuda", "cpu")  # bf16: oneDNN's AMX / AVX512-BF16 on CPU
    if use_amp and device.type == "cpu" and (warning := cpu_precision_notes(use_amp)[1]):
        _logger.warning(warning)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    n_cls = len(ds_classes)
    correct = torch.zeros(n_cls, dtype=torch.long)
    count = torch.zeros(n_cls, dtype=torch.long)
    loss_sum = top1 = top5 = 0.0
    n = 0
    model_time = 0.0
    idx = torch.tensor(index_map, device=device) if index_map is not None else None
    t0 = time.perf_counter()
    with torch.no_grad():
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # this GPU (cuda:N), not the current one
            tm = time.perf_counter()
            with amp():
                logits = model(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            model_time += time.perf_counter() - tm
            logits = logits.float()
            if idx is not None:
                logits = logits[:, idx]
            readable = target != UNREADABLE
            logits, target = logits[readable], target[readable]
            if not len(target):
                continue
            loss_sum += loss_fn(logits, target).item()
            a1, a5 = accuracy(logits, target, topk=(1, min(5, n_cls)))
            b = len(target)
            top1 += a1.item() * b
            top5 += a5.item() * b
            n += b
            pred = logits.argmax(1).cpu()
            t_cpu = target.cpu()
            count += torch.bincount(t_cpu, minlength=n_cls)
            correct += torch.bincount(t_cpu[pred == t_cpu], minlength=n_cls)
    elapsed = time.perf_counter() - t0
    if n == 0:
        raise ConfigError(f"no images to evaluate in {d['root']}/{d['val_split']}; check --data-dir/--split")
    per_class = {
        c: {"top1": round(100.0 * correct[i].item() / max(count[i].item(), 1), 3), "count": int(count[i])}
        for i, c in enumerate(ds_classes)
    }
    return {
        "checkpoint": str(ckpt_path),
        "model": name,
        "model_kwargs": kwargs,
        "weights": "ema" if args.use_ema else "model",
        "param_count": sum(p.numel() for p in model.parameters()),
        "dataset": {
            "root": str(d["root"]),
            "split": d["val_split"],
            "dataset": d["dataset"],
            "num_images": n,
            "num_classes": n_cls,
            "model_classes": num_outputs,
            # outputs scored: all, or (the dataset a subset of the checkpoint's classes) the dataset's
            "scored_outputs": num_outputs if index_map is None else len(index_map),
            "unreadable_images_skipped": corrupt_count(dataset),
        },
        "input_size": list(data_config["input_size"]),
        "crop_pct": data_config["crop_pct"],
        "interpolation": data_config["interpolation"],
        "top1": round(top1 / n, 4),
        "top5": round(top5 / n, 4),
        "loss": round(loss_sum / n, 6),
        "img_per_sec": round(n / elapsed, 2),
        "model_img_per_sec": round(n / max(model_time, 1e-9), 2),
        "batch_size": args.batch_size,
        "device": str(device),
        "precision": "bfloat16 autocast" if use_amp else "float32",
        "per_class": per_class,
    }


def default_output(args) -> Path:
    """<checkpoint>-eval[-ema].json beside the checkpoint (eval[-ema].json inside a run folder)."""
    suffix = "-eval-ema.json" if args.use_ema else "-eval.json"
    ckpt = Path(args.checkpoint)
    if ckpt.is_dir():
        return ckpt / suffix.lstrip("-")
    stem = ckpt.name.removesuffix(".tar").removesuffix(".pth").removesuffix(".safetensors")
    return ckpt.with_name(stem + suffix)


def run(args) -> int:
    """The eval command: evaluate, write the JSON, print the summary; the exit status (2 after a
    one-line `error:` for a user mistake)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        result = evaluate(args)
        out = default_output(args) if not args.output else Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)
    except user_errors() as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # e.g. the JSON can't be written
        print(f"error: {e}; pass --output PATH somewhere writable", file=sys.stderr)
        return EXIT_ERROR
    ds = result["dataset"]
    classes = f"{ds['num_classes']} classes"
    if ds["scored_outputs"] < ds["model_classes"]:
        classes = f"{ds['num_classes']} of the model's {ds['model_classes']} classes, scored among those"
    h, w = result["input_size"][1:]
    print(
        f"{result['model']} ({result['weights']} weights) on {ds['root']}/{ds['split']} "
        f"({ds['num_images']} images, {classes}, {h if h == w else f'{h}x{w}'} px): "
        f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  loss {result['loss']:.4f}  "
        f"{result['img_per_sec']:.1f} img/s"
    )
    if not args.quiet and ds["num_classes"] <= 50:
        for c, v in result["per_class"].items():
            print(f"  {c:<24} {v['top1']:6.2f}  ({v['count']} images)")
    if ds["unreadable_images_skipped"]:
        print(f"skipped {ds['unreadable_images_skipped']} unreadable images (warned above; not scored)")
    print(f"wrote {out}")
    return 0
