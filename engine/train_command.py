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
from engine.errors import EXIT_ERROR, EXIT_INTERRUPTED, TrainingError, first_line, lost_peer, user_errors
from engine.resume import finished, resolve_run_config
from engine.run_log import log_to_file
from engine.trainer import Run


def train(
    config_paths: list[str], overrides: list[str], resume: str | None = None, print_config: bool = False
) -> int:
    """The train command: the exit status (0; 2 after a one-line `error:` for a user mistake;
    130/143 when interrupted)."""
    errors = user_errors()
    rank, run = int(os.environ.get("RANK", 0)), None
    try:
        cfg, resume_path, resume_ckpt = resolve_run_config(config_paths, overrides, resume)
        if print_config:
            print(configs.dump_config(cfg), end="")
            return 0
        if resume_ckpt is not None and finished(cfg, resume_ckpt, resume_path):
            return 0
        run = Run(cfg, resume_path, resume_ckpt)
        return run.fit()
    except errors as e:
        # Set-up errors are every rank's alike (one config, one dataset), and the ranks agree on a NaN:
        # rank 0 says them. In the loop a rank can meet its own (a damaged file in its shard): it does.
        own = run is not None and run.distributed and not isinstance(e, TrainingError)
        if rank == 0 or own:
            line = f"error: {f'rank {rank}: ' if own else ''}{first_line(e)}"
            print(line, file=sys.stderr)
            log_to_file(line)  # a kept run folder's train.log says why it stopped
        return EXIT_ERROR
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        line = f"error: rank {rank}: another process of the run stopped (its error is above)"
        print(line, file=sys.stderr)
        log_to_file(line)
        return EXIT_ERROR
    except KeyboardInterrupt:  # a second Ctrl-C: it reaches every rank of a torchrun, rank 0 says it
        if rank == 0:
            print("interrupted before a checkpoint could be saved", file=sys.stderr)
        return EXIT_INTERRUPTED["SIGINT"]
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
