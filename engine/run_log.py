"""What a training run writes as it goes: console and train.log lines, TensorBoard events (tb/) and
summary.csv (one row per epoch, timm's update_summary).

Owns the formats a user reads and plots: the epoch line, the scalar names (train/loss, val/top1,
...) and the CSV columns. Only the primary rank logs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

import configs

_logger = logging.getLogger("train")  # the name train.log's lines carry


class RunLog:
    """TensorBoard writer, summary.csv and the epoch line of one run folder."""

    def __init__(self, run_dir: Path, cfg: dict, num_epochs: int, start_epoch: int, step: int, resumed: bool):
        from timm.utils.summary import trim_summary
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.num_epochs = run_dir, num_epochs
        # a run stopped after logging an epoch but before its checkpoint repeats that epoch (rows
        # count epochs from 1, as the log does: rows 1..start_epoch are done)
        trim_summary(str(run_dir / "summary.csv"), start_epoch + 1)
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=step if resumed else None)
        self.lr_step = None  # the step whose lr update() wrote
        self.writer.add_text("config", "```yaml\n" + configs.dump_config(cfg) + "```", step)

    def update(self, step: int, loss: float, lr: float, img_per_sec: float):
        """Every `train.log_interval` updates: loss, lr and throughput since the last such point."""
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.lr_step = step
        self.writer.add_scalar("train/img_per_sec", img_per_sec, step)

    def epoch(self, epoch: int, step: int, train_metrics: dict, eval_metrics: dict | None, lr: float, device):
        """One epoch: scalars to TensorBoard, a line to the console / train.log, a row to summary.csv."""
        from timm.utils import update_summary

        w = self.writer
        w.add_scalar("train/epoch_loss", train_metrics["loss"], step)
        w.add_scalar("train/epoch_img_per_sec", train_metrics["img_per_sec"], step)
        if step != self.lr_step:  # one point a step: a tag written twice at a step draws a zigzag
            w.add_scalar("train/lr", lr, step)
        peak_mb = peak_memory_mb(device)
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
            epoch + 1,
            {**train_metrics, "peak_mem_mb": peak_mb},
            eval_metrics or {},
            str(self.run_dir / "summary.csv"),
            lr=lr,
        )

    def close(self):
        self.writer.close()


def peak_memory_mb(device) -> float:
    """The process's peak so far (MiB): CUDA max allocated, or the CPU's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fmt_time(seconds: float) -> str:
    """'mm:ss' or 'h:mm:ss'."""
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def log_to_file(message: str):
    """`message` to train.log only (an error the console already shows on stderr)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(logging.LogRecord("train", logging.ERROR, __file__, 0, message, None, None))


def close_log_file():
    """Stop writing train.log (its run folder is about to go)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def setup_logging(log_file=None, level=logging.INFO):
    """Messages to stdout, plus timestamped lines to `log_file` (train.log); timm's info kept quiet."""
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
