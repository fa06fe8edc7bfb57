"""CIFAR-10 / CIFAR-100 in the ImageNet folder layout, from the official python-version archives.

The loaders read `ROOT/<split>/<class>/<image>` and number the classes by the sorted folder
names, so `convert_cifar` names each folder `<label>_<name>` with the label zero-padded
("03_cat", "042_lamp"): sorted order is the official label order. Images are lossless 32x32
PNGs named by their position in the official split order (`00042.png` is row 42 of the training
batches concatenated, or of the test batch; five digits), so the loaders' sample order within a class is the
official order too. The official test set becomes the `val` split.

The archives are the "CIFAR-10 python version" (cifar-10-python.tar.gz) and "CIFAR-100 python
version" (cifar-100-python.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html; download
them yourself (nothing here uses the network). CIFAR-100 uses the 100 fine labels, as the paper.

Each member of those archives is a Python 2 pickle of a dict of numpy arrays and lists. Loading
a pickle can run code from the file, so the members are read with an unpickler that accepts
only the numpy array constructors the official files use, and refuses anything else.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ran_bench.errors import InputError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGE_SIDE = 32
ROW_BYTES = 3 * IMAGE_SIDE * IMAGE_SIDE  # one image: 1024 red, 1024 green, 1024 blue, row-major
PNG_COMPRESS_LEVEL = 1  # zlib level: lossless at any level; 1 writes fast and the files are tiny anyway
CHUNK = 500  # images per task of the process pool


@dataclass(frozen=True)
class CifarArchive:
    """Where one official archive keeps its batches and which keys hold the labels and names."""

    name: str  # the data set name of the configs and the report: cifar10 / cifar100
    folder: str  # the archive's top folder
    train: tuple[str, ...]  # training batches, in the official order
    test: tuple[str, ...]
    meta: str
    label_key: bytes
    names_key: bytes
    num_classes: int

    def member(self, name: str) -> str:
        return f"{self.folder}/{name}"

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(self.member(n) for n in (*self.train, *self.test, self.meta))


CIFAR10 = CifarArchive("cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                       ("test_batch",), "batches.meta", b"labels", b"label_names", 10)
CIFAR100 = CifarArchive("cifar100", "cifar-100-python", ("train",), ("test",), "meta", b"fine_labels",
                        b"fine_label_names", 100)
ARCHIVES = (CIFAR10, CIFAR100)


@dataclass
class CifarConversion:
    """What `convert_cifar` wrote."""

    dataset: str  # cifar10 / cifar100
    out: Path
    classes: list[str]  # folder names, index = official label
    images: dict[str, int] = field(default_factory=dict)  # split -> images
    per_class: dict[str, list[int]] = field(default_factory=dict)  # split -> images of each class


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays; refuses every other global, so
    a pickle that would call a function (os.system, ...) raises before anything runs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # how the official (numpy 1.x era) files name it
        ("numpy._core.multiarray", "_reconstruct"),  # numpy 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how a protocol-2 pickle written by Python 3 carries bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(tar: tarfile.TarFile, archive_path: Path, member: str) -> dict:
    info = tar.getmember(member)
    if not info.isfile():
        raise InputError(f"{archive_path}: {member} is not a regular file; is this the official archive "
                         f"from {CIFAR_URL}?")
    data = tar.extractfile(info).read()
    try:
        # encoding="bytes": the files are Python 2 pickles; their str keys and names come back as bytes
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways, all the same problem
        raise InputError(f"{archive_path}: {member} is not a CIFAR batch pickle ({type(e).__name__}: {e}); "
                         f"download the python version again from {CIFAR_URL}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{archive_path}: {member} holds a {type(obj).__name__}, not the dict of a CIFAR batch")
    return obj


def _detect(tar: tarfile.TarFile, archive_path: Path) -> CifarArchive:
    names = set(tar.getnames())
    for archive in ARCHIVES:
        if set(archive.members) <= names:
            return archive
    for archive in ARCHIVES:
        # tarfile ends the member list silently at a damaged header, so a corrupt download reads as
        # an archive with only its first members.
        if any(n.startswith(f"{archive.folder}/") for n in names):
            missing = [m for m in archive.members if m not in names]
            raise InputError(f"{archive_path}: a {archive.name} archive without {', '.join(missing)}: damaged or "
                             f"incomplete; download cifar-{archive.name[5:]}-python.tar.gz again from {CIFAR_URL}")
    expected = "; ".join(f"{a.name}: {', '.join(a.members)}" for a in ARCHIVES)
    raise InputError(f"{archive_path}: not a CIFAR python-version archive (expected the members {expected}). "
                     f"Download cifar-10-python.tar.gz or cifar-100-python.tar.gz from {CIFAR_URL}")


def _class_folders(meta: dict, archive: CifarArchive, where: str) -> list[str]:
    names = meta.get(archive.names_key)
    if not isinstance(names, list) or len(names) != archive.num_classes:
        raise InputError(f"{where}: {archive.names_key.decode()} should list {archive.num_classes} class names, "
                         f"got {names!r:.80}")
    width = len(str(archive.num_classes))  # 2 digits for 10 classes, 3 for 100: "03_cat", "042_lamp"
    folders = []
    for label, raw in enumerate(names):
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        # A folder name, never a path: anything but letters, digits, '-' and '_' becomes '_'.
        folders.append(f"{label:0{width}d}_{re.sub(r'[^A-Za-z0-9_-]', '_', text)}")
    return folders


def _read_split(tar: tarfile.TarFile, archive_path: Path, archive: CifarArchive,
                batches: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The rows (N x 3072 uint8) and labels (N) of the batches, concatenated in the given order."""
    rows, labels = [], []
    for batch in batches:
        member = archive.member(batch)
        where = f"{archive_path}: {member}"
        d = _unpickle(tar, archive_path, member)
        data, batch_labels = d.get(b"data"), d.get(archive.label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
            found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise InputError(f"{where}: 'data' should be a uint8 array of N x {ROW_BYTES} (one 32x32 RGB image "
                             f"per row), found {found}")
        if not isinstance(batch_labels, list) or len(batch_labels) != len(data):
            raise InputError(f"{where}: '{archive.label_key.decode()}' should list one label per image "
                             f"({len(data)}), found {type(batch_labels).__name__} of {len(batch_labels or [])}")
        batch_labels = np.asarray(batch_labels)
        if batch_labels.dtype.kind not in "iu" or batch_labels.min() < 0 or batch_labels.max() >= archive.num_classes:
            raise InputError(f"{where}: '{archive.label_key.decode()}' should hold integers "
                             f"0..{archive.num_classes - 1}")
        rows.append(data)
        labels.append(batch_labels)
    return np.concatenate(rows), np.concatenate(labels)


def cifar_image(row: np.ndarray) -> Image.Image:
    """The RGB image of one official row: 1024 red, then green, then blue values, each 32x32 row-major."""
    return Image.fromarray(row.reshape(3, IMAGE_SIDE, IMAGE_SIDE).transpose(1, 2, 0), "RGB")


def _write_pngs(task: tuple[np.ndarray, list[str]]) -> int:
    rows, paths = task
    for row, path in zip(rows, paths):
        cifar_image(row).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return len(paths)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; give a new or empty folder for the converted data set")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"{out} is not empty; give a new or empty folder (remove {out} to convert again)")


def convert_cifar(archive_path: str | os.PathLike, out: str | os.PathLike, *, workers: int = 1,
                  progress: bool = False) -> CifarConversion:
    """Write the images of an official CIFAR-10/100 python-version archive as
    OUT/train/<label>_<name>/<index>.png and OUT/val/... (the test set), detecting which of the
    two it is from the member names. OUT must be new or empty; the tree is built in a hidden
    sibling folder and renamed to OUT at the end, so an interrupted conversion leaves no
    half-written OUT behind. Raises InputError for anything but an official archive."""
    archive_path, out = Path(archive_path), Path(out)
    _check_out(out)
    if not archive_path.is_file():
        raise InputError(f"{archive_path}: no such file; download the python version of CIFAR-10 or CIFAR-100 "
                         f"from {CIFAR_URL}")
    try:
        tar = tarfile.open(archive_path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"{archive_path}: not a readable tar archive ({e}); expected cifar-10-python.tar.gz or "
                         f"cifar-100-python.tar.gz from {CIFAR_URL}") from None
    with tar:
        try:
            archive = _detect(tar, archive_path)
            meta_where = f"{archive_path}: {archive.member(archive.meta)}"
            classes = _class_folders(_unpickle(tar, archive_path, archive.member(archive.meta)), archive, meta_where)
            splits = {"train": _read_split(tar, archive_path, archive, archive.train),
                      "val": _read_split(tar, archive_path, archive, archive.test)}
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # a truncated or corrupt download
            raise InputError(f"{archive_path}: the archive is damaged ({type(e).__name__}: {e}); download it again "
                             f"from {CIFAR_URL}") from None

    result = CifarConversion(archive.name, out, classes)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise InputError(f"{out}: cannot create the output folder ({e}); choose a writable place") from None
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        tasks = []
        for split, (rows, labels) in splits.items():
            width = max(5, len(str(len(rows) - 1)))  # 00042.png: sorted names are the official order
            for c in classes:
                (staging / split / c).mkdir(parents=True)
            paths = [str(staging / split / classes[label] / f"{i:0{width}d}.png") for i, label in enumerate(labels)]
            tasks += [(rows[i:i + CHUNK], paths[i:i + CHUNK]) for i in range(0, len(rows), CHUNK)]
            result.images[split] = len(rows)
            result.per_class[split] = np.bincount(labels, minlength=len(classes)).tolist()
        total = sum(result.images.values())
        with tqdm(total=total, desc=f"{archive.name} -> {out}", unit="img", disable=not progress) as bar:
            for n in (pool.map if pool else map)(_write_pngs, tasks):
                bar.update(n)
        _check_out(out)  # still new or empty: nothing else wrote there meanwhile
        if out.is_dir():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        if pool:  # stop writing before removing what was written (Ctrl-C, a full disk)
            pool.shutdown(cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if pool:
            pool.shutdown()
    return result
