"""Resuming a run: the resolved config and checkpoint a `--resume` starts from, whether the run is
already finished, and the lr schedule built and put back at the run's position.

Owns the schedule's shape record (a checkpoint's `schedule`: epochs, updates per epoch, global batch,
processes) and what follows when it changed since the checkpoint: the schedule recomputed from the
run's position in it (the images it has seen) instead of continuing the saved one. engine/trainer.py
builds a `Run` with these; this module does not import it.
"""

from __future__ import annotations

import logging
import math
import os
from datetime import datetime
from pathlib import Path

import configs
from configs import ConfigError
from engine.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from engine.errors import CheckpointError

_logger = logging.getLogger("train")


def resolve_run_config(
    config_paths: list[str], overrides: list[str], resume: str | None
) -> tuple[dict, str | None, dict | None]:
    """(config, resume checkpoint path, resume checkpoint): the -c files with overrides, or the
    resumed checkpoint's own config with overrides."""
    resume_ckpt, resume_path = None, None
    if resume:
        path = Path(resume)
        if path.is_dir():
            path = path / "last.pth.tar"
        resume_ckpt = load_checkpoint(path)
        if not isinstance(resume_ckpt, dict) or resume_ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"'{path}' is not a training checkpoint of this repo (no resume state); "
                "to fine-tune from its "
                "weights use --checkpoint instead of --resume"
            )
        resume_path = str(path)
        check_not_behind_its_run(path, resume_ckpt)
    if config_paths:
        cfg = configs.load_config(config_paths, overrides)
    elif resume_ckpt is not None:
        cfg = configs.load_config([], overrides, base=resume_ckpt["config"])
    else:
        raise ConfigError("no config given; pass -c configs/<name>.yaml (e.g. -c configs/quickstart.yaml)")
    if resume_ckpt is not None:
        check_optimizer_unchanged(resume_ckpt["config"], cfg)
    return cfg, resume_path, resume_ckpt


# what the saved optimizer state and lr schedule hold (clip_grad, clip_mode and fused are read every
# step; grad_accum_steps reshapes the schedule, as --epochs and the batch size do)
RESTORED_OPTIM_KEYS = (
    "opt", "lr", "lr_base", "lr_base_size", "weight_decay", "momentum", "opt_eps", "opt_betas", "layer_decay",
)  # fmt: skip


def check_optimizer_unchanged(saved: dict, cfg: dict) -> None:
    """A resumed run restores its optimizer and lr schedule as saved, so a changed `optim` key would be
    recorded in config.yaml but not used (or, for another optimizer, fail on the saved state)."""
    old, new = configs.validate(saved)["optim"], cfg["optim"]
    changed = [f"optim.{k} {old[k]!r} -> {new[k]!r}" for k in RESTORED_OPTIM_KEYS if old[k] != new[k]]
    if changed:
        raise ConfigError(
            f"--resume continues the saved optimizer and lr schedule, so {', '.join(changed)} would not "
            "apply; drop the change, or fine-tune from the weights in a new run (--checkpoint)"
        )


def check_not_behind_its_run(path: Path, ck: dict) -> None:
    """A resumed run continues in its checkpoint's folder and overwrites what comes later there
    (last.pth.tar, summary.csv rows, TensorBoard events): from an older checkpoint of the folder
    (model_best, checkpoint-N) that would lose the run's later epochs, so it is refused."""
    last = path.parent / "last.pth.tar"
    if path.name == last.name or not last.is_file():
        return
    newest = load_checkpoint(last, mmap=True)  # its position only: the weights stay on disk
    ahead = (newest.get("num_updates", 0), newest.get("next_epoch", 0))
    if ahead > (ck.get("num_updates", 0), ck.get("next_epoch", 0)):
        raise ConfigError(
            f"'{path}' ({position(ck['next_epoch'], ck['next_batch'])}) is behind its run's last.pth.tar "
            f"({position(newest['next_epoch'], newest['next_batch'])}): resuming it in {path.parent} would "
            "overwrite the later epochs; to branch from it, copy it as last.pth.tar into a new folder and "
            "--resume that folder"
        )


