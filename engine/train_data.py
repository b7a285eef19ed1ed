"""What a classification run feeds its model and how it scores it, built from the resolved config:
the train loader (timm's training transform, the resumable sampler, per-sample seeded augmentation),
timm's eval loader over this rank's share of the val set, mixup/cutmix and the losses.

Owns the mapping from the `data`, `aug` and `train` config sections to loaders and losses;
engine/sampling.py owns the order and the RNG that make them resumable, engine/trainer.py when
they are built (the order consumes RNG).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from configs import ConfigError
from engine.sampling import EvalShard, ResumableSampler, SampleSeededDataset, loader_worker_init


@dataclass
class Loaders:
    train_set: SampleSeededDataset
    sampler: ResumableSampler
    train: torch.utils.data.DataLoader
    eval: torch.utils.data.DataLoader
    batches_per_epoch: int


def build_loaders(cfg: dict, bundle, data_config: dict, world_size: int, rank: int, device) -> Loaders:
    """Train loader (resumable sampler, per-sample seeded augmentation) and timm's eval loader."""
    from timm.data import create_loader, create_transform

    from data.folder import UNREADABLE

    d, a, t = cfg["data"], cfg["aug"], cfg["train"]
    dc = data_config
    train_tf = create_transform(
        dc["input_size"],
        is_training=True,
        no_aug=a["no_aug"],
        scale=tuple(a["scale"]),
        ratio=tuple(a["ratio"]),
        hflip=a["hflip"],
        vflip=a["vflip"],
        color_jitter=a["color_jitter"],
        auto_augment=a["auto_augment"] or None,
        interpolation=a["train_interpolation"],
        mean=dc["mean"],
        std=dc["std"],
        re_prob=a["reprob"],
        re_mode=a["remode"],
        re_count=a["recount"],
    )
    train_set = SampleSeededDataset(bundle.train, seed=t["seed"])
    train_set.transform = train_tf
    bs = t["batch_size"]
    pin_memory = d["pin_memory"] and device.type == "cuda"  # torch warns of pinning without a GPU
    sampler = ResumableSampler(len(train_set), world_size, rank, seed=t["seed"])
    batches_per_epoch = sampler.num_samples // bs
    if batches_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={bs} is larger than the {sampler.num_samples} training images per "
            "process; lower train.batch_size"
        )
    loader_train = torch.utils.data.DataLoader(
        train_set,
        batch_size=bs,
        sampler=sampler,
        num_workers=d["workers"],
        drop_last=True,
        pin_memory=pin_memory,
        worker_init_fn=loader_worker_init,
        generator=torch.Generator(),
        persistent_workers=False,
    )
    if hasattr(bundle.val, "unreadable_target"):  # scored without its neighbour's copy, as eval.py does
        bundle.val.unreadable_target = UNREADABLE
    # each rank scores its own images, none twice (timm's distributed eval sampler pads the set)
    val = EvalShard(bundle.val, world_size, rank) if world_size > 1 else bundle.val
    loader_eval = create_loader(
        val,
        input_size=dc["input_size"],
        batch_size=d["val_batch_size"] or 2 * bs,
        is_training=False,
        interpolation=dc["interpolation"],
        mean=dc["mean"],
        std=dc["std"],
        num_workers=d["workers"],
        distributed=False,
        crop_pct=dc["crop_pct"],
        crop_mode=dc.get("crop_mode"),  # as eval.py reads it from the checkpoint
        pin_memory=pin_memory,
        device=device,
        use_prefetcher=False,
    )
    loader_eval.worker_init_fn = loader_worker_init  # timm's seeding, and signals to this process
    # Its own generator: an iterator draws its workers' base seed from the loader's generator, the
    # global RNG if none. timm's eval loader keeps its workers, so the first validation drew and later
    # ones did not: a resumed run's first validation drew where the uninterrupted run had not, and
    # drop path took other masks from there on (`--resume` inexact whenever data.workers > 0).
    loader_eval.generator = torch.Generator()
    return Loaders(train_set, sampler, loader_train, loader_eval, batches_per_epoch)


def build_mixup_and_loss(cfg: dict, num_classes: int) -> tuple[Callable | None, nn.Module]:
    """Mixup/cutmix (soft-target loss), else label smoothing, else plain cross-entropy."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    a = cfg["aug"]
    if a["mixup"] > 0 or a["cutmix"] > 0 or a["cutmix_minmax"] is not None:
        if cfg["train"]["batch_size"] % 2:
            raise ConfigError("mixup/cutmix need an even train.batch_size (or set aug.mixup=0 aug.cutmix=0)")
        mixup_fn = Mixup(
            mixup_alpha=a["mixup"],
            cutmix_alpha=a["cutmix"],
            cutmix_minmax=a["cutmix_minmax"],
            prob=a["mixup_prob"],
            switch_prob=a["mixup_switch_prob"],
            mode=a["mixup_mode"],
            label_smoothing=a["smoothing"],
            num_classes=num_classes,
        )
        return mixup_fn, SoftTargetCrossEntropy()
    if a["smoothing"]:
        return None, LabelSmoothingCrossEntropy(smoothing=a["smoothing"])
    return None, nn.CrossEntropyLoss()
