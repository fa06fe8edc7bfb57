"""The data loaders: layout, labels, sharding, resuming, odd files, output formats, both backends."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
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
@pytest.mark.parametrize("n, world", [(1, 2), (3, 4)])
def test_fewer_val_images_than_processes_each_counted_once(tmp_path, backend, n, world):
    """A validation set smaller than the number of processes (a quick check on a few images):
    the ranks without an image run no batch, the others read theirs, every image exactly once.
    (DALI's reader refuses more shards than files, so each rank's reader gets its own slice.)"""
    root = tmp_path / "d"
    make_demo(root, seed=4, num_classes=1, train_per_class=2, val_per_class=n, min_side=24, max_side=40)
    files, labels, _ = list_samples(root, "val")
    single = _all(build_loader(root, "val", size=24, batch_size=4, backend=backend, num_threads=1))[0]
    seen = []
    for rank in range(world):
        ld = build_loader(root, "val", size=24, batch_size=4, backend=backend, num_threads=1, rank=rank,
                          world_size=world)
        batches = list(ld)
        assert len(batches) == len(ld) == -(-len(val_range(n, rank=rank, world_size=world)) // 4)
        seen += [x for xs, _ in batches for x in xs]
    assert len(seen) == n
    assert torch.equal(torch.stack(seen), single)  # each image once, in order


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
    val = build_loader(root, "val", size=32, batch_size=3, backend=backend, num_threads=1)
    with caplog.at_level(logging.WARNING, logger="ran_bench.data"):
        x, y = _all(val)
    assert x.shape == (len(files), 3, 32, 32) and y.tolist() == labels  # nothing skipped, all RGB
    assert val.bad_files == [str(paths["truncated"])]
    _all(val)  # a second evaluation pass: the list holds each file once
    assert val.bad_files == [str(paths["truncated"])]
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
    truncated = str(root / "train" / "circle" / "odd_truncated.JPEG")
    assert ld.bad_files == [truncated]
    # the list survives a resume (it is the run's count of skipped images), in either backend
    for other in BACKENDS if data.dali_available() else ["torchvision"]:
        resumed = build_loader(root, "train", size=32, batch_size=2, backend=other, num_threads=1)
        resumed.load_state_dict(ld.state_dict())
        assert resumed.bad_files == [truncated], other
        resumed.set_epoch(1)
        assert sum(len(y) for _, y in resumed) == 12 and resumed.bad_files == [truncated]
        assert resumed.state_dict()["bad_files"] == [truncated]


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


# -- the CIFAR recipe ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """CIFAR-like PNGs (lossless, so both decoders give the exact pixels): 2 classes x 4 train
    and x 2 val noise images of 32x32; returns the root and path -> uint8 HWC array."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cifar") / "c"
    rng = np.random.default_rng(5)
    arrays = {}
    for split, n in (("train", 4), ("val", 2)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                path = root / split / c / f"{i}.png"
                Image.fromarray(a).save(path)
                arrays[str(path)] = a
    return root, arrays


def _normalised(a) -> torch.Tensor:
    x = torch.from_numpy(a).permute(2, 0, 1).float()
    return (x - torch.tensor(data.MEAN_255).view(3, 1, 1)) / torch.tensor(data.STD_255).view(3, 1, 1)


@pytest.mark.parametrize("backend", ALL)
def test_cifar_val_is_the_native_image(cifar, backend):
    """Test images are used as they are: no resize, no 0.875 centre crop."""
    root, arrays = cifar
    files, labels, _ = list_samples(root, "val")
    x, y = _all(build_loader(root, "val", size=32, batch_size=3, backend=backend, num_threads=1,
                             augmentation="cifar"))
    assert y.tolist() == labels
    for i, f in enumerate(files):
        torch.testing.assert_close(x[i], _normalised(arrays[f]), atol=1e-5, rtol=0)


def _window(padded: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """The 32x32 window of a 40x40 padded image shifted by (dy, dx) from the centre, mirrored or not."""
    w = padded[:, 4 + dy:36 + dy, 4 + dx:36 + dx]
    return w.flip(-1) if flip else w


@pytest.mark.parametrize("backend", ALL)
def test_cifar_train_is_a_4px_zero_padded_random_crop_and_flip(cifar, backend):
    """Every training image is the 32x32 image shifted by -4..4 pixels in each direction with
    black (pixel value 0) filling the uncovered band, then possibly mirrored."""
    root, arrays = cifar
    files, labels, _ = list_samples(root, "train")
    black = _normalised(np.zeros((1, 1, 3), dtype=np.uint8))
    seen = set()
    for epoch in range(4):
        ld = build_loader(root, "train", size=32, batch_size=4, backend=backend, num_threads=1, seed=2,
                          augmentation="cifar")
        ld.set_epoch(epoch)
        x, y = _all(ld)
        order = train_indices(len(files), rank=0, world_size=1, seed=2, epoch=epoch, batch_size=4)
        assert y.tolist() == [labels[i] for i in order] and x.shape == (8, 3, 32, 32)
        for img, i in zip(x, order):
            padded = black.expand(3, 40, 40).clone()
            padded[:, 4:36, 4:36] = _normalised(arrays[files[i]])
            matches = [(dy, dx, flip) for dy in range(-4, 5) for dx in range(-4, 5) for flip in (False, True)
                       if torch.allclose(img, _window(padded, dy, dx, flip), atol=1e-5, rtol=0)]
            assert len(matches) == 1, (epoch, files[i], matches)
            seen.add(matches[0])
    assert {flip for _, _, flip in seen} == {False, True}
    assert any(4 in (abs(dy), abs(dx)) for dy, dx, _ in seen)  # a full 4-pixel black band
    assert len({(dy, dx) for dy, dx, _ in seen}) > 16  # shifts vary from image to image


@needs_dali
def test_cifar_recipe_crops_the_same_pixels_in_both_backends(demo):
    """Larger images: shorter side resized to `size` and a centred crop, the same geometry in both."""
    xd, yd = _all(build_loader(demo, "val", size=24, batch_size=8, backend="dali", num_threads=1,
                               augmentation="cifar"))
    xt, yt = _all(build_loader(demo, "val", size=24, batch_size=8, backend="torchvision", num_threads=0,
                               augmentation="cifar"))
    assert yd.tolist() == yt.tolist()
    diffs = _shifted_diffs(xd, xt)
    aligned = diffs.pop((0, 0))
    assert aligned.max() < 0.05, aligned
    assert (aligned < 0.75 * torch.stack(list(diffs.values())).min(0).values).all()


def test_unknown_augmentation_names_the_key_and_choices(demo):
    from ran_bench.errors import InputError

    with pytest.raises(InputError, match=r"data\.augmentation must be one of imagenet, cifar, got 'autoaugment'"):
        build_loader(demo, "train", size=32, batch_size=4, backend="torchvision", augmentation="autoaugment")


# -- decoding threads ---------------------------------------------------------------------------
def _threads(monkeypatch, cores: int, env: dict[str, str]) -> int:
    for key in ("LOCAL_WORLD_SIZE", "SLURM_CPUS_PER_TASK", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
                "SLURM_NODEID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(cores)))
    return data.default_num_threads()


def test_default_num_threads_divides_a_shared_mask_only(monkeypatch):
    # torchrun / accelerate launch: 8 ranks share the node's 64 cores
    assert _threads(monkeypatch, 64, {"LOCAL_WORLD_SIZE": "8"}) == 8
    assert _threads(monkeypatch, 16, {"LOCAL_WORLD_SIZE": "8"}) == 2
    # one SLURM task per node (sbatch scripts) with 16 CPUs, 8 ranks launched inside it: shared
    assert _threads(monkeypatch, 16, {"LOCAL_WORLD_SIZE": "8", "SLURM_CPUS_PER_TASK": "16",
                                      "SLURM_STEP_TASKS_PER_NODE": "1"}) == 2
    # submitit: one task per rank, each bound to its own 8 CPUs (task/affinity): already divided
    assert _threads(monkeypatch, 8, {"LOCAL_WORLD_SIZE": "8", "SLURM_CPUS_PER_TASK": "8",
                                     "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NODEID": "1"}) == 8
    assert _threads(monkeypatch, 6, {"LOCAL_WORLD_SIZE": "4", "SLURM_CPUS_PER_TASK": "6",
                                     "SLURM_TASKS_PER_NODE": "4"}) == 6
    # the same tasks without CPU binding see the whole node's mask: divide it
    assert _threads(monkeypatch, 64, {"LOCAL_WORLD_SIZE": "8", "SLURM_CPUS_PER_TASK": "8",
                                      "SLURM_STEP_TASKS_PER_NODE": "8"}) == 8
    assert _threads(monkeypatch, 32, {"LOCAL_WORLD_SIZE": "8", "SLURM_CPUS_PER_TASK": "8",
                                      "SLURM_STEP_TASKS_PER_NODE": "8"}) == 4
    assert _threads(monkeypatch, 1, {}) == 1
