"""Two-process DDP (torchrun, gloo on CPU): the data is sharded, the ranks stay in step, rank 0 writes."""

from __future__ import annotations

import csv

from test_train import load, run_cli, write_config


def test_two_process_gloo_run(tmp_path):
    cfg = write_config(tmp_path / "tiny.yaml", tmp_path / "data", sched={"epochs": 1, "warmup_epochs": 0})
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
        timeout=400,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    run = tmp_path / "runs" / "ddp"
    ck = load(run / "last.pth.tar")
    # 24 images over 2 ranks = 12 each; batch 4 -> 3 batches; accum 2 -> 2 updates (the last one partial)
    assert ck["num_updates"] == 2
    assert not any(k.startswith("module.") for k in ck["state_dict"])  # saved unwrapped
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert len(rows) == 1 and float(rows[0]["eval_top1"]) >= 0
    assert p.stdout.count("epoch 1/1") == 1  # only rank 0 logs
