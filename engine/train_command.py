"""train.py's command: `train(...)` resolves the config (or a resumed checkpoint's), stops early when
the resumed run is already finished, runs `Run(...).fit()` and turns a user mistake into one
`error:` line and exit status 2 (also into a kept run folder's train.log).

Owns the command's outcome (exit status, what is printed); engine/trainer.py owns the run itself.
"""

from __future__ import annotations

import os
import sys

import torch

import configs
from engine.errors import EXIT_ERROR, EXIT_INTERRUPTED, first_line, user_errors
from engine.resume import finished, resolve_run_config
from engine.run_log import log_to_file
from engine.trainer import Run


def train(
    config_paths: list[str], overrides: list[str], resume: str | None = None, print_config: bool = False
) -> int:
    """The train command: the exit status (0; 2 after a one-line `error:` for a user mistake;
    130/143 when interrupted)."""
    errors = user_errors()
    try:
        cfg, resume_path, resume_ckpt = resolve_run_config(config_paths, overrides, resume)
        if print_config:
            print(configs.dump_config(cfg), end="")
            return 0
        if resume_ckpt is not None and finished(cfg, resume_ckpt, resume_path):
            return 0
        return Run(cfg, resume_path, resume_ckpt).fit()
    except errors as e:
        rank = int(os.environ.get("RANK", 0))
        if rank == 0:
            print(f"error: {first_line(e)}", file=sys.stderr)
            log_to_file(f"error: {first_line(e)}")  # a kept run folder's train.log says why it stopped
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted before a checkpoint could be saved", file=sys.stderr)
        return EXIT_INTERRUPTED["SIGINT"]
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
