"""Faults in the data: a file system that fails is one clear error; a corrupt image is replaced;
many corrupt images are an error; DALI's recovery gives the batches of a run that knew the bad file."""

from __future__ import annotations

import gc
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from ran_bench import data
from ran_bench.data import UnreadableFileError, UnreadableImagesError, build_loader, list_samples
from ran_bench.data.demo import make_demo
from ran_bench.data.sampling import train_indices

needs_dali = pytest.mark.skipif(not data.dali_available(), reason="NVIDIA DALI is not installed")
ALL = [pytest.param("dali", marks=needs_dali), "torchvision"]
BATCH = 4


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """2 classes x 8 train and x 2 val demo JPEGs (4 training batches of 4)."""
    root = tmp_path_factory.mktemp("faults") / "d"
    make_demo(root, seed=2, num_classes=2, train_per_class=8, val_per_class=2, min_side=24, max_side=40)
    return root


def _copy(clean: Path, tmp_path: Path) -> Path:
    root = tmp_path / "d"
    shutil.copytree(clean, root)
    return root


def _truncate(path: str) -> None:
    data_ = Path(path).read_bytes()
    Path(path).write_bytes(data_[: len(data_) // 3])


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def make_unreadable(path: str) -> None:
    """Turn `path` into a regular file that every read fails on with EIO, as a failing disk does:
    a symlink to /proc/self/mem, whose offset 0 is never mapped. (As root, chmod 000 stops no read.)"""
    os.remove(path)
    os.symlink("/proc/self/mem", path)
    try:
        with open(path, "rb") as f:
            f.read()
    except OSError:
        return
    pytest.skip("reading /proc/self/mem does not fail here")


def raises_one_line(path: str, cause: str):
    """pytest.raises of the UnreadableFileError for `path`: one line, the path, the cause, the fix."""
    one_line = (rf"^cannot read {re.escape(path)} \({re.escape(cause)}\): a file-system fault, not a bad image;"
                rf"[^\n]*restore the file[^\n]*\Z")
    return pytest.raises(UnreadableFileError, match=one_line)


# -- a file that cannot be read is not a corrupt image -------------------------------------------
@pytest.mark.parametrize("backend", ALL)
def test_a_file_removed_after_listing_stops_the_run_with_one_line_naming_it(clean, tmp_path, backend):
    """A file that vanishes mid-epoch (e.g. a network file system that lost the folder) is a
    file-system fault: one UnreadableFileError line with the path and the cause, nothing blanked."""
    root = _copy(clean, tmp_path)
    ld = build_loader(root, "train", size=24, batch_size=BATCH, backend=backend, num_threads=1)
    files, _, _ = list_samples(root, "train")
    os.remove(files[5])
    with raises_one_line(files[5], "No such file or directory"):
        _batches(ld)
    assert ld.bad_files == []


@pytest.mark.parametrize("backend", ALL)
def test_an_unreadable_file_stops_the_run_with_one_line_naming_it(clean, tmp_path, backend):
    """A file whose reads fail (EIO) is a file-system fault, not a bad image, in both backends:
    torchvision reads it in a worker process, DALI's reader sees empty bytes that fail
    `peek_image_shape` and Python's read tells why. One line, the path and the cause."""
    root = _copy(clean, tmp_path)
    files, _, _ = list_samples(root, "train")
    make_unreadable(files[6])
    ld = build_loader(root, "train", size=24, batch_size=BATCH, backend=backend, num_threads=1)
    with raises_one_line(files[6], "Input/output error"):
        _batches(ld)
    assert ld.bad_files == []


@needs_dali
@pytest.mark.parametrize("fault", ["removed", "unreadable"])
def test_a_failed_dali_pipeline_is_freed_at_once(clean, tmp_path, fault):
    """A DALI pipeline left to the garbage collector may be collected in a process forked later (a
    torchvision DataLoader worker), where DALI's destructor deadlocks (a test session hung so):
    a loader stopped by a file-system fault leaves no pipeline waiting for a collection."""
    from nvidia.dali.pipeline import Pipeline

    root = _copy(clean, tmp_path)
    files, _, _ = list_samples(root, "train")
    ld = build_loader(root, "train", size=24, batch_size=BATCH, backend="dali", num_threads=1)
    {"removed": os.remove, "unreadable": make_unreadable}[fault](files[6])
    gc.collect()
    gc.disable()
    try:
        with pytest.raises(UnreadableFileError):
            _batches(ld)
        alive = sum(issubclass(type(o), Pipeline) for o in gc.get_objects())
    finally:
        gc.enable()
    assert alive == 0


# -- many corrupt images are not "a few corrupt files" -------------------------------------------
@pytest.mark.parametrize("backend", ALL)
def test_most_of_a_batch_undecodable_raises(clean, tmp_path, backend):
    root = _copy(clean, tmp_path)
    files, _, _ = list_samples(root, "val")
    for f in files[:3]:  # 3 of the 4 val images: one batch of 4
        _truncate(f)
    ld = build_loader(root, "val", size=24, batch_size=BATCH, backend=backend, num_threads=1)
    with pytest.raises(UnreadableImagesError, match=r"3 images in one batch of 4 could not be decoded.*data verify"):
        _batches(ld)
    assert ld.bad_files == []


def test_a_process_whose_loader_workers_outlive_the_loader_still_exits(clean, tmp_path):
    """The workers ignore SIGTERM (the job's signal is the trainer's to handle), and multiprocessing
    ends leftover workers at exit with SIGTERM, then waits for them. Workers kept alive to the end,
    here by an error the process holds on to (as sys.last_value does after an uncaught one), must
    not make the process hang at exit."""
    import subprocess
    import sys

    root = _copy(clean, tmp_path)
    files, _, _ = list_samples(root, "val")
    for f in files[:3]:
        _truncate(f)
    code = (f"from ran_bench.data import build_loader\n"
            f"loader = build_loader({str(root)!r}, 'val', size=24, batch_size=4, backend='torchvision', "
            f"num_threads=1)\n"
            "try:\n    list(loader)\nexcept Exception as e:\n    kept = e\nprint(type(kept).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "UnreadableImagesError", proc.stderr[-3000:]


@pytest.mark.parametrize("backend", ALL)
def test_a_truncated_jpeg_becomes_a_flat_image(clean, tmp_path, backend):
    root = _copy(clean, tmp_path)
    files, labels, _ = list_samples(root, "val")
    _truncate(files[1])
    x, y = zip(*_batches(build_loader(root, "val", size=24, batch_size=BATCH, backend=backend, num_threads=1)))
    x, y = torch.cat(x), torch.cat(y)
    assert y.tolist() == labels
    assert x[1].abs().max() < 0.05 and x[0].std() > 0.1


# -- DALI recovery -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_bad(clean, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("one_bad") / "d"
    shutil.copytree(clean, root)
    files, _, _ = list_samples(root, "train")
    _truncate(files[9])
    return root, files[9]


def _dali_train(root: Path, epoch: int, state: dict | None = None):
    ld = build_loader(root, "train", size=24, batch_size=BATCH, backend="dali", num_threads=1, seed=4)
    if state is not None:
        ld.load_state_dict(state)
    ld.set_epoch(epoch)
    return ld


def _assert_same(a, b):
    assert len(a) == len(b)
    for (x1, y1), (x2, y2) in zip(a, b):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)


def _knew_it(bad: str, epoch: int) -> dict:
    """A loader state at the start of `epoch` that already lists `bad`: the reference run."""
    return {"backend": "dali", "epoch": epoch, "batches": 0, "bad_files": [bad]}


@needs_dali
@pytest.mark.parametrize("every", [1, 3, 32])
def test_dali_recovery_gives_the_batches_of_a_run_that_knew_the_bad_file(one_bad, monkeypatch, every):
    """The pipeline is rebuilt from the last recovery checkpoint (every `every` batches) and the
    good batches since then are decoded again: same images, same random crops."""
    import ran_bench.data.dali as dali

    root, bad = one_bad
    reference = _batches(_dali_train(root, 0, _knew_it(bad, 0)))
    monkeypatch.setattr(dali, "RECOVERY_EVERY", every)
    ld = _dali_train(root, 0)
    _assert_same(_batches(ld), reference)
    assert ld.bad_files == [bad]


@needs_dali
def test_dali_resume_from_a_torchvision_state_recovers_in_the_skipped_batches(clean, tmp_path):
    """The batches before the resume position are decoded to reach it; a file DALI cannot decode
    there (a GIF named .JPEG, which PIL reads, so the torchvision run did not list it) is replaced
    like anywhere else instead of failing every requeue of the job."""
    root = _copy(clean, tmp_path)
    files, _, _ = list_samples(root, "train")
    bad = files[9]
    with Image.open(bad) as im:
        im.convert("RGB").save(bad, "GIF")
    for epoch in range(20):  # an epoch whose bad file is in the first two of the 4 batches
        order = [files[i] for i in train_indices(16, rank=0, world_size=1, seed=4, epoch=epoch, batch_size=BATCH)]
        if order.index(bad) < 2 * BATCH:
            break
    skip = 2
    reference = _batches(_dali_train(root, epoch, _knew_it(bad, epoch)))[skip:]
    tv = build_loader(root, "train", size=24, batch_size=BATCH, backend="torchvision", num_threads=0, seed=4)
    tv.set_epoch(epoch)
    it = iter(tv)
    for _ in range(skip):
        next(it)
    state = tv.state_dict()
    assert state["bad_files"] == []
    ld = _dali_train(root, epoch, state)
    _assert_same(_batches(ld), reference)
    assert ld.bad_files == [bad]


@needs_dali
@pytest.mark.parametrize("augmentation", ["imagenet", "cifar"])
def test_find_undecodable_uses_the_pipeline_decoder_and_only_decoder_errors(clean, tmp_path, augmentation):
    from ran_bench.data.dali import find_undecodable

    root = _copy(clean, tmp_path)
    files, _, _ = list_samples(root, "train")
    _truncate(files[2])
    with Image.open(files[7]) as im:
        im.convert("RGB").save(files[7], "GIF")  # a format nvImageCodec does not read
    for train in (True, False):
        assert find_undecodable(files, train=train, augmentation=augmentation) == [files[2], files[7]]
    os.remove(files[12])
    with raises_one_line(files[12], "No such file or directory"):  # an I/O fault is not a bad image
        find_undecodable(files, train=True, augmentation=augmentation)


@needs_dali
def test_dali_resumed_at_the_end_of_an_epoch_builds_no_pipeline(clean, monkeypatch):
    """A state saved after the epoch's last batch (e.g. by the torchvision backend) must not
    decode the whole epoch again just to skip it."""
    ld = build_loader(clean, "train", size=24, batch_size=BATCH, backend="dali", num_threads=1)
    ld.load_state_dict({"backend": "torchvision", "epoch": 0, "batches": len(ld)})
    monkeypatch.setattr(ld, "_iterator", lambda checkpoint: pytest.fail("built a pipeline"))
    assert list(ld) == []
    assert ld.state_dict()["batches"] == len(ld)


def test_a_jpeg_whose_header_claims_a_huge_size_becomes_a_flat_image(clean, tmp_path):
    # A damaged SOF0 header claiming 20000x20000 pixels makes PIL raise DecompressionBombError, a
    # plain Exception rather than an OSError: it is still one bad image, not a reason to stop a run.
    root = _copy(clean, tmp_path)
    files, labels, _ = list_samples(root, "val")
    data = bytearray(Path(files[1]).read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (20000).to_bytes(2, "big") * 2  # height, width
    Path(files[1]).write_bytes(bytes(data))
    loader = build_loader(root, "val", size=24, batch_size=BATCH, backend="torchvision", num_threads=1)
    x, y = zip(*_batches(loader))
    x, y = torch.cat(x), torch.cat(y)
    assert y.tolist() == labels
    assert x[1].abs().max() < 0.05 and x[0].std() > 0.1
    assert loader.bad_files == [files[1]]


@needs_dali
def test_dali_counts_the_bad_share_per_batch_not_per_search_window(tmp_path):
    # DALI's search covers several prefetched batches at once; 2 bad images in one batch of 4 and 1
    # in the next are two half-good batches (torchvision carries on there too), not a broken set.
    root = tmp_path / "d"
    make_demo(root, seed=2, num_classes=2, train_per_class=1, val_per_class=4, min_side=24, max_side=40)
    files, labels, _ = list_samples(root, "val")
    for i in (0, 1, 4):
        _truncate(files[i])
    loader = build_loader(root, "val", size=24, batch_size=BATCH, backend="dali", num_threads=1)
    x, y = zip(*_batches(loader))
    assert torch.cat(y).tolist() == labels
    assert sorted(loader.bad_files) == sorted(files[i] for i in (0, 1, 4))