def new_run_folder(output: str, experiment: str | None, label: str) -> Path:
    """A new run's folder: `output`/`experiment`, else a timestamped name ending in `label`; one that
    already holds a run (its last.pth.tar) is refused: the new run would overwrite it."""
    name = experiment or f"{datetime.now():%Y%m%d-%H%M%S}-{label.replace('/', '_')}"
    run_dir = Path(output) / name
    if (run_dir / "last.pth.tar").exists():
        raise ConfigError(
            f"run folder '{run_dir}' already holds a training run; continue it with "
            f"--resume {run_dir} or pick another --experiment/train.output"
        )
    return run_dir


def run_folder(cfg: dict, resume: str | None) -> tuple[Path, str | None]:
    """(the run folder, a warning or None): a new run's (train.output / train.experiment, else a
    timestamped name), which must not hold a run yet; or a resumed run's own, its checkpoint's, which
    train.output / train.experiment then record (config.yaml says where the run is), with a warning
    when they named another folder."""
    t = cfg["train"]
    if not resume:
        return new_run_folder(t["output"], t["experiment"], cfg["model"]["name"]), None
    run_dir = Path(resume).parent if Path(resume).is_file() else Path(resume)
    named = None if t["experiment"] is None else Path(t["output"]) / t["experiment"]
    t["output"], t["experiment"] = str(run_dir.parent), run_dir.name
    if named is None or named.resolve() == run_dir.resolve():  # one folder, named relative or absolute
        return run_dir, None
    return run_dir, (
        f"warning: a resumed run continues in its own folder {run_dir}, not in {named} (train.output / "
        "train.experiment); to branch, copy the checkpoint into a new folder as last.pth.tar and resume that"
    )


def finished(cfg: dict, ck: dict, path: str) -> bool:
    """True (after saying so) when a resumed run has already trained every epoch `cfg` asks for;
    asking for fewer epochs than it has trained is an error."""
    done, total = ck["next_epoch"], scheduled_epochs(cfg)
    if done > total:
        raise ConfigError(
            f"'{path}' has already trained {done} epochs, more than the {total} the config's schedule has "
            f"(sched.epochs, and sched.cooldown_epochs for cosine/tanh/poly); to train longer give "
            f"--epochs > {done}"
        )
    if done < total:
        return False
    if int(os.environ.get("RANK", 0)) == 0:
        print(
            f"nothing to do: '{path}' has trained all {total} epochs it asks for. To train longer: "
            f"python train.py --resume {path} --epochs N (N > {cfg['sched']['epochs']}; the lr schedule is "
            "recomputed for N epochs from there)"
        )
    return True


def scheduled_epochs(cfg: dict) -> int:
    """The epochs a run of `cfg` trains: timm's count (the cooldown only where its scheduler adds
    it), from a throwaway scheduler, so a resumed run and the trainer agree."""
    import torch

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return build_scheduler(optimizer, cfg["sched"], 1, cfg["train"]["eval_metric"])[1]


def position(epoch: int, batch: int) -> str:
    """A run's place from its (next epoch, next batch), 1-based as the epoch lines count."""
    if batch == 0:
        return f"after epoch {epoch}" if epoch else "at the start"
    return f"in epoch {epoch + 1} after batch {batch}"


