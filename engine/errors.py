"""User-facing errors: the exception types that are the user's mistake, and how a command reports them.

Owns the contract of every entry point: a bad input (config, checkpoint, data, a diverged run) is ONE
line `error: ...` on stderr and exit status 2, never a traceback; an interrupted run exits 130/143 as
shells expect. Library code raises the ValueError subclasses below (or configs.ConfigError /
data.DataError) with a message that names the problem and the fix.
"""

from __future__ import annotations

from configs import ConfigError

EXIT_ERROR = 2
EXIT_INTERRUPTED = {"SIGINT": 130, "SIGTERM": 143}


class CheckpointError(ValueError):
    """A checkpoint can't be read or doesn't fit the model; the message says what to do."""


class TrainingError(RuntimeError):
    """Training can't go on (e.g. non-finite loss); the last good checkpoint is kept."""


def user_errors() -> tuple:
    """Exception types that are the user's input, reported as one line without a traceback."""
    errors = [
        ConfigError,
        CheckpointError,
        TrainingError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
    ]
    try:
        from data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another process of the run stopped (gloo raises a
    plain RuntimeError naming the closed connection; NCCL and the store, torch's DistError types)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    text = str(e)
    return isinstance(e, dist.DistError) or ("gloo" in text and "by peer" in text)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty); a
    refused path says what to do about it."""
    if isinstance(e, PermissionError) and e.filename:
        return f"permission denied: '{e.filename}'; give this user access (chmod/chown) or pick another path"
    text = str(e).strip()
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:  # raised in a DataLoader worker:
        last = text.splitlines()[-1]  # torch's message is its traceback, the error's own line last
        return last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(e).__name__
