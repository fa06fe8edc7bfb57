"""ImageNet-layout data: file lists, loaders (DALI, torchvision, synthetic) and label noise.

`build_loader` is the one entry point of the trainer, the evaluator, the benchmarks and the
tests. Every backend shards the same way (`ran_bench.data.sampling`) and yields
`(images, labels)` batches already on `device`.
"""

from __future__ import annotations

import logging
import os
import random

import torch

from ran_bench.config import AUGMENTATIONS
from ran_bench.data.dali import DaliLoader
from ran_bench.data.folder import IMG_EXTENSIONS, MEAN_255, STD_255, DatasetLayoutError, find_classes, list_samples
from ran_bench.data.sampling import (
    UnreadableFileError,
    UnreadableImagesError,
    check_shard_args,
    train_per_rank,
    val_range,
)
from ran_bench.data.synthetic import SyntheticLoader
from ran_bench.data.torchvision_loader import TorchvisionLoader
from ran_bench.errors import InputError
from ran_bench.runtime import dali_available
from ran_bench.slurm_env import SlurmEnvError, tasks_on_node

__all__ = ["build_loader", "list_samples", "find_classes", "corrupt_labels", "dali_available",
           "default_num_threads", "DatasetLayoutError", "UnreadableFileError", "UnreadableImagesError",
           "IMG_EXTENSIONS", "MEAN_255", "STD_255", "BACKENDS", "AUGMENTATIONS", "IMAGENET_TRAIN_SIZE",
           "IMAGENET_VAL_SIZE"]

log = logging.getLogger("ran_bench.data")

BACKENDS = ("dali", "torchvision", "synthetic")
IMAGENET_TRAIN_SIZE = 1_281_167
IMAGENET_VAL_SIZE = 50_000


def default_num_threads() -> int:
    """This process's share of the CPU cores it may run on, at most 8.

    The affinity mask is shared by the LOCAL_WORLD_SIZE processes of the node (torchrun or
    `accelerate launch` in one SLURM task), unless every rank is its own SLURM task bound to
    its own CPUs (submitit, `srun --ntasks-per-node=8 --cpus-per-task=8` with task/affinity):
    then the mask is this rank's share already and dividing again would leave 1 thread.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if local > 1 and _mask_is_per_rank(cores, local):
        local = 1
    return max(1, min(8, cores // local))


def _mask_is_per_rank(cores: int, local_world_size: int) -> bool:
    """True inside a SLURM step with one task per rank on this node whose mask holds at most
    --cpus-per-task cores."""
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    tasks = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if not per_task.isdigit() or not tasks or cores > int(per_task):
        return False
    try:
        return tasks_on_node(tasks, int(os.environ.get("SLURM_NODEID", "0"))) >= local_world_size
    except (SlurmEnvError, ValueError):
        return False


def corrupt_labels(labels: list[int], fraction: float, num_classes: int, seed: int) -> list[int]:
    """A copy of `labels` with exactly round(fraction * N) entries, chosen with `seed`, each
    changed uniformly at random to a *different* class (the paper's label-noise study)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label noise fraction must be in [0, 1], got {fraction}")
    if num_classes < 2 and fraction > 0:
        raise ValueError("label noise needs at least 2 classes")
    rng = random.Random(seed)
    out = list(labels)
    for i in rng.sample(range(len(out)), round(fraction * len(out))):
        new = rng.randrange(num_classes - 1)
        out[i] = new + (new >= out[i])  # skip the true class: uniform over the other classes
    return out


def build_loader(root, split: str, *, size: int, batch_size: int, backend: str = "dali", rank: int = 0,
                 world_size: int = 1, num_threads: int | None = None, seed: int = 0,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32, device="cpu",
                 labels: list[int] | None = None, num_classes: int | None = None,
                 augmentation: str = "imagenet"):
    """A loader of `ROOT/<split>` for one rank: iterate for `(images, labels)` batches on `device`.

    split "train": shuffled per epoch (`loader.set_epoch`) with `seed`, augmented, the ragged tail
    dropped so all ranks run `len(loader)` batches. Other splits: resize + centre crop, no
    shuffle, every image exactly once across ranks, last batch possibly smaller.
    `augmentation` "imagenet": train = random-resized crop + flip, val = shorter side to
    size / 0.875 + centre crop. "cifar" (the paper's CIFAR recipe): shorter side to `size` +
    centre crop (the identity for 32x32 images), and for train 4-pixel zero padding, a random
    size x size crop and a flip. The synthetic backend ignores it.
    `labels` overrides the folder labels (index = position in `list_samples(root, split)[0]`).
    `num_threads` is decoding threads (DALI) or worker processes (torchvision; 0 = in-process).
    backend "dali" falls back to torchvision when DALI is not importable; "synthetic" makes
    random tensors (root may be None: then ImageNet-1K's sample counts, and `num_classes` is needed).
    Every loader lists the images it replaced by a flat image in `loader.bad_files`; a listed
    file that cannot be read raises UnreadableFileError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown data backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if augmentation not in AUGMENTATIONS:
        raise InputError(f"data.augmentation must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r} "
                         f"(cifar: the paper's CIFAR recipe, imagenet: random-resized crops)")
    check_shard_args(rank, world_size, batch_size)
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    num_threads = default_num_threads() if num_threads is None else num_threads
    common = dict(split=split, size=size, batch_size=batch_size, rank=rank, world_size=world_size,
                  seed=seed, channels_last=channels_last, dtype=dtype, device=torch.device(device))

    if backend == "synthetic":
        if root is not None:
            files, _, classes = list_samples(root, split)
            n, num_classes = len(files), num_classes or len(classes)
        else:
            n = IMAGENET_TRAIN_SIZE if split == "train" else IMAGENET_VAL_SIZE
        if not num_classes:
            raise ValueError("the synthetic backend without a data root needs num_classes")
        if split == "train":
            per_rank = train_per_rank(n, world_size=world_size, batch_size=batch_size)
        else:
            per_rank = len(val_range(n, rank=rank, world_size=world_size))
        return SyntheticLoader(num_samples=per_rank, num_classes=num_classes, **common)

    if root is None:
        raise ValueError(f"the {backend} backend needs a data root (ROOT/{split}/<wnid>/*.JPEG)")
    files, folder_labels, classes = list_samples(root, split)
    if labels is not None:
        if len(labels) != len(files):
            raise ValueError(f"labels has {len(labels)} entries but {root}/{split} has {len(files)} images")
        bad = [x for x in labels if not 0 <= int(x) < len(classes)]
        if bad:
            raise ValueError(f"labels contains class indices outside 0..{len(classes) - 1}: {bad[:5]}")
        folder_labels = [int(x) for x in labels]
    if backend == "dali" and dali_available():
        return DaliLoader(files, folder_labels, num_threads=max(1, num_threads), augmentation=augmentation,
                          **common)
    return TorchvisionLoader(files, folder_labels, num_threads=num_threads, augmentation=augmentation, **common)
