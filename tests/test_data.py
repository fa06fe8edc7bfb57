"""The data loaders: layout, labels, sharding, resuming, odd files, output formats, both backends."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from ran_bench import data
from ran_bench.data import build_loader, corrupt_labels, list_samples
from ran_bench.data.demo import CLASSES, demo_image, make_demo, write_odd_files
from ran_bench.data.sampling import train_indices, val_range

BACKENDS = ["dali", "torchvision"]
needs_dali = pytest.mark.skipif(not data.dali_available(), reason="NVIDIA DALI is not installed")


def _backend_param(name):
    return pytest.param(name, marks=needs_dali) if name == "dali" else name


ALL = [_backend_param(b) for b in BACKENDS]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """10 classes x 3 train images; 10 x 2 + 1 = 21 val images (not a multiple of any batch
    size used here); sides of 40-72 px, so the val resize to 37 px downscales like ImageNet's."""
    import numpy as np

    root = tmp_path_factory.mktemp("demo") / "d"
    make_demo(root, seed=1, train_per_class=3, val_per_class=2, min_side=40, max_side=72)
    demo_image(0, np.random.default_rng(99), 40, 72).save(root / "val" / CLASSES[0] / "val_extra.JPEG")
    return root


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A small set whose val/circle folder holds every odd-file kind."""
    root = tmp_path_factory.mktemp("odd") / "d"
    make_demo(root, seed=3, num_classes=2, train_per_class=4, val_per_class=2, min_side=24, max_side=40)
    paths = write_odd_files(root / "val" / "circle", size=40)
    write_odd_files(root / "train" / "circle", size=40)
    return root, paths


def _all(loader):
    xs, ys = zip(*[(x.float(), y) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


# -- layout and labels --------------------------------------------------------------------------
def test_list_samples_sorted_wnids_and_train_class_indices(tmp_path):
    for split, wnids in (("train", ["n02", "n01", "n03"]), ("val", ["n03", "n01"])):
        for w in wnids:
            (tmp_path / split / w).mkdir(parents=True)
            for name in ("b.JPEG", "a.JPEG", "notes.txt"):
                (tmp_path / split / w / name).write_bytes(b"x")
    files, labels, classes = list_samples(tmp_path, "val")
    assert classes == ["n01", "n02", "n03"]
    # val lacks n02, yet n03 keeps its training index 2; the text file is not a sample
    assert [Path(f).relative_to(tmp_path / "val").as_posix() for f in files] == \
        ["n01/a.JPEG", "n01/b.JPEG", "n03/a.JPEG", "n03/b.JPEG"]
    assert labels == [0, 0, 2, 2]
    (tmp_path / "val" / "n09").mkdir()
    with pytest.raises(data.DatasetLayoutError, match="n09"):
        list_samples(tmp_path, "val")


def test_missing_split_names_the_fix(tmp_path):
    with pytest.raises(data.DatasetLayoutError, match="make-demo"):
        build_loader(tmp_path, "train", size=32, batch_size=2, backend="torchvision")


def test_corrupt_labels_changes_exactly_the_fraction_to_other_classes():
    labels = [i % 10 for i in range(1000)]
    noisy = corrupt_labels(labels, 0.3, 10, seed=5)
    changed = [i for i, (a, b) in enumerate(zip(labels, noisy)) if a != b]
    assert len(changed) == 300
    assert all(0 <= x < 10 for x in noisy)
    assert corrupt_labels(labels, 0.3, 10, seed=5) == noisy
    assert corrupt_labels(labels, 0.3, 10, seed=6) != noisy
    # every wrong class is reachable: the new label is uniform over the 9 others
    assert {noisy[i] for i in changed if labels[i] == 0} == set(range(1, 10))
    with pytest.raises(ValueError, match="fraction"):
        corrupt_labels(labels, 1.5, 10, seed=0)


@pytest.mark.parametrize("backend", ALL)
def test_label_override_is_used(demo, backend):
    files, labels, _ = list_samples(demo, "val")
    flipped = [(y + 1) % 10 for y in labels]
    _, ys = _all(build_loader(demo, "val", size=32, batch_size=8, backend=backend, num_threads=1, labels=flipped))
    assert ys.tolist() == flipped


# -- both backends agree ------------------------------------------------------------------------
def _shifted_diffs(a: torch.Tensor, b: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """Mean |a - b| per image over the overlap, with b shifted by (dy, dx) in {-1, 0, 1}^2."""
    h, w = a.shape[-2:]
    out = {}
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            aa = a[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
            bb = b[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
            out[(dy, dx)] = (aa - bb).abs().flatten(1).mean(1)
    return out


@needs_dali
@pytest.mark.parametrize("size", [32, 24])
def test_backends_same_labels_and_val_pixels(demo, size):
    """Same files -> same labels in the same order. Val pixels: PIL and DALI antialias with
    different bilinear kernels, so each image may differ by up to 0.05 mean |diff| (normalised
    units, ~3 grey levels; measured up to 0.037 on 80-160 px images); the crop geometry must be
    identical: for every image the unshifted comparison beats every 1-pixel shift by 25 %."""
    files, labels, _ = list_samples(demo, "val")
    xd, yd = _all(build_loader(demo, "val", size=size, batch_size=8, backend="dali", num_threads=1))
    xt, yt = _all(build_loader(demo, "val", size=size, batch_size=8, backend="torchvision", num_threads=0))
    assert yd.tolist() == yt.tolist() == labels
    diffs = _shifted_diffs(xd, xt)
    aligned = diffs.pop((0, 0))
    assert aligned.max() < 0.05, aligned
    assert (aligned < 0.75 * torch.stack(list(diffs.values())).min(0).values).all()

    train_labels = list_samples(demo, "train")[1]
    for epoch in (0, 1):
        expected = [train_labels[i] for i in train_indices(30, rank=0, world_size=1, seed=7, epoch=epoch,
                                                           batch_size=4)]
        for backend in BACKENDS:
            ld = build_loader(demo, "train", size=32, batch_size=4, backend=backend, num_threads=1, seed=7)
            ld.set_epoch(epoch)
            assert _all(ld)[1].tolist() == expected, backend


# -- sharding -----------------------------------------------------------------------------------
def test_train_shards_disjoint_equal_and_cover_the_epoch():
    n, world, bs = 103, 4, 5
    shards = [train_indices(n, rank=r, world_size=world, seed=1, epoch=2, batch_size=bs) for r in range(world)]
    assert all(len(s) == 25 for s in shards)  # 103 // 4 = 25 per rank = 5 batches of 5
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat) == 100
    assert shards != [train_indices(n, rank=r, world_size=world, seed=1, epoch=3, batch_size=bs)
                      for r in range(world)]  # reshuffled each epoch


def test_val_shards_are_exact():
    for n, world in ((21, 2), (5, 4), (1000, 7)):
        shards = [list(val_range(n, rank=r, world_size=world)) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("backend", ALL)
def test_loader_follows_train_shards(demo, backend):
    _, labels, _ = list_samples(demo, "train")
    seen = []
    for rank in range(2):
        ld = build_loader(demo, "train", size=32, batch_size=4, backend=backend, num_threads=1, rank=rank,
                          world_size=2, seed=3)
        ld.set_epoch(1)
        assert len(ld) == 3 and ld.num_samples == 12  # 30 // 2 = 15 -> 3 whole batches of 4
        ys = _all(ld)[1].tolist()
        assert ys == [labels[i] for i in train_indices(30, rank=rank, world_size=2, seed=3, epoch=1, batch_size=4)]
        seen.append(ys)
    assert seen[0] != seen[1]


# -- resuming -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
def test_resume_continues_at_the_next_sample(demo, tmp_path, backend):
    kw = dict(size=32, batch_size=4, backend=backend, num_threads=1, seed=11)
    full = build_loader(demo, "train", **kw)
    full.set_epoch(2)
    expected = [(x.clone(), y.clone()) for x, y in full]

    first = build_loader(demo, "train", **kw)
    first.set_epoch(2)
    it = iter(first)
    for _ in range(3):
        next(it)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    del it, first

    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = build_loader(demo, "train", **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the trainer may call it again for the same epoch
    assert resumed.state_dict() == state  # a checkpoint taken before iterating loses nothing
    rest = list(resumed)
    assert len(rest) == len(expected) - 3
    for (x1, y1), (x2, y2) in zip(expected[3:], rest):
        assert torch.equal(y1, y2)
        assert torch.equal(x1, x2)  # same images and the same random crops and flips
    # the next full pass starts at the beginning again
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(expected)


def test_resume_rejects_a_different_batch_size(demo):
    ld = build_loader(demo, "train", size=32, batch_size=4, backend="torchvision", num_threads=0)
    state = ld.state_dict()
    other = build_loader(demo, "train", size=32, batch_size=5, backend="torchvision", num_threads=0)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


# -- output format ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
def test_channels_last_and_dtypes(demo, backend):
    ref, _ = _all(build_loader(demo, "val", size=32, batch_size=8, backend=backend, num_threads=1))
    assert ref.shape == (21, 3, 32, 32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ld = build_loader(demo, "val", size=32, batch_size=8, backend=backend, num_threads=1, channels_last=True,
                          dtype=dtype)
        x, y = next(iter(ld))
        assert x.shape == (8, 3, 32, 32) and x.dtype == dtype and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
        tol = {torch.float32: 1e-6, torch.bfloat16: 0.02, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(x.float(), ref[:8], atol=tol, rtol=tol)


def test_synthetic_backend():
    ld = build_loader(None, "val", size=16, batch_size=8, backend="synthetic", num_classes=5, rank=1,
                      world_size=3, dtype=torch.bfloat16, channels_last=True)
    assert ld.num_samples == 16667  # ImageNet's 50,000 val images over 3 ranks
    x, y = next(iter(ld))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.bfloat16 and int(y.max()) < 5
    assert x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="num_classes"):
        build_loader(None, "train", size=16, batch_size=8, backend="synthetic")


def test_falls_back_to_torchvision_without_dali(demo, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    data.dali_available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="ran_bench.data"):
            a = build_loader(demo, "val", size=32, batch_size=4, backend="dali", num_threads=0)
            b = build_loader(demo, "val", size=32, batch_size=4, backend="dali", num_threads=0)
    finally:
        data.dali_available.cache_clear()
    assert a.backend == b.backend == "torchvision"
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "DALI is not usable" in caplog.records[0].message and len(caplog.records) == 1


# -- odd files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
def test_odd_files_decode_or_are_replaced(odd, backend, caplog):
    root, paths = odd
    files, labels, _ = list_samples(root, "val")
    assert str(paths["text"]) not in files  # a non-image file is not a sample
    with caplog.at_level(logging.WARNING, logger="ran_bench.data"):
        x, y = _all(build_loader(root, "val", size=32, batch_size=3, backend=backend, num_threads=1))
    assert x.shape == (len(files), 3, 32, 32) and y.tolist() == labels  # nothing skipped, all RGB
    assert str(paths["truncated"]) in caplog.text
    pos = {k: files.index(str(p)) for k, p in paths.items() if k != "text"}
    # the truncated file became a flat mean-colour image: zero after normalisation
    assert x[pos["truncated"]].abs().max() < 0.05
    # grayscale: the three channels carry the same grey levels (equal after de-normalising)
    mean = torch.tensor(data.MEAN_255).view(3, 1, 1)
    std = torch.tensor(data.STD_255).view(3, 1, 1)
    grey = x[pos["grayscale"]] * std + mean
    assert (grey[0] - grey[1]).abs().max() < 1.5 and (grey[1] - grey[2]).abs().max() < 1.5
    for k in ("cmyk", "png"):
        assert x[pos[k]].std() > 0.1  # decoded to a real picture, not the flat placeholder

    ld = build_loader(root, "train", size=32, batch_size=2, backend=backend, num_threads=1)
    n = sum(len(y) for _, y in ld)
    assert n == ld.num_samples == 12  # 8 demo + 4 odd images, none lost
    assert ld.bad_files == [str(root / "train" / "circle" / "odd_truncated.JPEG")]


@needs_dali
def test_odd_files_agree_between_backends(odd):
    """CMYK, grayscale and PNG-named-.JPEG files give the same pixels in both loaders."""
    root, paths = odd
    files, _, _ = list_samples(root, "val")
    xd, _ = _all(build_loader(root, "val", size=32, batch_size=4, backend="dali", num_threads=1))
    xt, _ = _all(build_loader(root, "val", size=32, batch_size=4, backend="torchvision", num_threads=0))
    for k in ("grayscale", "cmyk", "png", "truncated"):
        i = files.index(str(paths[k]))
        assert (xd[i] - xt[i]).abs().mean() < 0.05, k
