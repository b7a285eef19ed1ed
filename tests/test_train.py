"""train.py end to end, through its command line (what a user sees: files, exit codes, one-line errors).

The helpers at the top (tiny config, run_cli) are shared with test_eval.py / test_train_*.py."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import configs  # noqa: E402

PY = sys.executable

# A tiny NAT (32 px) under the full ImageNet recipe's augmentation (RandAugment, mixup/cutmix, random
# erasing, drop-path, EMA, grad accumulation): every RNG consumer the resume test must get right.
TINY = {
    "base": str(REPO / "configs" / "imagenet1k.yaml"),
    "model": {
        "name": "nat_mini",
        "drop_path_rate": 0.1,
        "kwargs": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "kernel_size": 3},
    },
    "data": {
        "dataset": "synthetic",
        "synthetic": {"num_classes": 3, "train_per_class": 8, "val_per_class": 2, "image_size": 32},
        "img_size": 32,
        "workers": 0,
        "pin_memory": False,
    },
    "optim": {"lr": 1e-3, "grad_accum_steps": 2, "clip_grad": 1.0},
    "sched": {"epochs": 2, "warmup_epochs": 1, "cooldown_epochs": 0},
    "ema": {"enabled": True, "decay": 0.9},
    "train": {"batch_size": 4, "deterministic": True, "log_interval": 1, "progress": "off", "device": "cpu"},
}


def write_config(path: Path, data_root: Path, **section_updates) -> Path:
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["data"]["root"] = str(data_root)
    for section, values in section_updates.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"  # same thread count in every run: bitwise-equal reductions
    e["PYTHONPATH"] = str(REPO)
    return e


def run_cli(*args, timeout=300, check=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [PY, *map(str, args)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout
    )
    if check is not None and proc.returncode != check:
        raise AssertionError(
            f"exit {proc.returncode} != {check}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def load_entry_point(name: str):
    """An entry-point script loaded by path (nothing imports them as modules; its main() runs in-process)."""
    spec = importlib.util.spec_from_file_location(f"entry_{Path(name).stem}", REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def full_run(workdir):
    """An uninterrupted 2-epoch run (the reference for the resume test)."""
    cfg = write_config(workdir / "tiny.yaml", workdir / "data")
    p = run_cli("train.py", "-c", cfg, "--output", workdir / "runs", "--experiment", "full", check=0)
    (workdir / "full.stdout").write_text(p.stdout)
    return workdir / "runs" / "full", cfg


def test_run_writes_checkpoints_logs_summary_and_config(full_run):
    run_dir, _ = full_run
    for name in ("last.pth.tar", "model_best.pth.tar", "config.yaml", "classes.json", "train.log"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert not list(run_dir.glob("tmp*")), "temporary checkpoint left behind"
    # epochs count from 1 everywhere: the epoch lines, summary.csv, checkpoint names, the last line
    rows = list(csv.DictReader((run_dir / "summary.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    stdout = (run_dir.parent.parent / "full.stdout").read_text()
    assert "epoch 1/2" in stdout and "epoch 2/2" in stdout
    best = max(
        rows, key=lambda r: (float(r["eval_ema_top1"]), -int(r["epoch"]))
    )  # with an EMA the saver ranks by the EMA's metric, and keeps the first best
    assert (
        f"done: best ema_top1 {float(best['eval_ema_top1']):.3f} at epoch {best['epoch']};"
        in (stdout.splitlines()[-1])
    ), stdout
    assert {p.name for p in run_dir.glob("checkpoint-*.pth.tar")} <= {
        "checkpoint-1.pth.tar",
        "checkpoint-2.pth.tar",
    }
    assert (run_dir / f"checkpoint-{best['epoch']}.pth.tar").is_file()
    # the start-up line
    assert (
        "training nat_mini (" in stdout
        and "24 train / 6 val images, 3 classes; float32; NA backend " in stdout
    )
    assert {"train_loss", "eval_top1", "eval_top5", "eval_loss", "lr", "train_img_per_sec"} <= rows[0].keys()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert configs.validate(saved) == saved  # fully resolved: every key present and valid
    assert saved["model"]["kwargs"]["embed_dim"] == 16
    ck = load(run_dir / "last.pth.tar")
    assert ck["arch"] == "nat_mini" and ck["num_classes"] == 3 and len(ck["classes"]) == 3
    assert ck["next_epoch"] == 2 and ck["num_updates"] == 6  # 24 images / batch 4 / accum 2 * 2 epochs
    assert "state_dict_ema" in ck and "scheduler" in ck and "rng" in ck
    assert ck["optimizer"]["param_groups"][0]["fused"] is True  # the recipe's fused AdamW


def test_tensorboard_has_the_promised_scalars(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(full_run[0] / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/lr",
        "train/img_per_sec",
        "train/epoch_img_per_sec",
        "train/peak_mem_mb",
        "val/loss",
        "val/top1",
        "val/top5",
    }
    assert expected <= tags, expected - tags
    for tag in tags:  # one point per step: a tag written twice at a step draws a zigzag
        steps = [e.step for e in acc.Scalars(tag)]
        assert len(steps) == len(set(steps)), (tag, steps)
    # the values are the epochs' own: summary.csv's rows, tag by tag (updates 3 and 6 end epochs 1, 2)
    rows = list(csv.DictReader((full_run[0] / "summary.csv").open()))
    for tag, column in (
        ("val/top1", "eval_top1"),
        ("val/loss", "eval_loss"),
        ("train/epoch_loss", "train_loss"),
    ):
        got = [e.value for e in acc.Scalars(tag)]
        assert got == pytest.approx([float(r[column]) for r in rows], rel=1e-6), tag
    # train/loss is each update's loss, the mean over its accumulated batches (2 of 4 images here):
    # an epoch's three updates average to the epoch's loss
    per_update = [e.value for e in acc.Scalars("train/loss")]
    epochs = [sum(per_update[i : i + 3]) / 3 for i in (0, 3)]
    assert epochs == pytest.approx([float(r["train_loss"]) for r in rows], rel=1e-5)
    assert "config" in "".join(acc.Tags()["tensors"])


def test_stop_and_resume_gives_identical_weights(full_run, workdir):
    """Stopped mid-epoch (as SIGTERM would), resumed: same weights, EMA and optimizer state as the
    uninterrupted run, bit for bit (deterministic CPU)."""
    ref_dir, cfg = full_run
    out = workdir / "runs"
    p = run_cli(
        "train.py",
        "-c",
        cfg,
        "--output",
        out,
        "--experiment",
        "stopped",
        "train.stop_after_updates=4",
        check=0,
    )
    assert (
        "--resume" in p.stdout and "stopped by train.stop_after_updates in epoch 2 after batch 2" in p.stdout
    )
    ck = load(out / "stopped" / "last.pth.tar")
    assert (ck["next_epoch"], ck["next_batch"], ck["num_updates"]) == (1, 2, 4)
    run_cli("train.py", "--resume", out / "stopped" / "last.pth.tar", check=0)
    a, b = load(ref_dir / "last.pth.tar"), load(out / "stopped" / "last.pth.tar")
    assert_same_tensors(a["state_dict"], b["state_dict"], "weights")
    assert_same_tensors(a["state_dict_ema"], b["state_dict_ema"], "EMA weights")
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert_same_tensors(sa, sb, "optimizer state")
    rows = list(csv.DictReader((out / "stopped" / "summary.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_gradient_clipping_bounds_the_first_update(workdir):
    """optim.clip_grad (norm): plain SGD at lr 1 moves the weights by exactly the clipped gradient,
    whose norm is the bound (unclipped, this first step is ~4.6, ~5e3 times larger); lr 0 gives the start."""
    weights = {}
    for name, lr in (("start", 0.0), ("clipped", 1.0)):
        cfg = write_config(
            workdir / f"clip-{name}.yaml",
            workdir / "data",
            optim={"opt": "momentum", "lr": lr, "momentum": 0.0, "weight_decay": 0.0, "clip_grad": 1e-3,
                   "grad_accum_steps": 1},
            sched={"epochs": 1, "warmup_epochs": 0, "sched": "step", "decay_rate": 1.0},
            ema={"enabled": False},
            model={"drop_path_rate": 0.0},
            train={"stop_after_updates": 1},
        )  # fmt: skip
        run_cli("train.py", "-c", cfg, "--output", workdir / "runs", "--experiment", f"clip-{name}", check=0)
        weights[name] = load(workdir / "runs" / f"clip-{name}" / "last.pth.tar")["state_dict"]
    step = torch.cat([(weights["clipped"][k] - weights["start"][k]).flatten() for k in weights["start"]])
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_nan_loss_stops_with_one_line_and_keeps_last_checkpoint(workdir):
    # epoch 0 at warmup_lr (fine, checkpointed), epoch 1 at lr 1e12: the loss blows up
    cfg = write_config(
        workdir / "nan.yaml",
        workdir / "data",
        optim={"opt": "sgd", "lr": 1e12, "clip_grad": None, "grad_accum_steps": 1},
        sched={"epochs": 3, "warmup_epochs": 1, "warmup_lr": 1e-6, "step_on_updates": False},
        ema={"enabled": False},
    )
    p = run_cli("train.py", "-c", cfg, "--output", workdir / "runs", "--experiment", "nan")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: loss is"), p.stderr
    assert "last good checkpoint kept" in lines[0] and "Traceback" not in p.stderr
    ck = load(workdir / "runs" / "nan" / "last.pth.tar")
    assert ck["next_epoch"] == 1
    assert all(v.isfinite().all() for v in ck["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["-c", "configs/quickstart.yaml", "optim.learning_rat=1"],
            "unknown config key 'optim.learning_rat'",
        ),
        (["-c", "configs/quickstart.yaml", "--set", "train.lr=1"], "did you mean 'optim.lr'"),
        (["-c", "configs/no_such.yaml"], "config file 'configs/no_such.yaml' not found"),
        (["-c", "configs/quickstart.yaml", "train.batch_size=big"], "must be int, got 'big'"),
        (["--resume", "/nonexistent/last.pth.tar"], "checkpoint '/nonexistent/last.pth.tar' not found"),
        (["-c", "configs/quickstart.yaml", "--model", "nat_tinny"], "did you mean 'nat_tiny'"),
        ([], "no config given"),
    ],
)
def test_bad_input_is_one_error_line(args, expected, capsys, monkeypatch):
    train = load_entry_point("train.py")
    monkeypatch.chdir(REPO)
    assert train.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert lines[0].startswith("error: ")


def test_cli_error_has_no_traceback():
    p = run_cli("train.py", "-c", "configs/quickstart.yaml", "optim.lrr=1", timeout=120)
    assert p.returncode == 2
    assert (
        p.stderr
        == "error: unknown config key 'optim.lrr' (override 'optim.lrr=1'); did you mean 'optim.lr'?\n"
    )


def test_wrong_checkpoint_is_one_error_line(workdir, full_run):
    bad = workdir / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    _, cfg = full_run
    p = run_cli("train.py", "-c", cfg, "--checkpoint", bad, "--output", workdir / "runs", timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "cannot read checkpoint" in p.stderr, p.stderr
    p = run_cli("train.py", "--resume", bad, timeout=120)
    assert p.returncode == 2 and "cannot read checkpoint" in p.stderr


def test_fine_tune_resizes_head(full_run, workdir):
    ref_dir, cfg = full_run
    ft = write_config(
        workdir / "ft.yaml",
        workdir / "data5",
        data={"synthetic": {"num_classes": 5, "train_per_class": 4, "val_per_class": 1, "image_size": 32}},
        sched={"epochs": 1, "warmup_epochs": 0},
    )
    p = run_cli(
        "train.py",
        "-c",
        ft,
        "--checkpoint",
        ref_dir / "model_best.pth.tar",
        "--output",
        workdir / "runs",
        "--experiment",
        "ft",
        "optim.lr=0",  # ~nothing moves (the cosine's floor, ~1e-5): what the run saved is what it loaded
        check=0,
    )
    assert "classifier re-initialised for 5 classes" in p.stdout
    ft_ck = load(workdir / "runs" / "ft" / "last.pth.tar")
    assert ft_ck["num_classes"] == 5 and ft_ck["state_dict"]["head.fc.weight"].shape[0] == 5
    source = load(ref_dir / "model_best.pth.tar")["state_dict"]
    body = {k: v for k, v in ft_ck["state_dict"].items() if not k.startswith("head.fc.")}
    for name, tensor in body.items():  # every weight but the head: the source's, not a fresh init
        torch.testing.assert_close(tensor, source[name], atol=1e-4, rtol=0, msg=name)


def tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_resuming_a_run_by_a_relative_path_to_its_own_folder_warns_of_nothing(tmp_path, monkeypatch):
    """make demo records its output absolute; `--resume runs/demo/...` from the repo names the same
    folder relatively: no "continues in its own folder ..., not in <the same folder>" warning."""
    from engine.resume import run_folder

    (tmp_path / "runs" / "r").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = {"train": {"output": str(tmp_path / "runs"), "experiment": "r"}}
    assert run_folder(cfg, "runs/r") == (Path("runs/r"), None)
    cfg = {"train": {"output": str(tmp_path / "runs"), "experiment": "other"}}
    assert "not in" in run_folder(cfg, "runs/r")[1]


def test_resume_a_finished_run_with_more_epochs_recomputes_the_schedule(full_run, workdir):
    """--resume RUN --epochs 3 on a finished 2-epoch run: epoch 3 follows a 3-epoch cosine from 2/3 of
    the way (not the old schedule's floor); the same epochs: nothing to do; fewer: one error line."""
    ref_dir, _ = full_run
    run = workdir / "runs" / "longer"
    shutil.copytree(ref_dir, run)
    p = run_cli("train.py", "--resume", run, check=0)
    assert p.stdout.startswith("nothing to do:") and "--epochs N" in p.stdout, p.stdout
    assert load(run / "last.pth.tar")["num_updates"] == 6  # untouched
    p = run_cli("train.py", "--resume", run, "--epochs", "1")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "already trained 2 epochs" in p.stderr, (
        p.stderr
    )
    shutil.copy(run / "last.pth.tar", run / "after-epoch-2.pth.tar")
    p = run_cli("train.py", "--resume", run, "--epochs", "3", "--experiment", "elsewhere", check=0)
    assert "resume: epochs 2 -> 3; lr schedule recomputed for 3 epochs x 3 updates" in p.stdout, p.stdout
    # the run stays in its folder, says so, and its config.yaml says where it is
    assert f"continues in its own folder {run}, not in" in p.stdout + p.stderr
    assert configs.load_config([str(run / "config.yaml")])["train"]["experiment"] == "longer"
    # an older checkpoint of the folder would overwrite epoch 3 there: refused, nothing touched
    before = (run / "last.pth.tar").read_bytes()
    older = run_cli("train.py", "--resume", run / "after-epoch-2.pth.tar", "--epochs", "4")
    assert older.returncode == 2 and "is behind its run's last.pth.tar" in older.stderr, older.stderr
    assert (run / "last.pth.tar").read_bytes() == before
    # the saved optimizer and schedule continue: an optimizer change would be recorded, not used
    changed = run_cli("train.py", "--resume", run, "--epochs", "4", "--lr", "0.5", "--opt", "sgd")
    assert changed.returncode == 2 and "optim.opt 'adamw' -> 'sgd'" in changed.stderr, changed.stderr
    assert (run / "last.pth.tar").read_bytes() == before
    assert "67% of training done" in p.stdout
    # timm's cosine (no warm-up prefix) over 9 updates, by hand: lr_min + (lr - lr_min)(1 + cos(pi u / 9)) / 2
    lr, lr_min = 1e-3, configs.load_config([str(run / "config.yaml")])["sched"]["min_lr"]
    logged = tensorboard_scalars(run, "train/lr")
    for u in (7, 8):
        want = lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * u / 9))
        assert logged[u] == pytest.approx(want, rel=1e-6), (u, logged)
    assert [r["epoch"] for r in csv.DictReader((run / "summary.csv").open())] == ["1", "2", "3"]