def scheduled_lr(optimizer) -> float:
    """The lr the schedule asks for now: a param group's lr over its layer-decay scale (timm's
    `lr_scale`), not the first group's scaled one (the stem's, under --layer-decay)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def build_scheduler(optimizer, s: dict, updates_per_epoch: int, eval_metric: str = "top1"):
    """timm's scheduler (per epoch or per update) from the config's `sched`: (scheduler, epochs, the
    cooldown included where timm adds it: cosine, tanh, poly). `eval_metric`: plateau's direction."""
    from timm.scheduler import create_scheduler_v2

    if s["sched"] == "none":  # timm's "no scheduler" (None): this loop steps one every update
        raise ConfigError(
            "sched.sched=none is not supported; for a constant lr use sched.sched=constant (warmup and "
            "layer decay still apply) or sched.sched=step sched.decay_rate=1"
        )
    try:
        return create_scheduler_v2(
            optimizer,
            sched=s["sched"],
            plateau_mode="min" if eval_metric == "loss" else "max",
            num_epochs=s["epochs"],
            decay_epochs=s["decay_epochs"],
            decay_milestones=s["decay_milestones"],
            decay_rate=s["decay_rate"],
            patience_epochs=s["patience_epochs"],
            cooldown_epochs=s["cooldown_epochs"],
            warmup_epochs=s["warmup_epochs"],
            warmup_lr=s["warmup_lr"],
            min_lr=s["min_lr"],
            step_on_epochs=not s["step_on_updates"],
            updates_per_epoch=updates_per_epoch,
        )
    except (ValueError, AssertionError) as e:  # timm's unknown-name ValueError, its argument asserts
        raise ConfigError(
            f"lr schedule rejected: {e} (check sched.sched: cosine, tanh, step, multistep, plateau, "
            "poly, ...; and the sched section's other keys)"
        ) from None


def scheduler_state(lr_scheduler) -> dict:
    """The scheduler's state for a checkpoint. timm's plateau keeps its best metric and last epoch
    only: torch's ReduceLROnPlateau state (the bad-epoch and cooldown counters) goes with it, so a
    resumed plateau run decays the lr at the epoch the uninterrupted run would."""
    from timm.scheduler import PlateauLRScheduler

    state = lr_scheduler.state_dict()
    if isinstance(lr_scheduler, PlateauLRScheduler):
        state["reduce_on_plateau"] = lr_scheduler.lr_scheduler.state_dict()
    return state


def rebase_lr(optimizer, ck: dict, lr: float) -> None:
    """Before the scheduler is built for a resumed run whose lr comes from the lr_base rule: at a new
    global batch (processes, batch size, accumulation) the rule gives another peak lr than the saved
    one, and the schedule, rebuilt for the new geometry anyway, takes it (as a run started at this
    geometry would have). timm's scheduler reads each group's `initial_lr`; the optimizer's restored
    state holds the old one."""
    saved = ck["optimizer"]["param_groups"][0].get("initial_lr")
    if saved is None or math.isclose(saved, lr, rel_tol=1e-9):
        return
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    _logger.info(
        f"resume: the global batch changed, so the lr_base rule's peak lr too: {saved:.2e} -> {lr:.2e}"
    )


def schedule_record(num_epochs: int, updates_per_epoch: int, global_batch: int, world_size: int) -> dict:
    """A checkpoint's `schedule`: the shape `restore_schedule` compares a resumed run's with."""
    return {
        "num_epochs": num_epochs,
        "updates_per_epoch": updates_per_epoch,
        "global_batch": global_batch,
        "world_size": world_size,
    }


