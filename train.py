#!/usr/bin/env python3
"""Train an image classifier: NAT/DiNAT (`nat_*`, `dinat_*`) or any timm model, timm-style.

    python train.py -c configs/quickstart.yaml                      # CPU, synthetic data, ~1 min
    python train.py -c configs/nat_tiny.yaml -c configs/imagenet100.yaml --data-dir /data/imagenet
    python train.py -c configs/nat_mini.yaml --set optim.lr=5e-4 train.batch_size=64
    python train.py --resume runs/<run>/last.pth.tar                # continue a stopped run exactly

Configs are YAML (see configs/__init__.py for every key); `--set key=value` (or bare `key=value`)
overrides any key, the timm-like flags below are shortcuts for the common ones. Every run folder
gets config.yaml (fully resolved), classes.json, summary.csv, train.log, TensorBoard events (tb/),
last.pth.tar, model_best.pth.tar and the best-k checkpoint-<epoch>.pth.tar.

Distributed (DDP; NCCL on GPU, gloo on CPU) goes through torchrun; `train.batch_size` is per process:

    torchrun --standalone --nproc_per_node 8 train.py -c configs/nat_tiny.yaml
    # multi-node: run on every node (same --rdzv-endpoint, --nnodes, a shared --rdzv-id)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --rdzv-id nat1 train.py -c configs/nat_base.yaml

SIGINT/SIGTERM (Ctrl-C, a scheduler's pre-emption) finish the current optimizer update, save
`last.pth.tar` with the exact data position and RNG states, and exit; `--resume` continues it. On CPU
with `train.deterministic=true` the resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import os
import random
import signal
import sys
import time
from collections import OrderedDict
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import configs
from configs import ConfigError

_logger = logging.getLogger("train")

CHECKPOINT_FORMAT = "nat-classification/1"
EXIT_ERROR = 2
EXIT_INTERRUPTED = {"SIGINT": 130, "SIGTERM": 143}


class CheckpointError(ValueError):
    """A checkpoint can't be read or doesn't fit the model; the message says what to do."""


class TrainingError(RuntimeError):
    """Training can't go on (e.g. non-finite loss); the last good checkpoint is kept."""


def user_errors() -> tuple:
    """Exception types that are the user's input, reported as one line without a traceback."""
    errors = [ConfigError, CheckpointError, TrainingError, FileNotFoundError, NotADirectoryError]
    try:
        from data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


# --------------------------------------------------------------------------------------------------
# command line


SHORTCUTS = [  # (flags, config key, argparse kwargs): timm train.py-style flags
    (("--model",), "model.name", {}),
    (("--checkpoint", "--initial-checkpoint"), "model.checkpoint", {"help": "fine-tune from weights"}),
    (("--num-classes",), "model.num_classes", {"type": int}),
    (("--drop-path",), "model.drop_path_rate", {"type": float}),
    (("--data-dir",), "data.root", {}),
    (("--dataset",), "data.dataset", {}),
    (("--img-size",), "data.img_size", {"type": int}),
    (("-j", "--workers"), "data.workers", {"type": int}),
    (("-b", "--batch-size"), "train.batch_size", {"type": int}),
    (("--epochs",), "sched.epochs", {"type": int}),
    (("--lr",), "optim.lr", {"type": float}),
    (("--opt",), "optim.opt", {}),
    (("--weight-decay",), "optim.weight_decay", {"type": float}),
    (("--clip-grad",), "optim.clip_grad", {"type": float}),
    (("--layer-decay",), "optim.layer_decay", {"type": float}),
    (("--grad-accum-steps",), "optim.grad_accum_steps", {"type": int}),
    (("--device",), "train.device", {}),
    (("--seed",), "train.seed", {"type": int}),
    (("--output",), "train.output", {}),
    (("--experiment",), "train.experiment", {}),
    (("--amp-dtype",), "train.amp_dtype", {}),
]
SWITCHES = [  # boolean flags
    ("--amp", "train.amp", True),
    ("--no-amp", "train.amp", False),
    ("--channels-last", "train.channels_last", True),
    ("--compile", "train.compile", True),
    ("--deterministic", "train.deterministic", True),
    ("--model-ema", "ema.enabled", True),
    ("--pretrained", "model.pretrained", True),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train NAT/DiNAT or any timm model from a YAML config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python train.py -c configs/quickstart.yaml\n"
        "  python train.py -c configs/nat_tiny.yaml -c configs/imagenet100.yaml --data-dir DIR\n"
        "  python train.py --resume runs/RUN/last.pth.tar",
    )
    p.add_argument("-c", "--config", action="append", default=[], help="YAML config (repeat to compose)")
    p.add_argument("--set", dest="set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=5e-4")
    p.add_argument("--resume", default=None, help="checkpoint (or run folder) to continue exactly")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for flags, key, kw in SHORTCUTS:
        p.add_argument(
            *flags,
            dest="sc_" + key,
            default=None,
            metavar=key.rsplit(".", 1)[-1].upper(),
            help=kw.pop("help", f"= --set {key}=..."),
            **kw,
        )
    for flag, key, value in SWITCHES:
        p.add_argument(
            flag, dest="sw_" + flag, action="store_const", const=value, help=f"= --set {key}={value}"
        )
    return p