def test_failed_start_leaves_no_run_folder_and_a_kept_one_logs_the_error(full_run, workdir):
    _, cfg = full_run
    p = run_cli(
        "train.py",
        "-c",
        cfg,
        "--output",
        workdir / "runs",
        "--experiment",
        "bad",
        "data.dataset=folder",
        "data.root=" + str(workdir / "no_such_data"),
        timeout=120,
    )
    assert p.returncode == 2 and "no_such_data" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert not (workdir / "runs" / "bad").exists()
    # a resumed run that can't start keeps its folder; its train.log says why
    run = workdir / "runs" / "stopped_bad"
    shutil.copytree(full_run[0], run)
    p = run_cli("train.py", "--resume", run, "--epochs", "3", "model.kwargs.embed_dim=8", timeout=120)
    assert p.returncode == 2 and "does not match model" in p.stderr, p.stderr
    assert (run / "last.pth.tar").is_file()
    assert p.stderr.strip() in (run / "train.log").read_text()


def test_layer_decay_logs_the_requested_lr(full_run, workdir):
    """Under --layer-decay the logged lr is the schedule's (the head group's), not the stem's scaled
    one; one summary line of the groups; more classes than the data: one warning line; an unreadable
    image: warned once and counted at the end."""
    ref_dir, cfg = full_run
    data = workdir / "data_ld"
    shutil.copytree(workdir / "data", data)
    broken = sorted((data / "train").rglob("*.png"))[5]
    broken.write_bytes(b"not an image")
    p = run_cli(
        "train.py", "-c", cfg, "--output", workdir / "runs", "--experiment", "ld", "--layer-decay", "0.5",
        "--num-classes", "4", "train.stop_after_updates=3", "data.dataset=folder", f"data.root={data}",
        check=0,
    )  # fmt: skip
    assert "layer decay 0.5: " in p.stdout and "param groups, lr x 0.0" in p.stdout, p.stdout
    assert p.stdout.count("model.num_classes=4 is more than the 3 dataset classes") == 1
    ref = list(csv.DictReader((ref_dir / "summary.csv").open()))[0]
    row = list(csv.DictReader((workdir / "runs" / "ld" / "summary.csv").open()))[0]
    assert float(row["lr"]) == pytest.approx(float(ref["lr"]), rel=1e-9)
    out = p.stdout + p.stderr
    assert out.count(broken.name) == 2, out  # warned once, by name, and named in the count at the end
    assert f"skipped unreadable images: 1 train, 0 val ({broken}); delete or replace them" in out