def restore_schedule(
    ck: dict,
    lr_scheduler,
    optimizer,
    sched_name: str,
    *,
    start_epoch: int,
    start_batch: int,
    batches_per_epoch: int,
    accum: int,
    shape: dict,
) -> int:
    """A resumed run's scheduler state and lr back; the batch of `start_epoch` it continues after
    (`start_batch`, or the same images' place in new batches). `shape`: this run's `schedule_record`."""
    changes = geometry_changes(ck, lr_scheduler, shape)
    if not changes:
        if ck.get("scheduler"):
            lr_scheduler.load_state_dict(ck["scheduler"])
            if "reduce_on_plateau" in ck["scheduler"]:  # scheduler_state's addition
                lr_scheduler.lr_scheduler.load_state_dict(ck["scheduler"]["reduce_on_plateau"])
        # the scheduler's constructor reset the lr (to warmup_lr): put back the saved one, which the
        # next updates of the uninterrupted run would have used
        for group, saved in zip(optimizer.param_groups, ck["optimizer"]["param_groups"], strict=True):
            group["lr"] = saved["lr"]
        return start_batch
    # The epochs or the updates per epoch changed (processes, batch size, accumulation): the new
    # schedule, at the run's position in it (the images it has seen), instead of the saved one
    # (which counts the old updates: its lr would be wrong for the rest of the run).
    if sched_name == "plateau":  # its state is the val metric's history, not a function of time
        raise ConfigError(
            f"resume: {', '.join(changes)}, but sched.sched=plateau can't be rebuilt at the run's "
            "position (its lr follows the val metric's history); resume with the run's own settings"
        )
    start_batch = move_start_batch(ck, start_epoch, start_batch, shape["global_batch"], accum)
    num_epochs, updates_per_epoch = shape["num_epochs"], shape["updates_per_epoch"]
    lr_scheduler.step(start_epoch)
    lr_scheduler.step_update(schedule_step(start_epoch, start_batch, updates_per_epoch, accum))
    done = (start_epoch + start_batch / batches_per_epoch) / num_epochs
    where = position(start_epoch, start_batch)
    _logger.info(
        f"resume: {', '.join(changes)}; lr schedule recomputed for {num_epochs} epochs x "
        f"{updates_per_epoch} updates from the run's position ({where}, "
        f"{100 * done:.0f}% of training done): lr now {scheduled_lr(optimizer):.2e}"
    )
    return start_batch


def geometry_changes(ck: dict, lr_scheduler, shape: dict) -> list[str]:
    """What changed since the checkpoint in the schedule's shape ([]: it continues exactly)."""
    saved = ck.get("schedule") or {}
    changes = []
    for key, what in (("num_epochs", "epochs"), ("updates_per_epoch", "updates per epoch")):
        if key in saved and saved[key] != shape[key]:
            changes.append(f"{what} {saved[key]} -> {shape[key]}")
    if "world_size" in saved and saved["world_size"] != shape["world_size"]:
        changes.append(f"processes {saved['world_size']} -> {shape['world_size']}")
    new_state = {k: v for k, v in lr_scheduler.state_dict().items() if k != "metric"}
    old_state = {k: v for k, v in (ck.get("scheduler") or {}).items() if k != "metric"}
    from timm.scheduler import PlateauLRScheduler

    # plateau's state is the val metric's history (best, last epoch), not settings: it always differs
    settings_saved = ck.get("scheduler") and not isinstance(lr_scheduler, PlateauLRScheduler)
    if not changes and settings_saved and old_state != new_state:
        changes.append("schedule settings changed")
    return changes


def move_start_batch(ck: dict, start_epoch: int, start_batch: int, global_batch: int, accum: int) -> int:
    """A mid-epoch position in the new batches: the same images of the epoch seen (the sampler's
    order over all ranks does not depend on the number of processes), at an update boundary."""
    saved = ck.get("schedule") or {}
    if not start_batch or "global_batch" not in saved:
        return start_batch
    seen = start_batch * saved["global_batch"]
    batch = seen // global_batch
    batch -= batch % accum
    if batch != start_batch:
        repeated = seen - batch * global_batch
        _logger.info(
            f"resume: {seen} images of epoch {start_epoch + 1} were seen in batches of "
            f"{saved['global_batch']}; continuing after {batch} batches of {global_batch}"
            + (f" ({repeated} images of this epoch are seen again)" if repeated else "")
        )
    return batch


def schedule_step(epoch: int, batch: int, updates_per_epoch: int, accum: int) -> int:
    """The scheduler's update count at (epoch, batches done in it): updates of this run's shape, so
    a resumed run whose updates per epoch changed stays at its place in the schedule."""
    return epoch * updates_per_epoch + -(-batch // accum)
