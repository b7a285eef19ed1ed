"""Resumable randomness: the training order and every RNG state, so a stopped run continues exactly.

Owns what makes `--resume` bit-exact: the sampler whose order depends only on (seed, epoch) and can
start mid-epoch (one order over all ranks, whatever their number), the dataset wrapper that seeds
each sample's augmentation from (seed, epoch, index), and the snapshot / restore of the python,
numpy, torch and CUDA generators (as tensors and plain types, so checkpoints stay
weights_only-loadable). Also the unpadded val shard of one rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import signal
from collections.abc import Iterator

import numpy as np
import torch


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


class EvalShard(torch.utils.data.Dataset):
    """One rank's share of the val set for distributed validation: every `num_replicas`-th image from
    `rank`, unpadded, so summed over ranks each image counts once (timm's distributed eval sampler
    pads the set to a multiple of the ranks: a top-1 that differs from eval.py's)."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        self.dataset, self.indices = dataset, range(rank, len(dataset), num_replicas)

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):  # timm's create_loader sets the eval transform here
        self.dataset.transform = value

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]]


@contextlib.contextmanager
def isolated_rng(seed: int):
    """Seed python/numpy/torch (CPU) for one sample, then put the caller's RNG states back."""
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    # The CPU generator only, where transforms draw: torch.manual_seed would also re-seed the CUDA
    # generators (left changed after the sample) and, before CUDA starts, queue that with a stack
    # trace: 0.5 ms a sample, a fifth of a small model's training step on the study's data.
    torch.random.default_generator.manual_seed(seed)
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


def rank_rng_states(world_size: int) -> list[dict]:
    """Every rank's `rng_state()`, rank by rank (collective: every rank calls it). Ranks seed
    differently (drop path, mixup), so a resumed rank needs its own state, not rank 0's."""
    states = [None] * world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


def restore_rng_state(ck: dict, rank: int):
    """This rank's RNG state from a training checkpoint: its own when the run that saved it had
    this rank (`rng_ranks`, from DDP), else the single `rng`; a rank it did not have keeps its seed."""
    states = ck.get("rng_ranks") or ([ck["rng"]] if ck.get("rng") else [])
    if rank < len(states):
        set_rng_state(states[rank])


def set_rng_state(state: dict):
    """Put back what `rng_state` saved (CUDA only when the device count matches)."""
    py = state["python"]
    random.setstate((3, tuple(py), None))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def loader_worker_init(worker_id: int) -> None:
    """DataLoader workers leave the training process's group: Ctrl-C or a scheduler signals the whole
    process group, and a worker killed by that made the main loop fail ("DataLoader worker ... is
    killed by signal") before it could save (inherited Python handlers also printed the notice once
    per worker). The main process still ends its workers itself (torch's worker SIGTERM handler exits
    cleanly on the parent's signal) and they die with it (PR_SET_PDEATHSIG). Then timm's seeding.

    A worker forked by `worker_batches` starts with those signals held: one sent to the group before
    it left is pending here, and is taken off (its handlers untouched: torch's C SIGTERM handler is
    what ends a worker when the parent asks) before they are let through."""
    from timm.data.loader import _worker_init

    os.setpgid(0, 0)
    for sig in signal.sigpending() & STOP_SIGNALS:
        signal.sigtimedwait([sig], 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _worker_init(worker_id)


def worker_batches(loader) -> Iterator:
    """`iter(loader)`, its workers forked with SIGINT / SIGTERM held: a group signal in the moment
    between a worker's fork and its `loader_worker_init` killed it (at every epoch's start, where a
    job scheduler's signal often lands). The training process gets a held signal when the hold ends."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