@pytest.mark.parametrize(
    "old, new, repeated",
    [
        ((2, 4, 2), (1, 4, 2), 0),  # (processes, batch, batches done) -> the torchrun -> 1 process
        ((1, 4, 4), (2, 4, None), 0),
        ((1, 4, 2), (2, 4, None), 8),  # 8 images = 2 batches of 4: not a whole batch of 2 x 4
        ((1, 4, 6), (1, 2, None), 0),  # a smaller batch
    ],
)
def test_resume_position_in_new_batches_sees_each_image_once(old, new, repeated):
    """Mid-epoch, with another number of processes or batch size: the images the epoch has not seen
    yet are exactly the ones the resumed run feeds (the sampler's order, read rank by rank)."""
    from engine.resume import move_start_batch
    from engine.sampling import ResumableSampler

    size, (w0, b0, done), (w1, b1, _) = 48, old, new
    seen = [i for r in range(w0) for i in list(ResumableSampler(size, w0, r, seed=3))[: done * b0]]
    start_batch = move_start_batch({"schedule": {"global_batch": w0 * b0}}, 0, done, w1 * b1, accum=2)
    assert start_batch % 2 == 0  # an update boundary (accumulation 2)
    rest = []
    for r in range(w1):
        sampler = ResumableSampler(size, w1, r, seed=3)
        sampler.set_epoch(0, start_batch * b1)
        rest += list(sampler)
    assert sorted(set(seen) | set(rest)) == list(range(size))  # nothing skipped
    assert len(seen) + len(rest) - size == repeated  # seen twice: only where it can't be avoided


