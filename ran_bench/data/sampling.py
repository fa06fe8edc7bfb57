"""Which sample indices a rank reads, shared by every backend so they shard identically.

Train: the permutation of torch's `DistributedSampler` (`torch.randperm` seeded with
`seed + epoch`), cut to `world_size` equal, whole-batch shards; rank r reads the r-th contiguous
chunk. Contiguous chunks (not DistributedSampler's round-robin) because that is how DALI's
readers split a file list by `shard_id`, so DALI and torchvision read the same images in the same
order. Validation: the contiguous, unpadded slice `[n*rank//world, n*(rank+1)//world)`, DALI's
rule for `shard_id` with `pad_last_batch`, so every image is read exactly once and rank sizes
differ by at most one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ran_bench.errors import UserError

log = logging.getLogger("ran_bench.data")


class UnreadableImagesError(UserError, RuntimeError):
    """Too many images of one batch failed to decode: a broken data set or a wrong root, not
    the odd corrupt file that the loaders replace by a flat image."""


class UnreadableFileError(UserError, OSError):
    """A listed file that cannot be read (no permission, I/O error, vanished): a file-system fault
    that stops the run, unlike an image whose bytes do not decode."""

    def __init__(self, path: str, cause: str):
        super().__init__(f"cannot read {path} ({cause}): a file-system fault, not a bad image; restore the file "
                         f"(fix the file system or copy it back), then start the same command again to resume")
        self.path = path
        self.cause = cause

    def __reduce__(self):  # OSError's pickling would pass the message as the only argument
        return type(self), (self.path, self.cause)


def read_fault(path: str) -> UnreadableFileError | None:
    """The error of reading all of `path` from Python, or None when it reads."""
    try:
        with open(path, "rb") as f:
            f.read()
    except OSError as e:
        return UnreadableFileError(path, e.strerror or str(e))
    return None


def check_bad_share(bad: list[str], batch_size: int) -> None:
    """Raise UnreadableImagesError when `bad` (undecodable files found together) is more than
    half a batch: blanking them would train on flat images without anyone noticing."""
    if len(bad) > 1 and 2 * len(bad) > batch_size:
        raise UnreadableImagesError(
            f"{len(bad)} images in one batch of {batch_size} could not be decoded (e.g. {bad[0]}); "
            f"that is a broken data set or a wrong data root, not a few corrupt files. "
            f"Check it with `ran-bench data verify ROOT`")


def train_order(n: int, *, world_size: int, seed: int, epoch: int, batch_size: int) -> list[int]:
    """One training epoch's sample order for all ranks: rank r's shard is the r-th of
    `world_size` equal chunks, each a whole number of batches (the ragged tail is dropped)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)  # DistributedSampler's seeding
    per_rank = train_per_rank(n, world_size=world_size, batch_size=batch_size)
    return torch.randperm(n, generator=g)[: per_rank * world_size].tolist()


def train_per_rank(n: int, *, world_size: int, batch_size: int) -> int:
    return (n // world_size) // batch_size * batch_size


def train_indices(n: int, *, rank: int, world_size: int, seed: int, epoch: int, batch_size: int) -> list[int]:
    """This rank's sample indices for one training epoch, a whole number of batches long."""
    per_rank = train_per_rank(n, world_size=world_size, batch_size=batch_size)
    order = train_order(n, world_size=world_size, seed=seed, epoch=epoch, batch_size=batch_size)
    return order[rank * per_rank:(rank + 1) * per_rank]


def val_range(n: int, *, rank: int, world_size: int) -> range:
    """This rank's contiguous, unpadded share of `n` evaluation samples."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def check_shard_args(rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


class LoaderBase:
    """The loader contract shared by the backends: epochs, batches per rank, resumable position.

    `state_dict()` is the epoch, the number of batches handed out so far in it and `bad_files`
    (the undecodable files replaced by a flat image so far, cumulative across resumes);
    `load_state_dict(state)` makes the next `iter()` start at the following batch. A pending
    resume survives `set_epoch` with the same epoch and is dropped by a different one; a full
    pass always starts at batch 0, so a validation loader can be iterated again and again.
    """

    backend = ""

    def __init__(self, *, split: str, num_samples: int, batch_size: int, rank: int, world_size: int,
                 seed: int):
        self.split = split
        self.train = split == "train"
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.bad_files: list[str] = []
        self._start = 0  # batch to start at in the next iteration (set by load_state_dict)
        self._consumed = 0  # batches handed out in the current iteration

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
            self._consumed = 0
        self.epoch = epoch

    def _begin(self) -> int:
        start, self._start = self._start, 0
        self._consumed = start
        return start

    def state_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "split": self.split, "epoch": self.epoch,
                "batches": self._consumed, "batch_size": self.batch_size,
                "world_size": self.world_size, "rank": self.rank, "seed": self.seed,
                "num_samples": self.num_samples, "bad_files": list(self.bad_files)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("split", "batch_size", "world_size", "seed", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state was saved with {key}={state[key]!r} but this loader has "
                    f"{key}={getattr(self, key)!r}; resume with the same data, batch size and "
                    f"world size, or start a fresh epoch without load_state_dict")
        if not 0 <= int(state["batches"]) <= len(self):
            raise ValueError(f"loader state position {state['batches']} is outside 0..{len(self)}")
        if state.get("backend", self.backend) != self.backend:
            log.warning("resuming a %s loader state with the %s backend: the next sample is the same, "
                        "the augmentation randomness is not", state.get("backend"), self.backend)
        self.epoch = int(state["epoch"])
        self._start = int(state["batches"])
        self._consumed = self._start
        for path in state.get("bad_files", []):
            if path not in self.bad_files:
                self.bad_files.append(path)

    def _note_bad(self, path: str, error: str) -> None:
        if path not in self.bad_files:
            self.bad_files.append(path)
            log.warning("unreadable image replaced by a flat mean-colour image: %s (%s)", path, error)
