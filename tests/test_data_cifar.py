"""`ran-bench data cifar` and the CIFAR configs: official archives -> class folders of PNGs whose
sorted order is the official label order, exact pixels, clear errors; every config loads with
the paper's recipe and lands in its paper table row."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ran_bench import report
from ran_bench.cli import main as cli_main
from ran_bench.config import load_config, to_yaml, validate
from ran_bench.data import MEAN_255, STD_255, build_loader, dali_available, list_samples
from ran_bench.data import cifar as cifar_module
from ran_bench.data.cifar import convert_cifar
from ran_bench.errors import InputError
from ran_bench.results import run_results

REPO = Path(__file__).resolve().parents[1]
CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def _official_pickle(obj) -> bytes:
    """A pickle like the official files: protocol 2, numpy's array constructor under its numpy 1.x
    module name (the files predate numpy 2's numpy._core)."""
    data = pickle.dumps(obj, protocol=2)
    legacy = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"_core" not in legacy, "numpy pickled arrays differently; update the legacy name above"
    return legacy


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _batch(rng: np.random.Generator, n: int, classes: int, label_key: bytes) -> dict:
    return {b"batch_label": b"fake batch", label_key: rng.integers(0, classes, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def make_cifar10(path: Path, seed: int = 0, per_batch: int = 4, test: int = 6) -> tuple[Path, dict]:
    """A cifar-10-python.tar.gz in the official layout with `per_batch` images per training batch;
    returns the archive and the official rows/labels per split (train = batches 1..5 in order)."""
    rng = np.random.default_rng(seed)
    batches = [_batch(rng, per_batch, 10, b"labels") for _ in range(5)]
    test_batch = _batch(rng, test, 10, b"labels")
    members = {f"cifar-10-batches-py/data_batch_{i + 1}": _official_pickle(b) for i, b in enumerate(batches)}
    members["cifar-10-batches-py/test_batch"] = _official_pickle(test_batch)
    members["cifar-10-batches-py/batches.meta"] = _official_pickle(
        {b"label_names": CIFAR10_NAMES, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    truth = {"train": (np.concatenate([b[b"data"] for b in batches]), sum((b[b"labels"] for b in batches), [])),
             "val": (test_batch[b"data"], test_batch[b"labels"])}
    return _write_tar(path, members), truth


def make_cifar100(path: Path, seed: int = 1, train: int = 12, test: int = 5) -> tuple[Path, dict, list[bytes]]:
    """A cifar-100-python.tar.gz in the official layout: fine and coarse labels (the fine ones count)."""
    rng = np.random.default_rng(seed)
    names = [f"class_{i}".encode() for i in range(100)]
    names[42] = b"lamp"
    names[7] = b"../escape"  # a name that would be a path must stay one folder name
    splits = {}
    for split, n in (("train", train), ("test", test)):
        b = _batch(rng, n, 100, b"fine_labels")
        b[b"fine_labels"][0] = 42  # the folder named in the task: 042_lamp
        b[b"coarse_labels"] = rng.integers(0, 20, n).tolist()
        splits[split] = b
    members = {f"cifar-100-python/{s}": _official_pickle(b) for s, b in splits.items()}
    members["cifar-100-python/meta"] = _official_pickle(
        {b"fine_label_names": names, b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]})
    truth = {"train": (splits["train"][b"data"], splits["train"][b"fine_labels"]),
             "val": (splits["test"][b"data"], splits["test"][b"fine_labels"])}
    return _write_tar(path, members), truth, names


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("c10")
    archive, truth = make_cifar10(tmp / "cifar-10-python.tar.gz")
    result = convert_cifar(archive, tmp / "cifar10")
    assert result.dataset == "cifar10"
    return tmp / "cifar10", truth


def _rgb_from_official_row(row: np.ndarray) -> np.ndarray:
    """Pixel (y, x) of an official row: red at y*32+x, green 1024 later, blue 2048 later."""
    out = np.empty((32, 32, 3), np.uint8)
    for y in range(32):
        for x in range(32):
            out[y, x] = row[y * 32 + x], row[1024 + y * 32 + x], row[2048 + y * 32 + x]
    return out


def test_cifar10_folders_are_the_official_labels_in_sorted_order(cifar10):
    root, truth = cifar10
    expected = ["00_airplane", "01_automobile", "02_bird", "03_cat", "04_deer", "05_dog", "06_frog",
                "07_horse", "08_ship", "09_truck"]
    for split in ("train", "val"):
        assert sorted(os.listdir(root / split)) == expected
        files, labels, classes = list_samples(root, split)
        assert classes == expected
        rows, official = truth[split]
        assert len(files) == len(rows)  # 20 train, 6 val: every image once
        # The file name is the image's position in the official split order, and the loader's label
        # (the folder's sorted position) is the official label of that image.
        assert sorted(int(Path(f).stem) for f in files) == list(range(len(rows)))
        assert [official[int(Path(f).stem)] for f in files] == labels


def test_cifar10_pixels_round_trip_exactly(cifar10):
    root, truth = cifar10
    for split, index in (("train", 13), ("val", 5)):  # 13: batch 4, row 1 (4 images per batch)
        rows, labels = truth[split]
        path = next((root / split).glob(f"*/{index:05d}.png"))
        assert path.parent.name.startswith(f"{labels[index]:02d}_")
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32))
            assert np.array_equal(np.asarray(im), _rgb_from_official_row(rows[index]))
    for path in (root / "train").rglob("*.png"):  # and every other image, whole-array
        with Image.open(path) as im:
            expected = truth["train"][0][int(path.stem)].reshape(3, 32, 32).transpose(1, 2, 0)
            assert np.array_equal(np.asarray(im), expected), path


def test_cifar100_uses_fine_labels_and_three_digit_folders(tmp_path):
    archive, truth, names = make_cifar100(tmp_path / "cifar-100-python.tar.gz")
    result = convert_cifar(archive, tmp_path / "cifar100", workers=2)  # the process pool path
    assert result.dataset == "cifar100" and len(result.classes) == 100
    assert result.images == {"train": 12, "val": 5}
    folders = sorted(os.listdir(tmp_path / "cifar100" / "train"))
    assert folders[42] == "042_lamp" and folders[0] == "000_class_0" and folders[99] == "099_class_99"
    assert folders[7] == "007____escape"
    assert sorted(os.listdir(tmp_path)) == ["cifar-100-python.tar.gz", "cifar100"]  # nothing else written
    for split in ("train", "val"):
        files, labels, _ = list_samples(tmp_path / "cifar100", split)
        rows, fine = truth[split]
        assert [fine[int(Path(f).stem)] for f in files] == labels
        assert result.per_class[split] == np.bincount(fine, minlength=100).tolist()
        with Image.open(files[0]) as im:
            assert np.array_equal(np.asarray(im), _rgb_from_official_row(rows[int(Path(files[0]).stem)]))


@pytest.mark.parametrize("backend", [
    "torchvision",
    pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed"))])
def test_loader_over_the_converted_tree_gives_the_official_val_labels_and_pixels(cifar10, backend):
    root, truth = cifar10
    files, _, _ = list_samples(root, "val")
    loader = build_loader(root, "val", size=32, batch_size=4, backend=backend, num_threads=0, augmentation="cifar")
    images, labels = zip(*loader)
    images, labels = torch.cat(images), torch.cat(labels)
    order = [int(Path(f).stem) for f in files]
    rows, official = truth["val"]
    assert labels.tolist() == [official[i] for i in order]
    native = torch.from_numpy(rows[order].reshape(-1, 3, 32, 32).astype(np.float32))
    expected = (native - torch.tensor(MEAN_255).view(1, 3, 1, 1)) / torch.tensor(STD_255).view(1, 3, 1, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-4)


def test_cli_converts_and_prints_counts(tmp_path, capsys):
    archive, _ = make_cifar10(tmp_path / "cifar-10-python.tar.gz", per_batch=2, test=3)
    assert cli_main(["data", "cifar", str(archive), str(tmp_path / "out"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"cifar10: wrote 10 train and 3 val images in 10 classes to {tmp_path / 'out'}" in out
    assert sum(1 for _ in (tmp_path / "out").rglob("*.png")) == 13


def test_refuses_a_non_empty_out_and_accepts_an_empty_one(tmp_path, capsys):
    archive, _ = make_cifar10(tmp_path / "cifar-10-python.tar.gz", per_batch=1, test=1)
    (tmp_path / "empty").mkdir()
    assert convert_cifar(archive, tmp_path / "empty").images == {"train": 5, "val": 1}
    assert cli_main(["data", "cifar", str(archive), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'empty'} is not empty; give a new or empty folder (remove " \
                  f"{tmp_path / 'empty'} to convert again)\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file; give a new or empty folder"):
        convert_cifar(archive, tmp_path / "file")
    with pytest.raises(InputError, match=r"file/out: cannot create the output folder \(.*\); choose a writable place"):
        convert_cifar(archive, tmp_path / "file" / "out")


def test_an_interrupted_conversion_leaves_no_output_behind(tmp_path, monkeypatch):
    archive, _ = make_cifar10(tmp_path / "cifar-10-python.tar.gz", per_batch=1, test=1)
    written, write = [], cifar_module._write_pngs

    def write_then_fail(task):
        if written:
            raise KeyboardInterrupt
        written.append(write(task))
        return written[-1]

    monkeypatch.setattr(cifar_module, "CHUNK", 2)
    monkeypatch.setattr(cifar_module, "_write_pngs", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        convert_cifar(archive, tmp_path / "out")
    assert written == [2]  # the first chunk was written, then removed with the staging folder
    assert sorted(os.listdir(tmp_path)) == ["cifar-10-python.tar.gz"]


def test_what_is_not_an_official_archive_is_a_clear_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"missing\.tar\.gz: no such file; download .*kriz/cifar\.html"):
        convert_cifar(tmp_path / "missing.tar.gz", out)
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(InputError, match=r"notes\.txt: not a readable tar archive"):
        convert_cifar(tmp_path / "notes.txt", out)
    other = _write_tar(tmp_path / "other.tar.gz", {"mnist/train": b"x", "README": b"hi"})
    with pytest.raises(InputError, match=r"not a CIFAR python-version archive \(expected the members cifar10: "
                                         r"cifar-10-batches-py/data_batch_1, .*cifar-10-batches-py/batches\.meta"):
        convert_cifar(other, out)
    archive, _ = make_cifar10(tmp_path / "c10.tar.gz", per_batch=1, test=1)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(InputError, match=r"truncated\.tar\.gz: "):
        convert_cifar(truncated, out)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_damaged_header_mid_archive_says_damaged_not_foreign(tmp_path):
    # tarfile stops listing members at a damaged header without an error: the archive then looks
    # like one holding only its first members.
    archive, _ = make_cifar10(tmp_path / "c10.tar", per_batch=1, test=1)
    with tarfile.open(archive) as tar:
        offset = tar.getmember("cifar-10-batches-py/data_batch_3").offset
    raw = bytearray(gzip.decompress(archive.read_bytes()))
    raw[offset + 148:offset + 156] = b"garbage!"  # the header checksum field
    (tmp_path / "damaged.tar").write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"damaged\.tar: a cifar10 archive without cifar-10-batches-py/data_batch_3, "
                                         r".*: damaged or incomplete; download cifar-10-python\.tar\.gz again"):
        convert_cifar(tmp_path / "damaged.tar", tmp_path / "out")


class _RunsCode:
    """What a malicious pickle would hold: unpickling it calls os.mkdir(path)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_pickle_that_would_run_code_is_refused_before_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    members = {f"cifar-10-batches-py/{name}": _official_pickle({b"data": _RunsCode(str(marker)), b"labels": [0]})
               for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    members["cifar-10-batches-py/batches.meta"] = _official_pickle({b"label_names": CIFAR10_NAMES})
    archive = _write_tar(tmp_path / "evil.tar.gz", members)
    with pytest.raises(InputError, match=r"data_batch_1 is not a CIFAR batch pickle \(UnpicklingError: refusing "
                                         r"to load global (posix|os)\.mkdir\)"):
        convert_cifar(archive, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("batch, message", [
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
     r"'data' should be a uint8 array of N x 3072 .*found float32 array of shape \(2, 3072\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"'labels' should list one label per image \(2\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"'labels' should hold integers 0\.\.9"),
])
def test_malformed_batch_names_the_member_and_key(tmp_path, batch, message):
    members = {f"cifar-10-batches-py/{name}": _official_pickle(batch)
               for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    members["cifar-10-batches-py/batches.meta"] = _official_pickle({b"label_names": CIFAR10_NAMES})
    archive = _write_tar(tmp_path / "bad.tar.gz", members)
    with pytest.raises(InputError, match=r"bad\.tar\.gz: cifar-10-batches-py/data_batch_1: " + message):
        convert_cifar(archive, tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Configs: the paper's CIFAR recipe, one per model the tables use, each landing in its rows.

CONFIGS = {  # config -> model, data set, classes
    "cifar10_attention56": ("cifar_attention56", "cifar10", 10),
    "cifar10_attention92": ("cifar_attention92", "cifar10", 10),
    "cifar10_attention128": ("cifar_attention128", "cifar10", 10),
    "cifar10_attention164": ("cifar_attention164", "cifar10", 10),
    "cifar10_attention236": ("cifar_attention236", "cifar10", 10),
    "cifar10_attention452": ("cifar_attention452", "cifar10", 10),
    "cifar10_resnet164": ("cifar_resnet164", "cifar10", 10),
    "cifar100_attention92": ("cifar_attention92", "cifar100", 100),
    "cifar100_attention236": ("cifar_attention236", "cifar100", 100),
    "cifar100_attention452": ("cifar_attention452", "cifar100", 100),
    "cifar100_resnet164": ("cifar_resnet164", "cifar100", 100),
}


def test_every_cifar_config_is_listed_here():
    on_disk = {p.stem for p in (REPO / "configs").glob("cifar*.yaml")}
    assert on_disk == set(CONFIGS)


@pytest.mark.parametrize("stem", sorted(CONFIGS))
def test_config_has_the_papers_cifar_recipe(stem):
    cfg = load_config(REPO / "configs" / f"{stem}.yaml")
    validate(cfg, stem, world_size=1)
    model, dataset, _ = CONFIGS[stem]
    assert (cfg.model.name, cfg.model.options, cfg.data.name, cfg.data.root) == (model, {}, dataset, f"data/{dataset}")
    d = cfg.data
    assert (d.augmentation, d.train_size, d.test_sizes, d.label_noise) == ("cifar", 32, [32], 0.0)
    # Nesterov SGD, momentum 0.9, weight decay 1e-4, batch 64, LR 0.1 / 10 at 64k and 96k, stop at 160k.
    o = cfg.optim
    assert (o.nesterov, o.momentum, o.weight_decay, o.global_batch_size, o.label_smoothing) == \
        (True, 0.9, 1e-4, 64, 0.0)
    assert cfg.lr == pytest.approx(0.1)
    assert (cfg.total_steps, cfg.milestones, cfg.warmup_steps) == (160_000, [64_000, 96_000], 0)
    assert cfg.schedule.kind.name == "step" and cfg.schedule.max_steps is None


# Paper rows (section, row labels) each config lands in, with the ablations as overrides.
PLACEMENT = [
    ("cifar10_attention56", [], {("Table 1", "Attention-56", "mixed"), ("Table 3", "Attention-56", "ARL")}),
    ("cifar10_attention56", ["model.options.attention=channel"], {("Table 1", "Attention-56", "channel")}),
    ("cifar10_attention56", ["model.options.attention=spatial"], {("Table 1", "Attention-56", "spatial")}),
    ("cifar10_attention56", ["model.options.residual_attention=false"], {("Table 3", "Attention-56", "NAL")}),
    ("cifar10_attention56", ["model.options.mask=local_conv"], set()),
    ("cifar10_attention92", [], {("Table 3", "Attention-92", "ARL"), ("Table 6", "Attention-92", "CIFAR-10")}),
    ("cifar10_attention92", ["model.options.residual_attention=false"], {("Table 3", "Attention-92", "NAL")}),
    ("cifar10_attention92", ["data.label_noise=0.3"], {("Table 5", "30%", "Attention-92")}),
    ("cifar10_attention128", [], {("Table 3", "Attention-128", "ARL")}),
    ("cifar10_attention164", ["model.options.residual_attention=false"], {("Table 3", "Attention-164", "NAL")}),
    ("cifar10_attention236", [], {("Table 6", "Attention-236", "CIFAR-10")}),
    ("cifar10_attention452", [], {("Table 6", "Attention-452", "CIFAR-10")}),
    ("cifar10_resnet164", [], {("Table 6", "ResNet-164 (pre-act)", "CIFAR-10")}),
    ("cifar10_resnet164", ["data.label_noise=0.7"], {("Table 5", "70%", "ResNet-164")}),
    ("cifar100_attention92", [], {("Table 6", "Attention-92", "CIFAR-100")}),
    ("cifar100_attention236", [], {("Table 6", "Attention-236", "CIFAR-100")}),
    ("cifar100_attention452", [], {("Table 6", "Attention-452", "CIFAR-100")}),
    ("cifar100_resnet164", [], {("Table 6", "ResNet-164 (pre-act)", "CIFAR-100")}),
]


@pytest.mark.parametrize("stem, overrides, rows", PLACEMENT, ids=[f"{s}{o}" for s, o, _ in PLACEMENT])
def test_config_lands_in_its_paper_rows(tmp_path, stem, overrides, rows):
    """A run directory as the trainer writes it for this config (results.json from the trainer's
    own run_results, config.yaml from to_yaml) is matched by the report to exactly these rows."""
    cfg = load_config(REPO / "configs" / f"{stem}.yaml", overrides)
    classes = CONFIGS[stem][2]
    results = run_results(cfg, num_classes=classes, params=1, macs=1, macs_input_size=32, step=cfg.total_steps,
                          images_seen=cfg.total_steps * 64, epochs=204.8, world_size=1, device_type="cuda",
                          device_name="GPU", precision="bf16", wall_time_s=1.0, device_seconds=1.0, evaluations=[])
    results.save(tmp_path / "run" / "results.json")
    (tmp_path / "run" / "config.yaml").write_text(to_yaml(cfg))
    run = report.load_run(tmp_path / "run")
    assert run.dataset == CONFIGS[stem][1]
    matched = {(s.title.split(":")[0], *e.labels) for s in report.cifar_sections() for e in s.entries if e.match(run)}
    assert matched == rows
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["augmentation"] == "cifar"
