"""Preemption-safe training checkpoints: `RUN_DIR/checkpoints/step_XXXXXXXX.pt`.

A checkpoint is one `torch.save` file holding only tensors and plain Python values (dicts, lists,
ints, floats, strings), so it is read with `torch.load(weights_only=True)` and loading never
unpickles arbitrary objects. It holds the model, optimizer, LR scheduler and grad scaler states,
the step and epoch, and for every rank its RNG states and data-loader position, which is what an
exact resume needs. The main process writes it atomically (temporary file in the same folder,
fsync, rename, fsync of the folder): a crash leaves the previous checkpoint or the new one,
never a half-written file under a checkpoint's name. The newest `keep_last` are kept;
an unreadable one found on resume is renamed aside (`load_latest`). `Checkpoint` is the file's
schema: every writer and reader goes through it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ran_bench.errors import StorageError, UserError
from ran_bench.fileio import atomic_write, storage_errors

FORMAT = "ran-bench-checkpoint"
VERSION = 2  # 2: the training record (device, precision, cumulative throughput and GPU time)
_NAME = re.compile(r"^step_(\d{8,})\.pt$")

log = logging.getLogger("ran_bench.checkpoint")


class CheckpointError(RuntimeError, UserError):
    """A checkpoint file that is truncated, corrupt, or not a ran-bench checkpoint."""


class CheckpointUnavailable(CheckpointError):
    """A checkpoint that may well be good but cannot be used now: the storage failed to read it,
    or another ran-bench version wrote it. Never set aside or skipped: resuming from an older
    checkpoint instead would silently throw away the steps since then."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint file (format VERSION): all the trainer needs to continue
    bitwise, and all results.json reports about the training run, whichever machine writes it."""

    step: int
    epoch: int
    epochs: float  # images seen / images per epoch
    images_seen: int
    world_size: int
    num_classes: int
    params: int
    macs: int  # multiply-adds of one forward pass at macs_input_size
    macs_input_size: int
    # The training run, over all its segments (one per launch), as results.json reports it.
    device_type: str
    device_name: str
    precision: str
    elapsed_s: float
    device_seconds: float
    train_images: int
    train_seconds: float
    skipped_files: list[str]  # training files replaced by a flat image, all ranks
    # Exact resume: the states, and per rank its RNG states, loader position, bad files and the
    # loss window not yet logged ({"rng", "data", "bad_files", "window"}).
    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    ranks: list[dict]
    config: str  # the run's resolved YAML config
    eval_due: bool = False  # stopped by a signal at a step whose evaluation the resumed run owes
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every tensor of the model and optimizer states.
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, state: dict[str, Any], where: str) -> Checkpoint:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in state
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise CheckpointError(f"{where}: a ran-bench checkpoint without {', '.join(missing)}; it was not "
                                  "written by the trainer")
        return cls(**{k: v for k, v in state.items() if k in names})


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files of a folder, oldest step first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), ckpt_dir / name) for name in os.listdir(ckpt_dir) if (m := _NAME.match(name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(ckpt_dir: str | os.PathLike, checkpoint: Checkpoint, keep_last: int) -> Path:
    """Write `checkpoint` as the file of its step atomically, then delete all but the newest
    `keep_last` checkpoints. Call on the main process only. A file system that refuses the write
    (full, read-only) raises a StorageError; the temporary file is removed and the checkpoints
    already there are left as they were."""
    ckpt_dir = Path(ckpt_dir)
    path = checkpoint_path(ckpt_dir, checkpoint.step)
    # Serialised in memory first: a full disk is then one OSError from a plain write, not torch's
    # zip writer failing half-way through (ENOSPC, then a RuntimeError of its own).
    data = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **checkpoint.to_dict()}, data)
    try:
        with storage_errors(f"write {path}"):
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            # Temporary files left by a writer that was killed mid-write; only the main process writes.
            for stale in ckpt_dir.glob(".step_*.pt.*.tmp"):
                stale.unlink(missing_ok=True)
        with atomic_write(path, "wb") as f:
            f.write(data.getbuffer())
    except StorageError as e:
        previous = list_checkpoints(ckpt_dir)
        kept = f"the newest checkpoint, {previous[-1]}, is intact" if previous else "there is no earlier checkpoint"
        raise StorageError(f"checkpoint not written: {e}; {kept}. Free space on (or fix) that file system "
                           "and run the same command again to resume") from e
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint (tensors to CPU) with `weights_only=True`; CheckpointError names the file."""
    path = Path(path)
    # Read the bytes first: an error here is the file system's (EIO, ESTALE, EACCES), while every
    # error of torch.load on bytes in memory is the file's own (torch.load on a truncated file
    # raises OSError too, so the two cannot be told apart otherwise).
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except OSError as e:
        raise CheckpointUnavailable(
            f"{path}: cannot be read ({type(e).__name__}: {e}); this is a storage error, not a corrupt "
            "checkpoint, so it is left as it is: run again when the file system reads it") from None
    if not data.startswith(b"PK\x03\x04"):  # torch.save has written zip archives since PyTorch 1.6
        what = "an empty file" if not data else "not a PyTorch file (not the zip archive torch.save writes)"
        raise CheckpointError(f"{path}: {what}; it is corrupt (for example left empty or zero-filled by a crash) "
                              "or another kind of file, not a ran-bench checkpoint")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncation and corruption surface as many exception types
        if "Weights only load failed" in str(e):
            raise CheckpointError(f"{path}: holds pickled Python objects, which ran-bench never loads "
                                  "(torch.load weights_only=True); not a ran-bench checkpoint") from None
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "it is truncated or corrupt (for example written by a job killed mid-write) or not a "
            "PyTorch file") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ran-bench checkpoint (a torch file without "
                              f"format={FORMAT!r}); ran-bench only resumes from its own checkpoints")
    if state.get("version") != VERSION:
        raise CheckpointUnavailable(f"{path}: checkpoint format version {state.get('version')!r}, this "
                              f"ran-bench reads version {VERSION}; resume it with the ran-bench version that wrote "
                              f"it, or start the run again in a new run directory")
    return Checkpoint.from_dict(state, str(path))


