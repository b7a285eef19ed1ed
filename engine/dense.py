"""Dense prediction runs: detection (torchvision Mask R-CNN / FCOS) and semantic segmentation (smp
UPerNet) over any timm backbone, trained and scored from a YAML config; scripts/dense.py's command.

Owns the train loop (`train_and_evaluate`) and the command (`run`: a new run, `--resume`, `--draw`,
`--report`). The config schema and the model building are engine/dense_config.py's; the metrics, the
predictions picture and the comparison report engine/dense_eval.py's.

A run folder holds config.yaml, train.log, tb/ (TensorBoard), summary.csv, last.pth.tar /
model_best.pth.tar (the repo's atomic saver) and results.json (the final metrics, params, FLOPs,
train and inference img/s). `--resume RUN` continues a run from its last epoch checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import configs
from configs import ConfigError
from engine.dense_config import (
    QUICK,
    TASKS,
    Normalise,
    build_data,
    build_model,
    collate,
    load_dense_config,
    training_loss,
)
from engine.dense_eval import draw_predictions, evaluate, evaluate_run, report
from engine.errors import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    CheckpointError,
    TrainingError,
    first_line,
    user_errors,
)
from engine.resume import new_run_folder

_logger = logging.getLogger("train")


# ---------------------------------------------------------------- training


def _no_weight_decay(model: torch.nn.Module) -> set[str]:
    """Full names of the parameters that any module inside `model` (the backbone wherever the detector
    or segmenter puts it) excludes by its `no_weight_decay()`: NAT's RPB tables, a mixer's tokens."""
    skip = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            skip |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return skip


def _optimizer(model, cfg):
    from timm.optim import param_groups_weight_decay

    o = cfg["optim"]
    # no weight decay on norms, biases (1-d tensors) and what the backbone excludes (RPB tables), as the
    # official recipes; timm matches the list against full names, hence the backbone's own names
    groups = param_groups_weight_decay(model, o["weight_decay"], no_weight_decay_list=_no_weight_decay(model))
    return torch.optim.AdamW(groups, lr=o["lr"])


def _lr_at(step: int, total: int, cfg: dict) -> float:
    """Linear warm-up, then cosine to min_lr, per update."""
    lr, min_lr, warm = cfg["optim"]["lr"], cfg["sched"]["min_lr"], cfg["sched"]["warmup_updates"]
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


# ---------------------------------------------------------------- the run


def _count_flops(model, task, size) -> dict:
    """Multiply-adds at one val-size image: the backbone (+ FPN for detection) and the whole model."""
    from models.flops import count_flops

    backbone = model.backbone if task == "detection" else model.model.encoder
    backbone_size = size
    if task == "segmentation":  # Normalise pads the input to smp's output stride: what the encoder sees
        backbone_size = -(-size // backbone.output_stride) * backbone.output_stride
    out = {}
    for name, m, side in (("backbone_flops", backbone, backbone_size), ("flops", model, size)):
        try:
            out[name] = int(count_flops(m, (3, side, side)))
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
        model = Normalise(model, cfg["data"]["mean"], cfg["data"]["std"])
    optimizer = _optimizer(model, cfg)
    t = cfg["train"]
    epochs = cfg["sched"]["epochs"]
    g = torch.Generator()
    loader = torch.utils.data.DataLoader(
        train_set, t["batch_size"], shuffle=True, drop_last=True, collate_fn=collate,
        num_workers=cfg["data"]["workers"], generator=g,
    )  # fmt: skip
    val_loader = torch.utils.data.DataLoader(val_set, t["batch_size"], collate_fn=collate)
    if len(loader) == 0:
        raise ConfigError(f"train.batch_size={t['batch_size']} exceeds the {len(train_set)} training images")
    total = epochs * len(loader)
    start_epoch, step, history = 0, 0, []
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["state_dict"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        history = resume_ckpt.get("history", [])
        start_epoch = len(history)  # a row per finished epoch (the saved "epoch" counted from 0 before)
        step = start_epoch * len(loader)
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
    # the best epoch by COCO's primary metric (mmdet's save_best): AP50 saturates on an easy task and
    # kept the first epoch that reached it while AP went on rising (FCOS: 37.8 kept, 57.9 at the end)
    metric_name = "box_AP" if task == "detection" else "mIoU"
    clip = cfg["optim"]["clip_grad"]
    try:
        for epoch in range(start_epoch, epochs):
            g.manual_seed(t["seed"] * 1000 + epoch)  # the data order depends on (seed, epoch): resumable
            model.train()
            losses, seen, t0 = [], 0, time.perf_counter()
            for images, targets in loader:
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step, total, cfg)
                loss = training_loss(model, task, images, targets)
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
            row = {
                "epoch": epoch + 1,
                "step": step,
                "loss": float(np.mean(losses)),
                "train_img_per_sec": seen / elapsed,
            }
            if (epoch + 1) % t["eval_interval"] == 0 or epoch + 1 == epochs:
                row.update(evaluate(model, val_loader, task, val_set, num_classes))
            epoch_tags = {"loss": "train/epoch_loss", "train_img_per_sec": "train/epoch_img_per_sec"}
            for k, v in row.items():
                if k not in ("epoch", "step"):  # not train/loss: update() wrote that tag at this step
                    log.writer.add_scalar(epoch_tags.get(k, f"val/{k}"), v, step)
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
            saver.save_checkpoint(epoch + 1, metric=row.get(metric_name))  # from 1, as the log: checkpoint-1
    finally:
        log.close()
    final = dict(history[-1])
    speeds = [row["train_img_per_sec"] for row in history]
    final.update(
        task=task,
        backbone=backbone_name,
        pretrained=cfg["backbone"]["checkpoint"],
        params=params,
        backbone_params=backbone_params,
        # every epoch's, a resumed run's earlier ones too (history); the first warms up
        train_img_per_sec=float(np.median(speeds[1:] or speeds)),
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


def _configured_model(cfg_backbone: dict) -> str:
    """The model name a config's backbone section builds (its `model_config`'s, else its `name`)."""
    if cfg_backbone["model_config"]:
        return configs.load_config([cfg_backbone["model_config"]])["model"]["name"]
    return cfg_backbone["name"]


def _backbone_overrides(backbone: str | None, pretrained: str | None, configured: dict) -> list[str]:
    """--backbone NAME | CONFIG.yaml and --pretrained CHECKPOINT as config overrides of the config
    files' backbone section `configured`. Without --backbone a checkpoint of this repo names its own
    model (its `arch`). The files' `backbone.kwargs` stay where the model is the one they configure
    (e.g. `stage_norms` for the checkpoint's NAT), and are dropped for another model."""
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
        out += [f"backbone.name={backbone}", "backbone.model_config=null"]
        if backbone != _configured_model(configured):
            out.append("backbone.kwargs={}")
    return out


def run(args) -> int:
    """scripts/dense.py's command: exit 0, or 2 after one `error:` line for a user mistake."""
    from engine.factory import check_model_name
    from engine.run_log import close_log_file, setup_logging

    try:
        if args.report or args.draw:
            print(report(args.report, args.speed_rounds) if args.report else draw_predictions(args.draw))
            return 0
        if args.evaluate:
            result = evaluate_run(args.evaluate, args.scales, args.flip)
            print("  ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float)))
            print(f"wrote {result['file']}")
            return 0
        resume_ckpt, new_folder = None, None
        if args.resume:
            from engine.checkpoint import load_checkpoint

            run_dir = Path(args.resume)
            if (
                run_dir.is_dir()
                and not (run_dir / "last.pth.tar").exists()
                and (run_dir / "config.yaml").exists()
            ):
                raise CheckpointError(
                    f"{run_dir} has no last.pth.tar: the run stopped before its first epoch ended; start "
                    "it again (without --resume)"
                )
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
            configured = load_dense_config(args.config or [])["backbone"]
            overrides = list(QUICK if args.quick else []) + _backbone_overrides(
                args.backbone, args.pretrained, configured
            )
            overrides += list(args.set or [])
            cfg = load_dense_config(args.config or [], overrides)
            # the model a backbone.model_config names is the one the folder and config.yaml name;
            # a wrong name fails before any data is generated or folder made
            cfg["backbone"]["name"] = _configured_model(cfg["backbone"])
            check_model_name(cfg["backbone"]["name"])
            t = cfg["train"]
            run_dir = new_run_folder(t["output"], t["experiment"], f"{task}-{cfg['backbone']['name']}")
            new_folder = None if run_dir.exists() else run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
            configs.dump_config(cfg, run_dir / "config.yaml")
        setup_logging(run_dir / "train.log")
        try:
            final = train_and_evaluate(cfg, task, run_dir, resume_ckpt)
        except (*user_errors(), KeyboardInterrupt) as e:
            (run_dir / "tmp.pth.tar").unlink(missing_ok=True)  # a checkpoint cut off while being written
            saved = (run_dir / "last.pth.tar").exists()
            if new_folder is not None and not saved:
                close_log_file()  # a run that saved nothing leaves no folder behind
                shutil.rmtree(new_folder, ignore_errors=True)
            if not isinstance(e, KeyboardInterrupt):
                raise
            kept = (
                f"its last finished epoch is kept: python scripts/dense.py --resume {run_dir}"
                if saved
                else "no epoch had finished, nothing was kept"
            )
            print(f"interrupted; {kept}", file=sys.stderr)
            return EXIT_INTERRUPTED["SIGINT"]
        shown = ", ".join(
            f"{k} {final[k]:.2f}" for k in ("box_AP", "box_AP50", "mask_AP", "mIoU") if k in final
        )
        _logger.info(f"done: {shown}; run folder {run_dir}")
        return 0
    except user_errors() as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return EXIT_ERROR