def test_a_fixed_size_model_takes_the_data_size_or_says_they_differ():
    """Swin / ViT are built for one input size (timm's fixed_input_size): data.img_size reaches them as
    their img_size kwarg; a config naming another size is one error, not an assertion at batch one."""
    from engine.factory import create_model, fit_fixed_input_size

    swin = {"name": "swin_tiny_patch4_window7_224", "kwargs": {"window_size": 4, "embed_dim": 16}}
    fit_fixed_input_size(swin, 64)
    assert swin["kwargs"] == {"window_size": 4, "embed_dim": 16, "img_size": 64}
    model = create_model(swin["name"], 3, swin)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(configs.ConfigError, match="model.kwargs.img_size=64 but data.img_size=32"):
        fit_fixed_input_size(swin, 32)
    nat = {"name": "nat_mini", "kwargs": {}}
    fit_fixed_input_size(nat, 64)  # any size: nothing to fit
    assert nat["kwargs"] == {}


def test_of_two_opposite_switches_the_last_one_given_wins():
    """--amp and --no-amp set one key: the later flag decides, as for any CLI (--no-amp --amp gave
    amp false before, whatever the order)."""
    cli = load_entry_point("train.py")

    def amp(*argv):
        return [o for o in cli.overrides_from_args(cli.parse_args(list(argv))) if "amp=" in o]

    assert amp("--no-amp", "--amp") == ["train.amp=true"]
    assert amp("--amp", "--no-amp") == ["train.amp=false"]
    assert amp() == []