def load_latest(ckpt_dir: str | os.PathLike, warn: Callable[[str], None] = log.warning
                ) -> tuple[Path, Checkpoint] | None:
    """The newest readable checkpoint of a folder and its state, or None when there is none.

    An unreadable newer file is reported through `warn`, renamed to `step_XXXXXXXX.pt.corrupt`
    and the previous one is used: renamed, it no longer counts as the newest checkpoint nor takes
    one of the `keep_last` slots, so pruning cannot delete the good checkpoints written after it
    and keep it. If every file is unreadable, CheckpointError lists them and nothing is renamed
    (restarting from scratch silently would throw away the run). A file that cannot be read for
    another reason (CheckpointUnavailable: an I/O error, another format version) stops the search:
    its error is raised and nothing is renamed."""
    paths = list_checkpoints(ckpt_dir)
    errors: list[tuple[Path, str]] = []
    for path in reversed(paths):
        try:
            state = load_checkpoint(path)
        except CheckpointUnavailable:
            raise
        except CheckpointError as e:
            errors.append((path, str(e)))
            continue
        for bad, message in errors:
            aside = bad.with_name(bad.name + ".corrupt")
            try:
                bad.replace(aside)
            except OSError as e:  # a read-only run directory: use the older checkpoint all the same
                warn(f"{message}; falling back to the previous checkpoint (cannot rename it aside: {e})")
            else:
                warn(f"{message}; renamed to {aside.name}, falling back to the previous checkpoint")
        return path, state
    if errors:
        raise CheckpointError(f"no readable checkpoint in {ckpt_dir}:\n  " + "\n  ".join(m for _, m in errors)
                              + "\nmove the folder away to start the run from scratch")
    return None


def find_checkpoint(path: str | os.PathLike, warn: Callable[[str], None] = log.warning
                    ) -> tuple[Path, Checkpoint, Path | None]:
    """The checkpoint a command is pointed at: a run directory's newest readable checkpoint, or a
    checkpoint file. Returns (file, checkpoint, its run directory, or None for a file outside one)."""
    path = Path(path)
    if path.is_dir():
        latest = load_latest(path / "checkpoints", warn=warn)
        if latest is None:
            raise CheckpointError(f"{path / 'checkpoints'} has no checkpoint; is {path} a ran-bench run directory?")
        return latest[0], latest[1], path
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return path, load_checkpoint(path), run_dir


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states as tensors and plain values."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
