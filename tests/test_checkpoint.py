"""Checkpoint files: atomic writes, last-K pruning, safe loading and fallback past a bad file."""

from __future__ import annotations

import dataclasses
import errno
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_checkpoint
from ran_bench.checkpoint import (
    FORMAT,
    VERSION,
    Checkpoint,
    CheckpointError,
    CheckpointUnavailable,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ran_bench.errors import StorageError


def _state(step: int) -> Checkpoint:
    return make_checkpoint(step, ranks=[{"rng": rng_state(), "data": {"epoch": 1, "batches": 7,
                                                                      "backend": "torchvision"}}])


def test_round_trip_with_weights_only_and_last_k_kept(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, _state(step), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030.pt", "step_00000040.pt"]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    state = load_checkpoint(tmp_path / "step_00000040.pt")
    assert isinstance(state, Checkpoint) and state.step == 40
    assert torch.load(tmp_path / "step_00000040.pt", weights_only=True)["format"] == FORMAT
    assert state.ranks[0]["data"] == {"epoch": 1, "batches": 7, "backend": "torchvision"}
    assert set(state.optimizer["state"][0]) == {"momentum_buffer"}
    written = _state(40)
    for f in dataclasses.fields(Checkpoint):  # every field of the schema comes back as written
        if f.name not in ("model", "optimizer", "ranks"):
            assert getattr(state, f.name) == getattr(written, f.name), f.name


def test_a_ran_bench_file_without_a_field_of_the_schema_is_refused(tmp_path):
    state = _state(3).to_dict()
    del state["train_seconds"]
    torch.save({"format": FORMAT, "version": VERSION, **state}, tmp_path / "step_00000003.pt")
    with pytest.raises(CheckpointError, match=r"step_00000003.pt: a ran-bench checkpoint without train_seconds"):
        load_checkpoint(tmp_path / "step_00000003.pt")


def test_truncated_newest_falls_back_to_the_previous_one_with_a_clear_message(tmp_path):
    save_checkpoint(tmp_path, _state(1), keep_last=3)
    newest = save_checkpoint(tmp_path, _state(2), keep_last=3)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a write cut short
    warnings = []
    path, state = load_latest(tmp_path, warn=warnings.append)
    assert path.name == "step_00000001.pt" and state.step == 1
    assert len(warnings) == 1
    assert str(newest) in warnings[0] and "truncated or corrupt" in warnings[0]
    assert "renamed to step_00000002.pt.corrupt, falling back to the previous checkpoint" in warnings[0]


def test_a_corrupt_checkpoint_is_set_aside_and_no_longer_takes_a_keep_last_slot(tmp_path):
    save_checkpoint(tmp_path, _state(4), keep_last=2)
    corrupt = save_checkpoint(tmp_path, _state(8), keep_last=2)
    corrupt.write_bytes(b"\0" * 100)
    path, _ = load_latest(tmp_path, warn=lambda m: None)  # resumes from step 4
    assert path.name == "step_00000004.pt"
    save_checkpoint(tmp_path, _state(5), keep_last=1)  # the resumed run's first checkpoint
    # The fresh checkpoint is kept, not the corrupt one of a later step.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005.pt"]
    assert (tmp_path / "step_00000008.pt.corrupt").read_bytes() == b"\0" * 100
    path, state = load_latest(tmp_path, warn=lambda m: None)
    assert path.name == "step_00000005.pt" and state.step == 5


def test_nothing_is_renamed_when_no_checkpoint_is_readable(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, _state(step), keep_last=2).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"(?s)no readable checkpoint in .*step_00000002.pt.*step_00000001.pt"):
        load_latest(tmp_path, warn=lambda m: None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001.pt", "step_00000002.pt"]


def test_foreign_and_unsafe_files_are_refused(tmp_path):
    plain = tmp_path / "step_00000001.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), plain)  # a torch file, but not ours
    with pytest.raises(CheckpointError, match=r"step_00000001.pt: not a ran-bench checkpoint"):
        load_checkpoint(plain)
    # A pickled arbitrary object is never unpickled (weights_only=True).
    unsafe = tmp_path / "step_00000002.pt"
    torch.save({"format": FORMAT, "version": VERSION, "payload": _Payload()}, unsafe)
    with pytest.raises(CheckpointError,
                       match=r"step_00000002.pt: holds pickled Python objects, which ran-bench never loads"):
        load_checkpoint(unsafe)
    with pytest.raises(CheckpointError, match=r"(?s)no readable checkpoint in .*move the folder away"):
        load_latest(tmp_path, warn=lambda m: None)
    assert load_latest(tmp_path / "missing") is None  # a new run: nothing to resume


class _Payload:
    pass


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    captured = rng_state()
    expected = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    save_checkpoint(tmp_path, make_checkpoint(5, ranks=[{"rng": captured}]), keep_last=1)
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(load_checkpoint(tmp_path / "step_00000005.pt").ranks[0]["rng"])
    again = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


@pytest.mark.parametrize("problem", ["io_error", "other_version"])
def test_a_checkpoint_that_cannot_be_used_now_is_never_set_aside(tmp_path, monkeypatch, problem):
    # A good newest checkpoint on a flaky file system (EIO during a requeue), or one written by
    # another ran-bench version, must stop the resume: falling back would silently rewind the run.
    save_checkpoint(tmp_path, _state(1), keep_last=3)
    newest = save_checkpoint(tmp_path, _state(2), keep_last=3)
    if problem == "io_error":
        real_read = Path.read_bytes

        def flaky_read(self):
            if self == newest:
                raise OSError(errno.EIO, "Input/output error")
            return real_read(self)

        monkeypatch.setattr(Path, "read_bytes", flaky_read)
        words = "storage error, not a corrupt checkpoint"
    else:
        torch.save({"format": FORMAT, "version": VERSION + 1, **_state(2).to_dict()}, newest)
        words = f"checkpoint format version {VERSION + 1}"
    with pytest.raises(CheckpointUnavailable, match=words):
        load_latest(tmp_path, warn=pytest.fail)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step_00000001.pt", "step_00000002.pt"]


def test_random_bytes_are_reported_as_not_a_pytorch_file(tmp_path):
    # Such bytes once read as "holds pickled Python objects", which sends the user looking for
    # tampering instead of a corrupt file.
    path = tmp_path / "step_00000001.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value).startswith(f"{path}: not a PyTorch file (not the zip archive torch.save writes)")
    assert "pickled" not in str(error.value)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"step_00000001.pt: an empty file; it is corrupt"):
        load_checkpoint(path)


def _chain(error: BaseException) -> list[BaseException]:
    out = []
    while error is not None and error not in out:
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def test_a_full_disk_leaves_the_earlier_checkpoints_and_no_temporary_file(tmp_path):
    """On a real full file system (a small tmpfs): one StorageError naming the file, the cause and
    the intact checkpoint, with no RuntimeError of torch's zip writer anywhere in its chain."""
    from tmpfs import PAGE, free_bytes, remount, tmpfs

    # 64 KiB: more than the room left below
    state = dataclasses.replace(_state(1), extra={"padding": torch.zeros(16 * 1024)})
    with tmpfs(tmp_path / "fs", 40 * PAGE) as fs:
        first = save_checkpoint(fs, state, keep_last=3)
        good = first.read_bytes()
        (fs / "filler").write_bytes(b"\0" * (free_bytes(fs) - 2 * PAGE))
        with pytest.raises(StorageError) as error:
            save_checkpoint(fs, dataclasses.replace(state, step=2), keep_last=3)
        assert str(error.value) == (
            f"checkpoint not written: cannot write {fs / 'step_00000002.pt'}: No space left on device; the newest "
            f"checkpoint, {first}, is intact. Free space on (or fix) that file system and run the same command "
            "again to resume")
        assert not any(isinstance(e, RuntimeError) for e in _chain(error.value))
        assert sorted(p.name for p in fs.iterdir()) == ["filler", "step_00000001.pt"]  # no temporary file
        assert first.read_bytes() == good and load_checkpoint(first).step == 1

        remount(fs, "ro")
        with pytest.raises(StorageError, match=r"cannot write .*step_00000003.pt: Read-only file system; the "
                                                r"newest checkpoint, .*step_00000001.pt, is intact"):
            save_checkpoint(fs, dataclasses.replace(state, step=3), keep_last=3)