def test_bare_overrides_on_both_sides_of_an_option():
    cli = load_entry_point("train.py")
    args = cli.parse_args(["-c", "x.yaml", "data.workers=2", "--epochs", "2", "train.seed=3"])
    assert cli.overrides_from_args(args) == ["sched.epochs=2", "data.workers=2", "train.seed=3"]


def test_a_folder_the_user_cannot_read_is_one_error_line(full_run, workdir, capsys, monkeypatch):
    """Data the user may not read (or an output folder they may not write): one line naming the path
    and the fix, no traceback. Root reads everything, so the refusal is simulated at os.scandir."""
    _, cfg = full_run
    data_root, scandir = str(workdir / "data"), os.scandir

    def refusing_scandir(path="."):
        if str(path).startswith(data_root):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    train = load_entry_point("train.py")
    assert train.main(["-c", str(cfg), "--output", str(workdir / "runs"), "--experiment", "perm"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: permission denied: '{data_root}"), lines
    assert "give this user access" in lines[0]
    assert not (workdir / "runs" / "perm").exists()


def test_iterating_the_loaders_leaves_the_global_rng_alone(workdir):
    """A DataLoader iterator draws its workers' base seed from the loader's generator, else from the
    global RNG, which drop path and mixup also draw from. timm's eval loader keeps its workers, so only
    the first validation drew: a resumed run's first validation drew where the uninterrupted run had
    not, and with data.workers > 0 `--resume` was no longer exact."""
    from data import build_datasets
    from engine.factory import checkpoint_data_config, create_model, data_build_config
    from engine.train_data import build_loaders

    cfg = configs.load_config([str(write_config(workdir / "rng.yaml", workdir / "data"))], ["data.workers=2"])
    d = cfg["data"]
    model = create_model(cfg["model"]["name"], 3, cfg["model"])
    data_config = checkpoint_data_config(model, {k: d[k] for k in ("img_size", "crop_pct", "mean", "std")})
    loaders = build_loaders(
        cfg, build_datasets(data_build_config(cfg)), data_config, 1, 0, torch.device("cpu")
    )
    for loader in (loaders.train, loaders.eval, loaders.eval):  # the eval loader twice: its workers persist
        before = torch.get_rng_state()
        next(iter(loader))
        assert torch.equal(torch.get_rng_state(), before), loader


def test_agc_clips_every_parameter_but_the_classifier(tmp_path, monkeypatch):
    """Adaptive gradient clipping leaves the head out (its paper; timm's train.py drops the last two
    parameters, the classifier's); norm clipping takes every parameter."""
    import timm.utils

    from engine.train_command import train

    clipped = {}
    monkeypatch.setattr(
        timm.utils, "dispatch_clip_grad", lambda p, v, mode: clipped.setdefault(mode, list(p))
    )
    for mode in ("agc", "norm"):
        cfg = write_config(
            tmp_path / f"{mode}.yaml", tmp_path / "data", optim={"clip_grad": 0.1, "clip_mode": mode}
        )
        overrides = [
            f"train.output={tmp_path / 'runs'}",
            f"train.experiment={mode}",
            "train.stop_after_updates=1",
        ]
        assert train([str(cfg)], overrides) == 0
    shapes = {mode: [tuple(p.shape) for p in params] for mode, params in clipped.items()}
    assert shapes["agc"] == shapes["norm"][:-2] and [len(s) for s in shapes["norm"][-2:]] == [2, 1]
    assert shapes["norm"][-2][0] == shapes["norm"][-1][0] == 3  # the classifier: 3 classes


def test_the_schedule_settings_timm_takes_and_those_it_refuses(tmp_path):
    """plateau watches the val metric in its direction (a falling loss is progress) and resumes with
    its own settings; sched=none (timm's "no scheduler") is one error; the cooldown counts only where
    timm's scheduler adds it (cosine), so a finished multistep run has nothing left to do; step's period and
    plateau's patience are the config's."""
    from engine.resume import (
        build_scheduler,
        geometry_changes,
        restore_schedule,
        scheduled_epochs,
        scheduler_state,
    )

    def plateau(metric):
        weights = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.SGD([weights], lr=1.0)
        s = configs.load_config([], ["sched.sched=plateau", "sched.step_on_updates=false"])["sched"]
        return optimizer, build_scheduler(optimizer, dict(s, warmup_epochs=0), 4, metric)[0]

    optimizer, scheduler = plateau("loss")
    for epoch in range(15):  # a loss that falls every epoch: no plateau, the lr stays
        scheduler.step(epoch + 1, 1.0 - 0.05 * epoch)
    assert optimizer.param_groups[0]["lr"] == 1.0
    saved = {"scheduler": scheduler.state_dict(), "schedule": {}}
    assert geometry_changes(saved, plateau("loss")[1], {"num_epochs": 300}) == []
    with pytest.raises(configs.ConfigError, match="sched.sched=none is not supported; for a constant lr"):
        build_scheduler(optimizer, configs.load_config([], ["sched.sched=none"])["sched"], 4)
    step = [
        "sched.sched=step",
        "sched.decay_epochs=2",
        "sched.warmup_epochs=0",
        "sched.step_on_updates=false",
    ]
    scheduler = build_scheduler(optimizer, configs.load_config([], step)["sched"], 4)[0]
    lrs = [scheduler._get_lr(epoch)[0] for epoch in range(5)]  # timm's default decay_epochs is 90
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])
    flat = ["sched.sched=plateau", "sched.patience_epochs=1", "sched.step_on_updates=false"]
    scheduler = build_scheduler(optimizer, dict(configs.load_config([], flat)["sched"], warmup_epochs=0), 4)[
        0
    ]
    for epoch in range(3):  # top-1 stuck at 50: a decay once one epoch has passed without progress
        scheduler.step(epoch + 1, 50.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # patience 10 (timm's default): 1.0
    # resumed mid-plateau, it decays at the epoch the uninterrupted run does (timm's own state dict
    # forgets the bad-epoch count: the resumed run would wait a whole patience again)
    patient = ["sched.sched=plateau", "sched.patience_epochs=3", "sched.step_on_updates=false"]
    s = dict(configs.load_config([], patient)["sched"], warmup_epochs=0)
    lrs = {}
    for stop in (None, 2):
        weights = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.SGD([weights], lr=1.0)
        scheduler, lrs[stop] = build_scheduler(optimizer, s, 4)[0], []
        for epoch in range(1, 7):
            scheduler.step(epoch, 50.0)
            lrs[stop].append(optimizer.param_groups[0]["lr"])
            if epoch == stop:
                torch.save({"scheduler": scheduler_state(scheduler)}, tmp_path / "ck.pth")
                ck = torch.load(tmp_path / "ck.pth", weights_only=True)
                ck.update(schedule={}, optimizer=optimizer.state_dict())
                optimizer = torch.optim.SGD([weights], lr=1.0)
                scheduler = build_scheduler(optimizer, s, 4)[0]
                shape = dict(num_epochs=300, updates_per_epoch=4, global_batch=8, world_size=1)
                resumed = dict(start_epoch=epoch, start_batch=0, batches_per_epoch=4, accum=1, shape=shape)
                restore_schedule(ck, scheduler, optimizer, "plateau", **resumed)
    assert lrs[2] == lrs[None] and lrs[None][-1] == pytest.approx(0.1) and lrs[None][3] == 1.0
    cooldown = ["sched.epochs=2", "sched.cooldown_epochs=3", "sched.warmup_epochs=0"]
    assert scheduled_epochs(configs.load_config([], [*cooldown, "sched.sched=cosine"])) == 5
    assert scheduled_epochs(configs.load_config([], [*cooldown, "sched.sched=multistep"])) == 2
