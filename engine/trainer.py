"""The training loop: one `Run` built from the resolved config in small steps, then `fit()` epoch by
epoch (train one epoch, validate, log, save), stoppable and resumable at any optimizer update.

Owns the order in which things are built and RNG is consumed (model init, loaders, EMA...), which
an exact resume depends on: `Run.__init__` lists the build steps in that order; a resumed run puts
the saved RNG states back last. The lr schedule and what a resume does to it: engine/resume.py;
train.py's command (`train(...)`): engine/train_command.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

import configs
from configs import ConfigError
from engine.checkpoint import extract_state_dict, load_checkpoint, load_model_weights, make_saver_class
from engine.errors import EXIT_INTERRUPTED, CheckpointError, TrainingError
from engine.factory import (
    check_model_name,
    checkpoint_data_config,
    create_model,
    data_build_config,
    fit_fixed_input_size,
    predicted_na_backend,
    unwrap,
)
from engine.precision import cpu_precision_notes
from engine.resume import (
    build_scheduler,
    position,
    rebase_lr,
    restore_schedule,
    run_folder,
    schedule_record,
    schedule_step,
    scheduled_lr,
    scheduler_state,
)
from engine.run_log import RunLog, close_log_file, fmt_time, setup_logging
from engine.sampling import rank_rng_states, restore_rng_state, rng_state, worker_batches
from engine.train_data import build_loaders, build_mixup_and_loss

_logger = logging.getLogger("train")
STOP_SIGNALS = tuple(EXIT_INTERRUPTED)  # what stops a run with a checkpoint; _sync_flags sends its index


class Run:
    """One training run: everything set up from the resolved config, then `fit()`."""

    def __init__(self, cfg: dict, resume: str | None = None, resume_ckpt: dict | None = None):
        self.cfg = cfg
        self._check_inputs(resume_ckpt)
        self._setup_device()
        self._setup_run_dir(resume)
        try:
            self._build(resume, resume_ckpt)
        except BaseException:
            self._abandon_run_dir()
            raise
        if self.primary:  # after the build: a resume that fails keeps the run's own config.yaml
            configs.dump_config(cfg, self.run_dir / "config.yaml")

    def _build(self, resume: str | None, resume_ckpt: dict | None):
        """The build steps, in the order they consume RNG."""
        bundle = self._build_datasets()
        self._build_model(resume_ckpt)
        self._build_optimizer()
        self._build_amp()
        # state that resume restores
        self.start_epoch, self.start_batch, self.num_updates = 0, 0, 0
        self.partial = {"loss_sum": 0.0, "count": 0}
        self._rank_rngs = None  # every rank's RNG state under DDP, gathered before each save
        if resume_ckpt is not None:
            self._restore(resume_ckpt, resume)
        self._build_ema(resume_ckpt)
        self._wrap_model()
        self._build_loaders(bundle)
        self._build_loss_mixup()
        self._build_scheduler(resume_ckpt)
        self._build_saver_and_log(resume_ckpt)
        self.stop_signal = None
        self.stop_requested = False
        if self.primary:
            self._log_start(bundle)
        if resume_ckpt is not None:
            # last: everything above (model init, loaders) consumed RNG differently from the original run
            restore_rng_state(resume_ckpt, self.rank)

    def _abandon_run_dir(self):
        """A start that failed: a run folder it made goes again (no trace of a run that never ran);
        one that holds a run keeps it, and the error goes to train.log (train() writes it)."""
        if self.primary and self.created_run_dir:
            close_log_file()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # ---- build steps, in the order __init__ runs them

    def _check_inputs(self, resume_ckpt: dict | None):
        """Fail on a wrong model name or fine-tune path before any folder or data is made."""
        cfg = self.cfg
        check_model_name(cfg["model"]["name"])
        checkpoint = cfg["model"]["checkpoint"]
        if checkpoint and resume_ckpt is None and not Path(checkpoint).is_file():
            raise CheckpointError(f"model.checkpoint '{checkpoint}' not found; check the path")

    def _setup_device(self):
        """Device, process group (torchrun), determinism switches and the seed."""
        from timm.utils import random_seed
        from timm.utils.distributed import init_distributed_device_so

        t = self.cfg["train"]
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
            # on CUDA some ops (AdaptiveAvgPool2d's backward: ConvNeXt) have no deterministic kernel: warn
            torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        random_seed(t["seed"], self.rank)

    def _setup_run_dir(self, resume: str | None):
        """The run folder (new, or the resumed checkpoint's) and its train.log (config.yaml is written
        once the run is built)."""
        self.run_dir, note = run_folder(self.cfg, resume)
        self.created_run_dir = False
        if self.primary:
            self.created_run_dir = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            setup_logging(self.run_dir / "train.log")
            if note is not None:
                _logger.warning(note)
        else:
            setup_logging(None, level=logging.WARNING)

    def _build_datasets(self):
        """Train and val sets (data.build_datasets) and the number of classes the model gets."""
        from data import build_datasets

        cfg = self.cfg
        bundle = build_datasets(data_build_config(cfg), run_dir=self.run_dir if self.primary else None)
        self.classes = list(bundle.classes)
        self.num_classes = cfg["model"]["num_classes"] or len(self.classes)
        if self.num_classes < len(self.classes):
            raise ConfigError(
                f"model.num_classes={self.num_classes} is smaller than the {len(self.classes)} dataset "
                "classes; leave it null to match the dataset"
            )
        if self.num_classes > len(self.classes) and self.primary:
            _logger.warning(
                f"warning: model.num_classes={self.num_classes} is more than the {len(self.classes)} dataset "
                f"classes: outputs {len(self.classes)}..{self.num_classes - 1} are never a target "
                "(leave it null to match the dataset)"
            )
        return bundle

    def _build_model(self, resume_ckpt: dict | None):
        """The model (fine-tune weights loaded unless resuming), its data config, on the device."""

        m, d, t = self.cfg["model"], self.cfg["data"], self.cfg["train"]
        fit_fixed_input_size(m, d["img_size"])
        self.model = create_model(m["name"], self.num_classes, m, pretrained=m["pretrained"])
        if m["checkpoint"] and resume_ckpt is None:
            ck = load_checkpoint(m["checkpoint"])
            sd = extract_state_dict(ck, m["checkpoint"], m["checkpoint_use_ema"])
            dropped = load_model_weights(self.model, sd, m["checkpoint"], m["name"], resize_head=True)
            _logger.info(
                f"fine-tuning from {m['checkpoint']}"
                + (f" (classifier re-initialised for {self.num_classes} classes)" if dropped else "")
            )
        self.model_kwargs = dict(m["kwargs"] or {})
        self.data_config = checkpoint_data_config(  # img_size: an int or (H, W)
            self.model, {k: d[k] for k in ("img_size", "crop_pct", "interpolation", "mean", "std")}
        )
        self.model.to(self.device)
        if t["channels_last"]:
            self.model.to(memory_format=torch.channels_last)

    def _build_optimizer(self):
        """timm's optimizer; unless optim.lr is set, lr = lr_base x global batch / lr_base_size, linear
        for every optimizer (timm's train.py takes the square root for adaptive ones unless
        --lr-base-scale linear). The peak lr only: warmup_lr and min_lr stay as set (Swin scales them
        too; the NAT repo scales nothing, its lr being 1e-3 at its 8 x 128)."""
        from timm.optim import create_optimizer_v2

        o, t = self.cfg["optim"], self.cfg["train"]
        self.accum = o["grad_accum_steps"]
        global_batch = t["batch_size"] * self.world_size * self.accum
        self.lr = o["lr"] if o["lr"] is not None else o["lr_base"] * global_batch / o["lr_base_size"]
        betas = tuple(o["opt_betas"]) if o["opt_betas"] is not None else None
        named = {"eps": o["opt_eps"], "betas": betas, "fused": o["fused"]}
        opt_kwargs = {k: v for k, v in named.items() if v is not None}  # unset: the optimizer's default
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
        if o["layer_decay"] is not None and self.primary:
            scales = sorted({g.get("lr_scale", 1.0) for g in self.optimizer.param_groups})
            _logger.info(
                f"layer decay {o['layer_decay']}: {len(self.optimizer.param_groups)} param groups, lr x "
                f"{scales[0]:.3g} (stem) .. x {scales[-1]:.3g} (head) of the lr {self.lr:.2e}; the lr "
                "logged is that requested one"
            )

    def _build_amp(self):
        """Autocast when train.amp is true, or unset (null) on CUDA; bf16 needs no scaler, fp16 uses
        timm's NativeScaler. On CPU only bf16 (oneDNN's AMX / AVX512-BF16 kernels; fp16 has no fast CPU
        path), and only when asked: without bf16 units it is many times slower than fp32 (a warning)."""
        t = self.cfg["train"]
        device_type = self.device.type
        self.amp_dtype = torch.bfloat16 if t["amp_dtype"] == "bfloat16" else torch.float16
        self.use_amp = t["amp"] is True or (t["amp"] is None and device_type == "cuda")
        if self.use_amp and device_type == "cpu" and self.amp_dtype == torch.float16:
            raise ConfigError(
                "train.amp_dtype=float16 autocast runs on GPUs only; on CPU use "
                "train.amp_dtype=bfloat16 (--amp-dtype bfloat16) or --no-amp"
            )
        self.autocast = (
            (lambda: torch.autocast(device_type, dtype=self.amp_dtype))
            if self.use_amp
            else contextlib.nullcontext
        )
        self.precision = f"{t['amp_dtype']} autocast" if self.use_amp else "float32"
        note, warning = cpu_precision_notes(self.use_amp) if device_type == "cpu" else ("", None)
        _logger.info(f"precision: {self.precision} on {device_type}{note}")
        if warning:
            _logger.warning(warning)
        self.loss_scaler = None
        if self.use_amp and self.amp_dtype == torch.float16:
            from timm.utils import NativeScaler

            self.loss_scaler = NativeScaler(device="cuda")

    def _restore(self, ck: dict, path):
        """Weights, optimizer, scaler and position of a resumed run."""
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
        if ck.get("partial_epoch") and self.primary:  # summed over the ranks that ran it
            self.partial = dict(ck["partial_epoch"])
        _logger.info(
            f"resumed from {path}: {position(self.start_epoch, self.start_batch)} (update {self.num_updates})"
        )

    def _build_ema(self, resume_ckpt: dict | None):
        """timm's ModelEmaV3 when ema.enabled (its resumed weights too)."""
        from timm.utils import ModelEmaV3

        self.ema = None
        if self.cfg["ema"]["enabled"]:
            e = self.cfg["ema"]
            self.ema = ModelEmaV3(
                self.model, decay=e["decay"], use_warmup=e["warmup"], device="cpu" if e["force_cpu"] else None
            )
            if resume_ckpt is not None and "state_dict_ema" in resume_ckpt:
                self.ema.module.load_state_dict(resume_ckpt["state_dict_ema"])

    def _wrap_model(self):
        """DDP under torchrun, then torch.compile when train.compile."""
        t = self.cfg["train"]
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)
        if t["compile"]:
            mode = t["compile"] if isinstance(t["compile"], str) else None
            self.model = torch.compile(self.model, mode=mode)

    def _build_loaders(self, bundle):
        """Train loader (resumable sampler, per-sample seeded augmentation) and timm's eval loader."""
        loaders = build_loaders(self.cfg, bundle, self.data_config, self.world_size, self.rank, self.device)
        self.train_set, self.sampler = loaders.train_set, loaders.sampler
        self.loader_train, self.loader_eval = loaders.train, loaders.eval
        self.batches_per_epoch = loaders.batches_per_epoch

    def _build_loss_mixup(self):
        """Mixup/cutmix (soft-target loss), else label smoothing, else plain cross-entropy."""
        self.mixup_fn, self.train_loss_fn = build_mixup_and_loss(self.cfg, self.num_classes)
        self.train_loss_fn.to(self.device)
        self.eval_loss_fn = nn.CrossEntropyLoss().to(self.device)

    def _build_scheduler(self, resume_ckpt: dict | None):
        """timm's scheduler (per epoch or per update); a resumed run gets its state and lr back."""
        self.updates_per_epoch = (self.batches_per_epoch + self.accum - 1) // self.accum
        if resume_ckpt is not None and self.cfg["optim"]["lr"] is None:
            rebase_lr(self.optimizer, resume_ckpt, self.lr)
        self.lr_scheduler, self.num_epochs = build_scheduler(
            self.optimizer, self.cfg["sched"], self.updates_per_epoch, self.cfg["train"]["eval_metric"]
        )
        if resume_ckpt is not None:
            self.start_batch = restore_schedule(
                resume_ckpt,
                self.lr_scheduler,
                self.optimizer,
                self.cfg["sched"]["sched"],
                start_epoch=self.start_epoch,
                start_batch=self.start_batch,
                batches_per_epoch=self.batches_per_epoch,
                accum=self.accum,
                shape=self._schedule_record(),
            )

    def _schedule_record(self) -> dict:
        global_batch = self.cfg["train"]["batch_size"] * self.world_size
        return schedule_record(self.num_epochs, self.updates_per_epoch, global_batch, self.world_size)

    def _build_saver_and_log(self, resume_ckpt: dict | None):
        """On the primary rank: the checkpoint saver (last, best-k, model_best) and the run log."""
        t = self.cfg["train"]
        self.metric_name = t["eval_metric"]
        self.saver = None
        self.log = None
        if not self.primary:
            return
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
        self.log = RunLog(
            self.run_dir,
            self.cfg,
            self.num_epochs,
            self.start_epoch,
            self.num_updates,
            resumed=resume_ckpt is not None,
        )

    def _log_start(self, bundle):
        """One line of what is about to run: data, model size, precision, NA backend, processes."""
        model = unwrap(self.model)
        params = sum(p.numel() for p in model.parameters())
        sizes = bundle.selection.get("num_images") or {}
        images = f"{sizes.get('train', '?')} train / {sizes.get('val', '?')} val images"
        backend = predicted_na_backend(model, self.device, self.amp_dtype if self.use_amp else torch.float32)
        _logger.info(
            f"training {self.cfg['model']['name']} ({params / 1e6:.2f}M params) on {images}, "
            f"{len(self.classes)} classes; {self.precision}; NA backend {backend}; "
            f"{self.device.type} x {self.world_size} process{'es' if self.world_size > 1 else ''}"
        )

    def _log_skipped_images(self):
        """The end of a run names the unreadable images skipped, every rank's (collective: each rank
        warned of those in its own shard, on its own console)."""
        from data.folder import unreadable_files

        device = self.device if self.distributed else None
        found = {
            "train": unreadable_files(self.train_set, device),
            "val": unreadable_files(self.loader_eval, device),
        }
        names = found["train"] + found["val"]
        if names and self.primary:
            _logger.warning(
                f"skipped unreadable images: {len(found['train'])} train, {len(found['val'])} val "
                f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); delete or replace them"
            )

    def _extra_state(self) -> dict:
        """What a training checkpoint carries beyond timm's: model identity, classes, config and
        everything an exact resume needs (scheduler, position, partial epoch, RNG)."""
        return {
            "arch": self.cfg["model"]["name"],
            "model_kwargs": self.model_kwargs,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "config": configs.merge(self.cfg, {"train": {"stop_after_updates": None}}),
            "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.data_config.items()},
            "scheduler": scheduler_state(self.lr_scheduler),
            "schedule": self._schedule_record(),
            "num_updates": self.num_updates,
            "next_epoch": self._pos[0],
            "next_batch": self._pos[1],
            "partial_epoch": dict(self.partial),
            "rng": rng_state(),
            "rng_ranks": self._rank_rngs,
        }

    # ---- loop

    def _sync_flags(self, nonfinite: bool, stop: bool) -> tuple[int | None, bool]:
        """All ranks must agree to stop (signal, NaN) or DDP would hang in the next all-reduce: the
        lowest rank whose loss is not finite (None: none's) and whether to stop. A signal that reached
        some ranks only (one node preempted) becomes every rank's: its name in the log, its exit status."""
        if not self.distributed:
            return (self.rank if nonfinite else None), stop
        signal_code = STOP_SIGNALS.index(self.stop_signal) + 1 if self.stop_signal else 0
        flags = [self.world_size - self.rank if nonfinite else 0, int(stop), signal_code]
        flags = torch.tensor(flags, dtype=torch.float32, device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        first_nonfinite, stop, signal_code = (int(f) for f in flags.tolist())
        if signal_code and self.stop_signal is None:
            self.stop_signal = STOP_SIGNALS[signal_code - 1]
            if self.primary:
                note = (
                    f"{self.stop_signal} received by another process: saving a checkpoint after this update"
                )
                print(f"\n{note}...", file=sys.stderr)
        return (self.world_size - first_nonfinite if first_nonfinite else None), bool(stop)

    def _gather_for_checkpoint(self):
        """What the primary's checkpoint needs from every rank (collective): the partial epoch's
        loss summed (one rank carries it on after a resume) and each rank's RNG state."""
        loss_sum, count = self._summed_over_ranks(self.partial["loss_sum"], self.partial["count"])
        self.partial = {"loss_sum": loss_sum, "count": int(count)}
        self._rank_rngs = rank_rng_states(self.world_size) if self.distributed else None

    def _summed_over_ranks(self, *values: float) -> list[float]:
        """Each value summed over the ranks (collective: every rank calls it)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    @contextlib.contextmanager
    def _stop_signals_handled(self):
        """While the run trains, SIGINT/SIGTERM ask for a checkpoint after this update; then the previous
        handlers are back (a stale one swallowed a later in-process Ctrl-C and kept the run alive)."""

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_signal is not None and name == "SIGINT":  # second Ctrl-C: leave now
                raise KeyboardInterrupt
            self.stop_signal = name
            if self.primary:
                print(f"\n{name} received: saving a checkpoint after this update...", file=sys.stderr)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def fit(self) -> int:
        """Epochs from the start (or resume) position; the exit status (0, or 130/143 when stopped)."""
        with self._stop_signals_handled():
            status = self._fit_epochs()
            if self.distributed:
                # Ranks leave together, finished or stopped: a rank that tore its gloo group down while
                # rank 0 was still writing a checkpoint aborted at exit ("terminate called without an
                # active exception") in about 1 of 3 two-process runs.
                torch.distributed.barrier()
        return status

    def _fit_epochs(self) -> int:
        t = self.cfg["train"]
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
            eval_metrics = self._validate_epoch(epoch)
            lr = scheduled_lr(self.optimizer)
            self.lr_scheduler.step(epoch + 1, eval_metrics[self.metric_name] if eval_metrics else None)
            self._pos = (epoch + 1, 0)
            self.partial = {"loss_sum": 0.0, "count": 0}
            self._gather_for_checkpoint()
            if self.primary:
                self.log.epoch(epoch, self.num_updates, train_metrics, eval_metrics, lr, self.device)
                best = self._save_epoch(epoch, eval_metrics)
            if self.stop_requested and epoch + 1 < self.num_epochs:
                return self._save_interrupted(saved=True)
        self._log_skipped_images()
        if self.primary:
            self.log.close()
            if best and best[0] is not None:
                _logger.info(
                    f"done: best {'ema_' if self.ema is not None else ''}{self.metric_name} {best[0]:.3f} "
                    f"at epoch {best[1]}; "
                    f"checkpoints and logs in {self.run_dir} (tensorboard --logdir {self.run_dir / 'tb'})"
                )
        return 0

    def _validate_epoch(self, epoch: int) -> OrderedDict | None:
        """Model (and EMA, as ema_*) metrics every train.eval_interval epochs and after the last."""
        last_epoch = epoch + 1 == self.num_epochs
        if (epoch + 1) % self.cfg["train"]["eval_interval"] and not last_epoch:
            return None
        eval_metrics = self.validate(self.model)
        if self.ema is not None:
            ema_metrics = self.validate(self.ema.module)
            eval_metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        return eval_metrics

    def _save_epoch(self, epoch: int, eval_metrics: OrderedDict | None):
        """The epoch checkpoint, ranked by the EMA's metric when there is an EMA; the saver's best."""
        metric = None
        if eval_metrics is not None:
            key = f"ema_{self.metric_name}" if self.ema is not None else self.metric_name
            metric = eval_metrics[key]
        return self.saver.save_checkpoint(epoch + 1, metric=metric)  # 1-based, as the log: checkpoint-1

    def _save_interrupted(self, saved: bool = False) -> int:
        reason = self.stop_signal or "train.stop_after_updates"
        if not saved:
            self._gather_for_checkpoint()
        self._log_skipped_images()
        if self.primary:
            path = Path(self.saver.checkpoint_dir) / "last.pth.tar"
            if not saved:
                path = self.saver.save_last()
            self.log.close()
            launcher = f"torchrun --nproc_per_node={self.world_size}" if self.distributed else "python"
            _logger.info(
                f"stopped by {reason} {position(*self._pos)} (update {self.num_updates}); "
                f"saved {path}. Continue with: {launcher} train.py --resume {path}"
            )
        return EXIT_INTERRUPTED.get(self.stop_signal, 0)

    def _progress_bar(self, epoch: int, start_batch: int, show_progress: bool):
        if not show_progress:
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.batches_per_epoch,
            initial=start_batch,
            desc=f"epoch {epoch + 1}/{self.num_epochs}",
            dynamic_ncols=True,
            leave=False,
            file=sys.stderr,
        )

    def train_one_epoch(self, epoch: int, start_batch: int, show_progress: bool):
        """Batches `start_batch`.. of `epoch`; the epoch's metrics, or None when stopped mid-epoch."""
        from timm.models import model_parameters

        t = self.cfg["train"]
        self.model.train()
        self.sampler.set_epoch(epoch, start_batch * t["batch_size"])
        self.train_set.epoch = epoch
        self.loader_train.generator.manual_seed(t["seed"] * 1000 + epoch)  # worker seeds: not global RNG
        n_batches = self.batches_per_epoch
        last_accum = n_batches % self.accum or self.accum  # the last update's batches, from last_start
        last_start = n_batches - last_accum
        # AGC leaves the classifier out (its paper, timm's train.py): model_parameters drops the head
        agc = self.cfg["optim"]["clip_mode"] == "agc"
        params = list(model_parameters(unwrap(self.model), exclude_head=agc))
        t_start, images_seen, stop_after = time.perf_counter(), 0, t["stop_after_updates"]
        update_loss_sum = update_images = 0  # over the batches accumulated into the coming update
        self._log_window = (0, time.perf_counter())  # images and start time since the last logged update
        progress = self._progress_bar(epoch, start_batch, show_progress)
        try:
            for batch_idx, (images, target) in enumerate(worker_batches(self.loader_train), start_batch):
                need_update = (batch_idx + 1) % self.accum == 0 or batch_idx + 1 == n_batches
                accum_steps = last_accum if batch_idx >= last_start else self.accum
                loss, batch_size = self._train_step(
                    images, target, params, need_update, accum_steps, epoch, batch_idx
                )
                images_seen += batch_size
                update_loss_sum += loss * batch_size
                update_images += batch_size
                self._log_window = (self._log_window[0] + batch_size, self._log_window[1])
                if not need_update:
                    continue
                update_loss = update_loss_sum / update_images
                self._after_update(epoch, batch_idx, start_batch, update_loss, progress, t_start)
                update_loss_sum = update_images = 0
                stop = self.stop_signal is not None or (
                    stop_after is not None and self.num_updates >= stop_after
                )
                _, stop = self._sync_flags(False, stop)
                if stop:
                    self.stop_requested = True
                    if batch_idx + 1 < n_batches:
                        return None
                    # at the end of an epoch: finish it (eval + epoch checkpoint), then stop
        finally:
            if progress is not None:
                progress.close()
        elapsed = time.perf_counter() - t_start
        loss_sum, count = self._summed_over_ranks(self.partial["loss_sum"], self.partial["count"])
        return OrderedDict(
            loss=loss_sum / max(count, 1),
            img_per_sec=images_seen * self.world_size / max(elapsed, 1e-9),
            epoch_time=elapsed,
        )

    def _train_step(
        self, images, target, params, need_update: bool, accum_steps: int, epoch: int, batch_idx: int
    ):
        """Forward and backward of one batch (the optimizer step when `need_update`); its loss and
        size. A non-finite loss (agreed across ranks) stops training with a TrainingError."""
        from timm.utils import dispatch_clip_grad

        t, o = self.cfg["train"], self.cfg["optim"]
        images = images.to(self.device, non_blocking=True)
        target = target.to(self.device, non_blocking=True)
        if self.mixup_fn is not None:
            images, target = self.mixup_fn(images, target)
        if t["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        sync = contextlib.nullcontext()
        if self.distributed and not need_update:
            sync = self.model.no_sync()
        with sync:
            with self.autocast():
                output = self.model(images)
                loss = self.train_loss_fn(output, target)
            loss_value = loss.detach().float()
            nonfinite_rank, _ = self._sync_flags(not bool(torch.isfinite(loss_value)), False)
            if nonfinite_rank is not None:
                value = loss_value.item() if nonfinite_rank == self.rank else "not finite"
                raise TrainingError(self._nan_message(epoch, batch_idx, value, nonfinite_rank))
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
        loss_float = loss_value.item()
        self.partial["loss_sum"] += loss_float * images.shape[0]
        self.partial["count"] += images.shape[0]
        return loss_float, images.shape[0]

    def _after_update(self, epoch: int, batch_idx: int, start_batch: int, loss: float, progress, t_start):
        """After an optimizer update: EMA, lr schedule, position, and the log / progress bar."""
        t = self.cfg["train"]
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1
        if self.ema is not None:
            self.ema.update(unwrap(self.model), step=self.num_updates)
        self.lr_scheduler.step_update(
            num_updates=schedule_step(epoch, batch_idx + 1, self.updates_per_epoch, self.accum)
        )
        self._pos = (epoch, batch_idx + 1)
        lr = scheduled_lr(self.optimizer)
        log_step = self.num_updates % t["log_interval"] == 0
        if log_step and self.distributed:  # the logged loss is every rank's, not rank 0's shard
            loss = self._summed_over_ranks(loss)[0] / self.world_size
        log_now = self.primary and log_step
        if progress is None and not log_now:
            return
        window_images, window_start = self._log_window
        ips = window_images * self.world_size / max(time.perf_counter() - window_start, 1e-9)
        if log_now:
            self.log.update(self.num_updates, loss, lr, ips)
            self._log_window = (0, time.perf_counter())
        if progress is not None:
            done = time.perf_counter() - t_start
            left_updates = (self.num_epochs - epoch) * self.batches_per_epoch - batch_idx - 1
            eta = done / max(batch_idx + 1 - start_batch, 1) * left_updates
            progress.set_postfix_str(f"loss {loss:.3f} lr {lr:.2e} img/s {ips:.0f} run-eta {fmt_time(eta)}")
            progress.update(batch_idx + 1 - progress.n)

    def _nan_message(self, epoch, batch_idx, value, rank: int) -> str:
        last = self.run_dir / "last.pth.tar"
        kept = f"last good checkpoint kept: {last}" if last.exists() else "no checkpoint was written yet"
        where = f" on rank {rank}" if self.distributed else ""
        return (
            f"loss is {value}{where} at epoch {epoch + 1} batch {batch_idx + 1} (update {self.num_updates}); "
            "training stopped, "
            f"{kept}. Lower optim.lr, set optim.clip_grad (e.g. 1.0) or use train.amp_dtype=bfloat16"
        )

    @torch.no_grad()
    def validate(self, model) -> OrderedDict:
        """Loss, top-1 and top-5 of `model` on the val set (summed over ranks)."""
        from timm.utils import accuracy

        from data.folder import UNREADABLE

        model.eval()
        loss_sum, top1_sum, top5_sum, n = 0.0, 0.0, 0.0, 0
        k = min(5, self.num_classes)
        device = next(model.parameters()).device  # an EMA kept on the CPU (ema.force_cpu) is scored there
        for images, target in worker_batches(self.loader_eval):
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            if self.cfg["train"]["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                output = model(images)
            readable = target != UNREADABLE  # an unreadable image is left out, not its neighbour scored
            output, target = output.float()[readable], target[readable]
            b = int(readable.sum())
            if b == 0:
                continue
            loss = self.eval_loss_fn(output, target)
            acc1, acc5 = accuracy(output, target, topk=(1, k))
            loss_sum += loss.item() * b
            top1_sum += acc1.item() * b
            top5_sum += acc5.item() * b
            n += b
        loss_sum, top1_sum, top5_sum, n = self._summed_over_ranks(loss_sum, top1_sum, top5_sum, n)
        n = max(n, 1)
        model.train()
        return OrderedDict(loss=loss_sum / n, top1=top1_sum / n, top5=top5_sum / n)