def overrides_from_args(args) -> list[str]:
    out = []
    for _, key, _ in SHORTCUTS:
        v = getattr(args, "sc_" + key)
        if v is not None:
            out.append(f"{key}={v}")
    for flag, key, _ in SWITCHES:
        v = getattr(args, "sw_" + flag)
        if v is not None:
            out.append(f"{key}={str(v).lower()}")
    return out + list(args.set) + list(args.overrides)


# --------------------------------------------------------------------------------------------------
# checkpoints


def torch_load(path: str | Path) -> dict:
    """torch.load(weights_only=True) with a one-line error for every way a file can be wrong."""
    path = Path(path)
    if path.is_dir():
        for name in ("last.pth.tar", "model_best.pth.tar"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(
                f"no last.pth.tar or model_best.pth.tar in folder '{path}'; give a checkpoint file"
            )
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors have many types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint '{path}' ({msg[:200]}); it must be a PyTorch .pth/.pth.tar file "
            "loadable with torch.load(weights_only=True)"
        ) from None


def extract_state_dict(ckpt, path, use_ema: bool = False) -> dict:
    """The model weights inside ours / timm's / official NAT's / a raw state_dict."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"'{path}' holds a {type(ckpt).__name__}, not a model state_dict")
    if use_ema:
        for key in ("state_dict_ema", "model_ema"):
            if isinstance(ckpt.get(key), dict):
                return strip_prefix(ckpt[key])
        raise CheckpointError(f"'{path}' has no EMA weights (state_dict_ema); drop the EMA option")
    for key in ("state_dict", "model", "model_state", "module"):
        if isinstance(ckpt.get(key), dict):
            return strip_prefix(ckpt[key])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return strip_prefix(ckpt)
    raise CheckpointError(f"'{path}' has no model weights (no state_dict/model entry of tensors)")


def strip_prefix(sd: dict) -> dict:
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def classifier_names(model) -> list[str]:
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    return [cls] if isinstance(cls, str) else list(cls)


def checkpoint_num_classes(model, sd: dict) -> int | None:
    for name in classifier_names(model):
        w = sd.get(f"{name}.weight")
        if w is not None and w.ndim >= 1:
            return int(w.shape[0])
    return None


def load_model_weights(model, sd: dict, path, model_name: str, resize_head: bool) -> list[str]:
    """Load `sd` into `model`; the classifier may be re-initialised (fine-tuning to a subset).

    Official NAT/DiNAT files and timm files go through the model family's `checkpoint_filter_fn`
    (as timm's pretrained loading does). Anything else that does not fit is an error.
    """
    model_sd = model.state_dict()
    heads = tuple(n + "." for n in classifier_names(model))
    head_change = [
        f"{k} {list(v.shape)} vs model {list(model_sd[k].shape)}"
        for k, v in sd.items()
        if k.startswith(heads)
        and k in model_sd
        and v.shape != model_sd[k].shape
        and v.shape[1:] == model_sd[k].shape[1:]  # only the number of classes differs
    ]
    if head_change and not resize_head:
        raise CheckpointError(
            f"checkpoint '{path}' does not match model '{model_name}': classifier {head_change[0]}; "
            "create the model with the checkpoint's number of classes"
        )
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(dict(sd), model)
        except Exception as e:  # the family's filter knows its format best: pass its reason on
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint '{path}' does not match model '{model_name}': {msg}") from None
    dropped, mismatched = [], []
    for k in list(sd):
        if k in model_sd and sd[k].shape != model_sd[k].shape:
            if resize_head and k.startswith(heads):
                dropped.append(k)
                del sd[k]
            else:
                mismatched.append(f"{k} {list(sd[k].shape)} vs model {list(model_sd[k].shape)}")
    if head_change:
        dropped += [k for k in model_sd if k.startswith(heads) and k not in dropped]
        for k in dropped:
            sd[k] = model_sd[k]  # keep the fresh initialisation
    missing = [k for k in model_sd if k not in sd and k not in dropped]
    unexpected = [k for k in sd if k not in model_sd]
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"checkpoint '{path}' does not match model '{model_name}': {'; '.join(parts)}. "
            "Pick the model (and model.kwargs) the checkpoint was trained with"
        )
    model.load_state_dict(sd, strict=False)
    return dropped


def rng_state() -> dict:
    """Every RNG the training loop consumes, as tensors / plain types (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": [int(x) for x in random.getstate()[1]],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    py = state["python"]
    random.setstate((3, tuple(py), None))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_saver_class():
    from timm.utils import CheckpointSaver

    class RunCheckpointSaver(CheckpointSaver):
        """timm's CheckpointSaver (last + best-k + model_best, atomic replace) plus the extra state
        that an exact resume needs (scheduler, step, data position, RNG, config)."""

        def __init__(self, *a, extra_state=None, **kw):
            super().__init__(*a, **kw)
            self.extra_state = extra_state

        def _save(self, save_path, epoch, metric=None):
            from timm.utils.model import get_state_dict

            state = {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch,
                "optimizer": self.optimizer.state_dict(),
                "version": 2,
                "state_dict": get_state_dict(self.model, self.unwrap_fn),
            }
            if self.model_ema is not None:
                state["state_dict_ema"] = get_state_dict(self.model_ema, self.unwrap_fn)
            if self.amp_scaler is not None:
                state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
            if metric is not None:
                state["metric"] = metric
            state["saver"] = self.state_dict(epoch if metric is not None else None, metric)
            if self.extra_state is not None:
                state.update(self.extra_state())
            with open(save_path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        def save_last(self):
            """Mid-epoch save (interrupt): replaces last.pth.tar atomically, no history entry."""
            tmp = os.path.join(self.checkpoint_dir, "tmp" + self.extension)
            last = os.path.join(self.checkpoint_dir, "last" + self.extension)
            self._save(tmp, -1)
            self._replace(tmp, last)
            return last

    return RunCheckpointSaver


# --------------------------------------------------------------------------------------------------
# data


class ResumableSampler(torch.utils.data.Sampler):
    """Shuffled, sharded over ranks, restartable mid-epoch: the order depends only on (seed, epoch).

    timm's loaders use RandomSampler/DistributedSampler, whose order can't be resumed part-way
    through an epoch; this is DistributedSampler's scheme plus a start offset.
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.size, self.num_replicas, self.rank, self.seed = size, num_replicas, rank, seed
        self.num_samples = math.ceil(size / num_replicas)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        total = self.num_samples * self.num_replicas
        order += order[: total - len(order)]
        return iter(order[self.rank : total : self.num_replicas][self.start :])

    def __len__(self):
        return self.num_samples - self.start


@contextlib.contextmanager
def isolated_rng(seed: int):
    """Seed python/numpy/torch for one sample, then put the caller's RNG states back."""
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(pt)


class SampleSeededDataset(torch.utils.data.Dataset):
    """Augmentation randomness as a function of (seed, epoch, index), not of worker/process history,
    so a resumed epoch sees exactly the crops/RandAugment ops it would have seen."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        digest = hashlib.blake2b(f"{self.seed}/{self.epoch}/{index}".encode(), digest_size=4).digest()
        with isolated_rng(int.from_bytes(digest, "little")):
            return self.dataset[index]


# --------------------------------------------------------------------------------------------------
# model


def import_model_registry():
    """`import models` registers nat_*/dinat_* with timm; say why if it can't."""
    try:
        import models  # noqa: F401

        return None
    except Exception as e:  # the NAT package may be missing a piece; timm models still work
        return f"{type(e).__name__}: {e}"


def check_model_name(name: str):
    import timm

    registry_problem = import_model_registry()
    if not timm.is_model(name):
        hint = ""
        if registry_problem and name.startswith(("nat", "dinat")):
            hint = f" (the NAT models did not register: {registry_problem})"
        import difflib

        near = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.0)
        raise ConfigError(
            f"unknown model '{name}'{hint}; did you mean '{near[0] if near else '?'}'? "
            "(python -c 'import timm, models; print(timm.list_models())' lists them)"
        )


def create_model(name: str, num_classes: int | None, cfg_model: dict, pretrained: bool = False):
    import timm

    check_model_name(name)
    kwargs = dict(cfg_model.get("kwargs") or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    for key in ("drop_rate", "drop_path_rate"):
        if cfg_model.get(key) is not None:
            kwargs[key] = cfg_model[key]
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model '{name}' rejected its arguments ({msg}); fix model.kwargs "
            "(or set model.drop_path_rate=null for a model without drop-path)"
        ) from None


def unwrap(model):
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


# --------------------------------------------------------------------------------------------------
# training


class Run:
    """One training run: everything set up from the resolved config, then `fit()`."""

    def __init__(self, cfg: dict, resume: str | None = None, resume_ckpt: dict | None = None):
        from timm.utils import random_seed
        from timm.utils.distributed import init_distributed_device_so

        self.cfg = cfg
        t = cfg["train"]
        check_model_name(cfg["model"]["name"])  # before any folder or data is made
        if (
            cfg["model"]["checkpoint"]
            and resume_ckpt is None
            and not Path(cfg["model"]["checkpoint"]).is_file()
        ):
            raise CheckpointError(
                f"model.checkpoint '{cfg['model']['checkpoint']}' not found; check the path"
            )
        device = t["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but no GPU is available; use train.device=cpu")
        dist_info = init_distributed_device_so(device=device)
        self.device = torch.device(dist_info["device"])
        self.distributed = dist_info["distributed"]
        self.world_size = dist_info["world_size"]
        self.rank = dist_info["global_rank"]
        self.primary = self.rank == 0
        if t["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        random_seed(t["seed"], self.rank)

        # run folder
        if resume:
            self.run_dir = Path(resume).parent if Path(resume).is_file() else Path(resume)
        else:
            name = t["experiment"] or "-".join(
                [datetime.now().strftime("%Y%m%d-%H%M%S"), cfg["model"]["name"].replace("/", "_")]
            )
            self.run_dir = Path(t["output"]) / name
        if not resume and (self.run_dir / "last.pth.tar").exists():
            raise ConfigError(
                f"run folder '{self.run_dir}' already holds a training run; continue it with "
                f"--resume {self.run_dir} or pick another --experiment/train.output"
            )
        if self.primary:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            configs.dump_config(cfg, self.run_dir / "config.yaml")
            setup_logging(self.run_dir / "train.log")
        else:
            setup_logging(None, level=logging.WARNING)

        # data
        from data import build_datasets

        bundle = build_datasets(data_build_config(cfg), run_dir=self.run_dir if self.primary else None)
        self.classes = list(bundle.classes)
        num_classes = cfg["model"]["num_classes"] or len(self.classes)
        if num_classes < len(self.classes):
            raise ConfigError(
                f"model.num_classes={num_classes} is smaller than the {len(self.classes)} dataset classes; "
                "leave it null to match the dataset"
            )

        # model
        m = cfg["model"]
        self.model = create_model(m["name"], num_classes, m, pretrained=m["pretrained"])
        self.num_classes = num_classes
        if m["checkpoint"] and resume_ckpt is None:
            ck = torch_load(m["checkpoint"])
            sd = extract_state_dict(ck, m["checkpoint"], m["checkpoint_use_ema"])
            dropped = load_model_weights(self.model, sd, m["checkpoint"], m["name"], resize_head=True)
            _logger.info(
                f"fine-tuning from {m['checkpoint']}"
                + (f" (classifier re-initialised for {num_classes} classes)" if dropped else "")
            )
        self.model_kwargs = dict(m["kwargs"] or {})
        self.param_count = sum(p.numel() for p in self.model.parameters())

        from timm.data import resolve_data_config

        d = cfg["data"]
        self.data_config = resolve_data_config(
            {
                "img_size": d["img_size"],
                "crop_pct": d["crop_pct"],
                "interpolation": d["interpolation"] or None,
                "mean": d["mean"],
                "std": d["std"],
            },
            model=self.model,
        )
        self.model.to(self.device)
        if t["channels_last"]:
            self.model.to(memory_format=torch.channels_last)

        # optimizer (lr scaled to the global batch, timm's lr_base rule)
        from timm.optim import create_optimizer_v2

        o = cfg["optim"]
        self.accum = o["grad_accum_steps"]
        global_batch = t["batch_size"] * self.world_size * self.accum
        self.lr = o["lr"] if o["lr"] is not None else o["lr_base"] * global_batch / o["lr_base_size"]
        opt_kwargs = {}
        if o["opt_eps"] is not None:
            opt_kwargs["eps"] = o["opt_eps"]
        if o["opt_betas"] is not None:
            opt_kwargs["betas"] = tuple(o["opt_betas"])
        if o["fused"] is not None:
            opt_kwargs["fused"] = o["fused"]
        try:
            self.optimizer = create_optimizer_v2(
                self.model,
                opt=o["opt"],
                lr=self.lr,
                weight_decay=o["weight_decay"],
                momentum=o["momentum"],
                layer_decay=o["layer_decay"],
                **opt_kwargs,
            )
        except (ValueError, AssertionError, RuntimeError, TypeError) as e:
            raise ConfigError(f"optimizer: {e} (check optim.opt / optim.layer_decay / optim.fused)") from None

        # AMP: bf16 needs no scaler; fp16 uses timm's NativeScaler (GradScaler)
        self.amp_dtype = torch.bfloat16 if t["amp_dtype"] == "bfloat16" else torch.float16
        self.use_amp = bool(t["amp"]) and self.device.type == "cuda"
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=self.amp_dtype)) if self.use_amp else contextlib.nullcontext
        )
        self.loss_scaler = None
        if self.use_amp and self.amp_dtype == torch.float16:
            from timm.utils import NativeScaler

            self.loss_scaler = NativeScaler(device="cuda")

        # state that resume restores
        self.start_epoch, self.start_batch, self.num_updates = 0, 0, 0
        self.partial = {"loss_sum": 0.0, "count": 0}
        if resume_ckpt is not None:
            self._restore(resume_ckpt, resume)

        from timm.utils import ModelEmaV3

        self.ema = None
        if cfg["ema"]["enabled"]:
            e = cfg["ema"]
            self.ema = ModelEmaV3(
                self.model, decay=e["decay"], use_warmup=e["warmup"], device="cpu" if e["force_cpu"] else None
            )
            if resume_ckpt is not None and "state_dict_ema" in resume_ckpt:
                self.ema.module.load_state_dict(resume_ckpt["state_dict_ema"])

        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)
        if t["compile"]:
            mode = t["compile"] if isinstance(t["compile"], str) else None
            self.model = torch.compile(self.model, mode=mode)

        self._build_loaders(bundle)
        self._build_loss_mixup()

        from timm.scheduler import create_scheduler_v2

        s = cfg["sched"]
        self.updates_per_epoch = (self.batches_per_epoch + self.accum - 1) // self.accum
        self.lr_scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer,
            sched=s["sched"],
            num_epochs=s["epochs"],
            decay_milestones=s["decay_milestones"],
            decay_rate=s["decay_rate"],
            cooldown_epochs=s["cooldown_epochs"],
            warmup_epochs=s["warmup_epochs"],
            warmup_lr=s["warmup_lr"],
            min_lr=s["min_lr"],
            step_on_epochs=not s["step_on_updates"],
            updates_per_epoch=self.updates_per_epoch,
        )
        if resume_ckpt is not None and resume_ckpt.get("scheduler"):
            self.lr_scheduler.load_state_dict(resume_ckpt["scheduler"])
        if resume_ckpt is not None:
            # the scheduler's constructor reset the lr (to warmup_lr): put back the saved one, which the
            # next updates of the uninterrupted run would have used
            for group, saved in zip(
                self.optimizer.param_groups, resume_ckpt["optimizer"]["param_groups"], strict=True
            ):
                group["lr"] = saved["lr"]

        self.metric_name = t["eval_metric"]
        self.saver = None
        self.writer = None
        if self.primary:
            Saver = make_saver_class()
            self.saver = Saver(
                model=self.model,
                optimizer=self.optimizer,
                model_ema=self.ema,
                amp_scaler=self.loss_scaler,
                checkpoint_dir=str(self.run_dir),
                recovery_dir=str(self.run_dir),
                decreasing=self.metric_name == "loss",
                max_history=t["checkpoint_hist"],
                unwrap_fn=unwrap,
                extra_state=self._extra_state,
            )
            if resume_ckpt is not None and resume_ckpt.get("saver"):
                self.saver.load_state_dict(resume_ckpt["saver"])
            from timm.utils.summary import trim_summary

            # a run stopped after logging an epoch but before its checkpoint repeats that epoch
            trim_summary(str(self.run_dir / "summary.csv"), self.start_epoch)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(self.run_dir / "tb"), purge_step=self.num_updates if resume_ckpt is not None else None
            )
            self.writer.add_text("config", "```yaml\n" + configs.dump_config(cfg) + "```", self.num_updates)
        self.stop_signal = None
        self.stop_requested = False
        if resume_ckpt is not None and resume_ckpt.get("rng"):
            # last: everything above (model init, loaders) consumed RNG differently from the original run
            set_rng_state(resume_ckpt["rng"])

    # ---- set-up helpers

    def _build_loaders(self, bundle):
        from timm.data import create_loader, create_transform

        d, a, t = self.cfg["data"], self.cfg["aug"], self.cfg["train"]
        dc = self.data_config
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
        self.train_set = SampleSeededDataset(bundle.train, seed=t["seed"])
        self.train_set.transform = train_tf
        bs = t["batch_size"]
        self.sampler = ResumableSampler(len(self.train_set), self.world_size, self.rank, seed=t["seed"])
        self.batches_per_epoch = self.sampler.num_samples // bs
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"train.batch_size={bs} is larger than the {self.sampler.num_samples} training images per "
                "process; lower train.batch_size"
            )
        from timm.data.loader import _worker_init

        self.loader_train = torch.utils.data.DataLoader(
            self.train_set,
            batch_size=bs,
            sampler=self.sampler,
            num_workers=d["workers"],
            drop_last=True,
            pin_memory=d["pin_memory"] and self.device.type == "cuda",
            worker_init_fn=_worker_init,
            generator=torch.Generator(),
            persistent_workers=False,
        )
        self.loader_eval = create_loader(
            bundle.val,
            input_size=dc["input_size"],
            batch_size=d["val_batch_size"] or 2 * bs,
            is_training=False,
            interpolation=dc["interpolation"],
            mean=dc["mean"],
            std=dc["std"],
            num_workers=d["workers"],
            distributed=self.distributed,
            crop_pct=dc["crop_pct"],
            pin_memory=d["pin_memory"],
            device=self.device,
            use_prefetcher=False,
        )

    def _build_loss_mixup(self):
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        a = self.cfg["aug"]
        self.mixup_fn = None
        if a["mixup"] > 0 or a["cutmix"] > 0 or a["cutmix_minmax"] is not None:
            if self.cfg["train"]["batch_size"] % 2:
                raise ConfigError(
                    "mixup/cutmix need an even train.batch_size (or set aug.mixup=0 aug.cutmix=0)"
                )
            self.mixup_fn = Mixup(
                mixup_alpha=a["mixup"],
                cutmix_alpha=a["cutmix"],
                cutmix_minmax=a["cutmix_minmax"],
                prob=a["mixup_prob"],
                switch_prob=a["mixup_switch_prob"],
                mode=a["mixup_mode"],
                label_smoothing=a["smoothing"],
                num_classes=self.num_classes,
            )
            self.train_loss_fn = SoftTargetCrossEntropy()
        elif a["smoothing"]:
            self.train_loss_fn = LabelSmoothingCrossEntropy(smoothing=a["smoothing"])
        else:
            self.train_loss_fn = nn.CrossEntropyLoss()
        self.train_loss_fn.to(self.device)
        self.eval_loss_fn = nn.CrossEntropyLoss().to(self.device)

    def _extra_state(self) -> dict:
        return {
            "arch": self.cfg["model"]["name"],
            "model_kwargs": self.model_kwargs,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "config": configs.merge(self.cfg, {"train": {"stop_after_updates": None}}),
            "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.data_config.items()},
            "scheduler": self.lr_scheduler.state_dict(),
            "num_updates": self.num_updates,
            "next_epoch": self._pos[0],
            "next_batch": self._pos[1],
            "partial_epoch": dict(self.partial),
            "rng": rng_state(),
        }

    def _restore(self, ck: dict, path):
        if ck.get("arch") != self.cfg["model"]["name"]:
            raise CheckpointError(
                f"--resume checkpoint '{path}' is for model '{ck.get('arch')}', config says "
                f"'{self.cfg['model']['name']}'; resume without -c to use the checkpoint's own config"
            )
        load_model_weights(self.model, ck["state_dict"], path, self.cfg["model"]["name"], resize_head=False)
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.loss_scaler is not None and "amp_scaler" in ck:
            self.loss_scaler.load_state_dict(ck["amp_scaler"])
        self.start_epoch, self.start_batch = ck["next_epoch"], ck["next_batch"]
        self.num_updates = ck["num_updates"]
        self.partial = dict(ck.get("partial_epoch") or self.partial)
        _logger.info(
            f"resumed from {path}: epoch {self.start_epoch}, batch {self.start_batch}, "
            f"update {self.num_updates}"
        )

    # ---- loop

    def _sync_flags(self, nonfinite: bool, stop: bool) -> tuple[bool, bool]:
        """All ranks must agree to stop (signal, NaN) or DDP would hang in the next all-reduce."""
        if not self.distributed:
            return nonfinite, stop
        flags = torch.tensor([float(nonfinite), float(stop)], device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def _install_signal_handlers(self):
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_signal is not None and name == "SIGINT":  # second Ctrl-C: leave now
                raise KeyboardInterrupt
            self.stop_signal = name
            if self.primary:
                print(f"\n{name} received: saving a checkpoint after this update...", file=sys.stderr)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    def fit(self) -> int:
        t = self.cfg["train"]
        self._install_signal_handlers()
        self._pos = (self.start_epoch, self.start_batch)
        show_progress = {"on": True, "off": False}.get(t["progress"], sys.stderr.isatty()) and self.primary
        best = None
        for epoch in range(self.start_epoch, self.num_epochs):
            start_batch = self.start_batch if epoch == self.start_epoch else 0
            if self.mixup_fn is not None and self.cfg["aug"]["mixup_off_epoch"]:
                self.mixup_fn.mixup_enabled = epoch < self.cfg["aug"]["mixup_off_epoch"]
            train_metrics = self.train_one_epoch(epoch, start_batch, show_progress)
            if train_metrics is None:  # stopped by a signal / stop_after_updates
                return self._save_interrupted()
            last_epoch = epoch + 1 == self.num_epochs
            eval_metrics = None
            if (epoch + 1) % self.cfg["train"]["eval_interval"] == 0 or last_epoch:
                eval_metrics = self.validate(self.model)
                if self.ema is not None:
                    ema_metrics = self.validate(self.ema.module)
                    eval_metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
            lr = self.optimizer.param_groups[0]["lr"]
            self.lr_scheduler.step(epoch + 1, eval_metrics[self.metric_name] if eval_metrics else None)
            self._pos = (epoch + 1, 0)
            self.partial = {"loss_sum": 0.0, "count": 0}
            if self.primary:
                self._log_epoch(epoch, train_metrics, eval_metrics, lr)
                metric = None
                if eval_metrics is not None:
                    key = f"ema_{self.metric_name}" if self.ema is not None else self.metric_name
                    metric = eval_metrics[key]
                best = self.saver.save_checkpoint(epoch, metric=metric)
            if self.stop_requested and epoch + 1 < self.num_epochs:
                return self._save_interrupted(saved=True)
        if self.primary:
            self.writer.close()
            if best and best[0] is not None:
                _logger.info(
                    f"done: best {self.metric_name} {best[0]:.3f} at epoch {best[1]}; "
                    f"checkpoints and logs in {self.run_dir} (tensorboard --logdir {self.run_dir / 'tb'})"
                )
        if self.distributed:
            # Ranks leave together: a rank that tore its gloo group down while rank 0 was still
            # writing the last checkpoint aborted at exit ("terminate called without an active
            # exception") in about 1 of 3 two-process runs.
            torch.distributed.barrier()
        return 0

    def _save_interrupted(self, saved: bool = False) -> int:
        reason = self.stop_signal or "train.stop_after_updates"
        if self.primary:
            path = Path(self.saver.checkpoint_dir) / "last.pth.tar"
            if not saved:
                path = self.saver.save_last()
            self.writer.close()
            _logger.info(
                f"stopped by {reason} at epoch {self._pos[0]} batch {self._pos[1]} "
                f"(update {self.num_updates}); "
                f"saved {path}. Continue with: python train.py --resume {path}"
            )
        return EXIT_INTERRUPTED.get(self.stop_signal, 0)

    def train_one_epoch(self, epoch: int, start_batch: int, show_progress: bool):
        from timm.utils import dispatch_clip_grad

        t, o = self.cfg["train"], self.cfg["optim"]
        self.model.train()
        self.sampler.set_epoch(epoch, start_batch * t["batch_size"])
        self.train_set.epoch = epoch
        self.loader_train.generator.manual_seed(t["seed"] * 1000 + epoch)  # worker seeds: not global RNG
        n_batches = self.batches_per_epoch
        last_accum = n_batches % self.accum or self.accum
        last_accum_start = n_batches - last_accum
        progress = None
        if show_progress:
            from tqdm import tqdm

            progress = tqdm(
                total=n_batches,
                initial=start_batch,
                desc=f"epoch {epoch + 1}/{self.num_epochs}",
                dynamic_ncols=True,
                leave=False,
                file=sys.stderr,
            )
        params = unwrap(self.model).parameters()
        params = list(params)
        t_start = time.perf_counter()
        images_seen, window_images, window_start = 0, 0, time.perf_counter()
        stop_after = t["stop_after_updates"]
        for batch_idx, (images, target) in enumerate(self.loader_train, start=start_batch):
            images = images.to(self.device, non_blocking=True)
            target = target.to(self.device, non_blocking=True)
            if self.mixup_fn is not None:
                images, target = self.mixup_fn(images, target)
            if t["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            need_update = (batch_idx + 1) % self.accum == 0 or batch_idx + 1 == n_batches
            accum_steps = last_accum if batch_idx >= last_accum_start else self.accum
            sync = contextlib.nullcontext()
            if self.distributed and not need_update:
                sync = self.model.no_sync()
            with sync:
                with self.autocast():
                    output = self.model(images)
                    loss = self.train_loss_fn(output, target)
                loss_value = loss.detach().float()
                nonfinite = not bool(torch.isfinite(loss_value))
                if self.distributed:
                    nonfinite, _ = self._sync_flags(nonfinite, False)
                if nonfinite:
                    if progress is not None:
                        progress.close()
                    raise TrainingError(self._nan_message(epoch, batch_idx, loss_value.item()))
                loss = loss / accum_steps
                if self.loss_scaler is not None:
                    self.loss_scaler(
                        loss,
                        self.optimizer,
                        clip_grad=o["clip_grad"],
                        clip_mode=o["clip_mode"],
                        parameters=params,
                        need_update=need_update,
                    )
                else:
                    loss.backward()
                    if need_update:
                        if o["clip_grad"] is not None:
                            dispatch_clip_grad(params, o["clip_grad"], mode=o["clip_mode"])
                        self.optimizer.step()
            self.partial["loss_sum"] += loss_value.item() * images.shape[0]
            self.partial["count"] += images.shape[0]
            images_seen += images.shape[0]
            window_images += images.shape[0]
            if not need_update:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            self.num_updates += 1
            if self.ema is not None:
                self.ema.update(unwrap(self.model), step=self.num_updates)
            self.lr_scheduler.step_update(num_updates=self.num_updates)
            self._pos = (epoch, batch_idx + 1)
            lr = self.optimizer.param_groups[0]["lr"]
            if progress is not None or (self.primary and self.num_updates % t["log_interval"] == 0):
                elapsed = time.perf_counter() - window_start
                ips = window_images * self.world_size / max(elapsed, 1e-9)
                if self.primary and self.num_updates % t["log_interval"] == 0:
                    self.writer.add_scalar("train/loss", loss_value.item(), self.num_updates)
                    self.writer.add_scalar("train/lr", lr, self.num_updates)
                    self.writer.add_scalar("train/img_per_sec", ips, self.num_updates)
                    window_images, window_start = 0, time.perf_counter()
                if progress is not None:
                    done = time.perf_counter() - t_start
                    left_updates = (self.num_epochs - epoch) * n_batches - batch_idx - 1
                    eta = done / max(batch_idx + 1 - start_batch, 1) * left_updates
                    progress.set_postfix_str(
                        f"loss {loss_value.item():.3f} lr {lr:.2e} img/s {ips:.0f} run-eta {fmt_time(eta)}"
                    )
                    progress.update(batch_idx + 1 - progress.n)
            stop = self.stop_signal is not None or (stop_after is not None and self.num_updates >= stop_after)
            _, stop = self._sync_flags(False, stop)
            if stop:
                self.stop_requested = True
                if batch_idx + 1 < n_batches:
                    if progress is not None:
                        progress.close()
                    return None
                # at the end of an epoch: finish it (eval + epoch checkpoint), then stop
        if progress is not None:
            progress.close()
        elapsed = time.perf_counter() - t_start
        loss_avg = self.partial["loss_sum"] / max(self.partial["count"], 1)
        if self.distributed:
            loss_avg = reduce_mean(loss_avg, self.device, self.world_size)
        return OrderedDict(
            loss=loss_avg, img_per_sec=images_seen * self.world_size / max(elapsed, 1e-9), epoch_time=elapsed
        )

    def _nan_message(self, epoch, batch_idx, value) -> str:
        last = self.run_dir / "last.pth.tar"
        kept = f"last good checkpoint kept: {last}" if last.exists() else "no checkpoint was written yet"
        return (
            f"loss is {value} at epoch {epoch} batch {batch_idx} (update {self.num_updates}); "
            "training stopped, "
            f"{kept}. Lower optim.lr, set optim.clip_grad (e.g. 1.0) or use train.amp_dtype=bfloat16"
        )

    @torch.no_grad()
    def validate(self, model) -> OrderedDict:
        from timm.utils import accuracy

        model.eval()
        loss_sum, top1_sum, top5_sum, n = 0.0, 0.0, 0.0, 0
        k = min(5, self.num_classes)
        for images, target in self.loader_eval:
            images = images.to(self.device, non_blocking=True)
            target = target.to(self.device, non_blocking=True)
            if self.cfg["train"]["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                output = model(images)
            output = output.float()
            loss = self.eval_loss_fn(output, target)
            acc1, acc5 = accuracy(output, target, topk=(1, k))
            b = images.shape[0]
            loss_sum += loss.item() * b
            top1_sum += acc1.item() * b
            top5_sum += acc5.item() * b
            n += b
        totals = torch.tensor([loss_sum, top1_sum, top5_sum, n], dtype=torch.float64, device=self.device)
        if self.distributed:
            torch.distributed.all_reduce(totals)
        loss_sum, top1_sum, top5_sum, n = totals.tolist()
        n = max(n, 1)
        model.train()
        return OrderedDict(loss=loss_sum / n, top1=top1_sum / n, top5=top5_sum / n)

    def _log_epoch(self, epoch, train_metrics, eval_metrics, lr):
        from timm.utils import update_summary

        w, step = self.writer, self.num_updates
        w.add_scalar("train/epoch_loss", train_metrics["loss"], step)
        w.add_scalar("train/img_per_sec", train_metrics["img_per_sec"], step)
        w.add_scalar("train/lr", lr, step)
        peak_mb = peak_memory_mb(self.device)
        w.add_scalar("train/peak_mem_mb", peak_mb, step)
        line = (
            f"epoch {epoch + 1}/{self.num_epochs}  train loss {train_metrics['loss']:.4f}  lr {lr:.2e}  "
            f"{train_metrics['img_per_sec']:.0f} img/s  {train_metrics['epoch_time']:.1f}s"
        )
        if eval_metrics:
            for k, v in eval_metrics.items():
                w.add_scalar(f"val/{k}", v, step)
            line += (
                f"  | val loss {eval_metrics['loss']:.4f} top1 {eval_metrics['top1']:.2f} "
                f"top5 {eval_metrics['top5']:.2f}"
            )
            if "ema_top1" in eval_metrics:
                line += f" (ema top1 {eval_metrics['ema_top1']:.2f})"
        w.flush()
        _logger.info(line)
        update_summary(
            epoch,
            {**train_metrics, "peak_mem_mb": peak_mb},
            eval_metrics or {},
            str(self.run_dir / "summary.csv"),
            lr=lr,
        )


def reduce_mean(value: float, device, world_size: int) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item() / world_size


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def setup_logging(log_file=None, level=logging.INFO):
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(stream)
    if log_file is not None:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(fh)
    logging.getLogger("timm").setLevel(logging.WARNING)


def data_build_config(cfg: dict) -> dict:
    """The subset of `data` that data.build_datasets takes (the rest is loader/transform settings)."""
    from data.builder import DEFAULTS as BUILD_KEYS

    return {k: cfg["data"][k] for k in BUILD_KEYS}


def resolve_run_config(args) -> tuple[dict, str | None, dict | None]:
    overrides = overrides_from_args(args)
    resume_ckpt, resume_path = None, None
    if args.resume:
        path = Path(args.resume)
        if path.is_dir():
            path = path / "last.pth.tar"
        resume_ckpt = torch_load(path)
        if not isinstance(resume_ckpt, dict) or resume_ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"'{path}' is not a training checkpoint of this repo (no resume state); "
                "to fine-tune from its "
                "weights use --checkpoint instead of --resume"
            )
        resume_path = str(path)
    if args.config:
        cfg = configs.load_config(args.config, overrides)
    elif resume_ckpt is not None:
        cfg = configs.load_config([], overrides, base=resume_ckpt["config"])
    else:
        raise ConfigError("no config given; pass -c configs/<name>.yaml (e.g. -c configs/quickstart.yaml)")
    return cfg, resume_path, resume_ckpt


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    errors = user_errors()
    try:
        cfg, resume_path, resume_ckpt = resolve_run_config(args)
        if args.print_config:
            print(configs.dump_config(cfg), end="")
            return 0
        return Run(cfg, resume_path, resume_ckpt).fit()
    except errors as e:
        rank = int(os.environ.get("RANK", 0))
        if rank == 0:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted before a checkpoint could be saved", file=sys.stderr)
        return EXIT_INTERRUPTED["SIGINT"]
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
