"""Two-process DDP (torchrun, gloo on CPU): the data is sharded, the ranks stay in step, rank 0 writes;
validation counts each image once (as eval.py); a resume with one process keeps its place; a
mid-epoch resume with two is exact."""

from __future__ import annotations

import csv
import json

import pytest
from test_train import assert_same_tensors, load, run_cli, write_config


def test_two_process_gloo_run_then_resume_with_one(tmp_path):
    cfg = write_config(
        tmp_path / "tiny.yaml",
        tmp_path / "data",
        data={"synthetic": {"num_classes": 3, "train_per_class": 8, "val_per_class": 3, "image_size": 32}},
        sched={"epochs": 2, "warmup_epochs": 0},
        optim={"lr": None, "lr_base": 1e-3, "lr_base_size": 32, "grad_accum_steps": 2, "clip_grad": 1.0},
    )
    p = run_cli(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        "-c",
        cfg,
        "--output",
        tmp_path / "runs",
        "--experiment",
        "ddp",
        "train.stop_after_updates=2",
        timeout=400,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    run = tmp_path / "runs" / "ddp"
    ck = load(run / "last.pth.tar")
    # 24 images over 2 ranks = 12 each; batch 4 -> 3 batches; accum 2 -> 2 updates (the last one partial)
    assert ck["num_updates"] == 2 and (ck["next_epoch"], ck["next_batch"]) == (1, 0)
    assert not any(k.startswith("module.") for k in ck["state_dict"])  # saved unwrapped
    # timm's lr rule on the global batch: lr_base x (batch 4 x 2 processes x accumulation 2) / 32
    assert ck["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(1e-3 * 16 / 32)
    epoch_1 = ck
    assert p.stdout.count("epoch 1/2") == 1  # only rank 0 logs
    # 9 val images over 2 ranks: each counted once (a padded 10th would make top-1 a multiple of 10)
    row = list(csv.DictReader((run / "summary.csv").open()))[0]
    run_cli("eval.py", run / "last.pth.tar", "-j", "0", "-o", tmp_path / "e.json", check=0)
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["dataset"]["num_images"] == 9
    assert float(row["eval_top1"]) == pytest.approx(evaluated["top1"], abs=1e-3)
    assert float(row["eval_loss"]) == pytest.approx(evaluated["loss"], abs=1e-4)

    # as the log says, with one process: 6 batches of 4 -> 3 updates per epoch, not the saved 2
    p = run_cli("train.py", "--resume", run / "last.pth.tar", check=0)
    assert "resume: updates per epoch 2 -> 3, processes 2 -> 1; lr schedule recomputed" in p.stdout, p.stdout
    assert "50% of training done" in p.stdout
    # half the global batch, half the lr_base rule's peak lr (the schedule is rebuilt for the new run)
    assert "the lr_base rule's peak lr too: 5.00e-04 -> 2.50e-04" in p.stdout
    ck = load(run / "last.pth.tar")
    assert ck["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(1e-3 * 8 / 32)
    assert ck["num_updates"] == 5 and ck["next_epoch"] == 2
    assert [r["epoch"] for r in csv.DictReader((run / "summary.csv").open())] == ["1", "2"]

    # stopped mid-epoch 1 (after 2 of each rank's 3 batches) and resumed with two processes: the
    # weights are the uninterrupted run's bit for bit (each rank gets its own RNG state back, not
    # rank 0's), and so is the epoch's train loss (each rank's part of the epoch counted once)
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py")
    mid = tmp_path / "runs" / "mid"
    args = ("-c", cfg, "--output", tmp_path / "runs", "--experiment", "mid", "train.stop_after_updates=1")
    run_cli(*torchrun, *args, timeout=400, check=0)
    assert load(mid / "last.pth.tar")["next_batch"] == 2
    run_cli(*torchrun, "--resume", mid / "last.pth.tar", "train.stop_after_updates=2", timeout=400, check=0)
    resumed = list(csv.DictReader((mid / "summary.csv").open()))[0]
    ck = load(mid / "last.pth.tar")
    assert_same_tensors(ck["state_dict"], epoch_1["state_dict"], "weights")
    assert_same_tensors(ck["state_dict_ema"], epoch_1["state_dict_ema"], "EMA")
    assert float(resumed["train_loss"]) == pytest.approx(float(row["train_loss"]), rel=1e-6)


def test_damaged_images_in_one_ranks_shard(tmp_path):
    """A damaged file is met by the rank whose shard holds it. The run's last lines name it all the
    same (every rank's finds merged), and a rank that has to give up says why itself ("rank 1: ..."),
    where rank 0 only had a gloo traceback ("Connection closed by peer")."""
    import subprocess

    from test_train import PY, REPO, env

    from data.synthetic import generate_synthetic_dataset

    root = generate_synthetic_dataset(tmp_path / "data", num_classes=3, train_per_class=8, val_per_class=5)
    first_class = sorted((root / "val").iterdir())[0]
    val = sorted(first_class.glob("*.png"))  # val indices 0.., rank r reading r, r + 2, ...
    cfg = write_config(
        tmp_path / "tiny.yaml", root, data={"dataset": "folder"}, sched={"epochs": 1, "warmup_epochs": 0}
    )

    def torchrun(name):
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
        cmd += ["-c", str(cfg), "--output", str(tmp_path / "runs"), "--experiment", name]
        # timm's retry budget down to 2: two damaged files in a row make a rank give up
        run_env = dict(env(), TIMM_DATASET_MAX_RETRIES="2")
        return subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=400)

    val[1].write_bytes(b"not a png")  # rank 1's first val image
    p = torchrun("one")
    assert p.returncode == 0, p.stdout + p.stderr
    line = f"skipped unreadable images: 0 train, 1 val ({val[1]}); delete or replace them"
    assert line in p.stdout and line in (tmp_path / "runs" / "one" / "train.log").read_text()

    val[2].write_bytes(b"not a png either")  # rank 1: index 1, then 2, fails: it gives up
    p = torchrun("two")
    assert p.returncode != 0
    assert f"error: rank 1: 2 consecutive images could not be read ({val[1]}, {val[2]}, ...)" in p.stderr
    assert "error: rank 0: another process of the run stopped (its error is above)" in p.stderr
    assert "[rank0]: Traceback" not in p.stderr, p.stderr
