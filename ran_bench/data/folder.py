"""The ImageNet folder layout: `ROOT/<split>/<wnid>/<image>`.

Every loader gets its file list and labels from `list_samples`, so the class index of a file
(the position of its wnid among the sorted training wnids) and the sample index (the position
of the file in the sorted file list) are identical in the DALI, torchvision and test code.
"""

from __future__ import annotations

import os
from pathlib import Path

from ran_bench.errors import UserError

# Suffixes read as images (lower case). The same set as torchvision's ImageFolder; both PIL and
# DALI's decoder sniff the real format from the bytes, so the suffix only selects candidates.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# ImageNet RGB statistics on the 0-255 scale (the normalisation of torchvision's references).
MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class DatasetLayoutError(FileNotFoundError, UserError):
    """A data root that does not have the `ROOT/<split>/<wnid>/<image>` layout."""


def _class_dirs(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DatasetLayoutError(
            f"{split_dir} is not a directory; expected ROOT/train/<wnid>/*.JPEG and "
            f"ROOT/val/<wnid>/*.JPEG (run `ran-bench data prepare-val` for a flat val folder, or "
            f"`ran-bench data make-demo DIR` for a small demo set)")
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def find_classes(root: str | os.PathLike, split: str = "train") -> list[str]:
    """Sorted class folder names (wnids). The training split defines the classes of every split,
    so a validation folder with a missing class still gets the training indices."""
    root = Path(root)
    ref = root / "train" if (root / "train").is_dir() else root / split
    classes = _class_dirs(ref)
    if not classes:
        raise DatasetLayoutError(f"{ref} has no class folders (expected {ref}/<wnid>/*.JPEG)")
    return classes


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def is_regular_file(entry: os.DirEntry) -> bool:
    """`entry.is_file()` (following symlinks), False for a symlink loop instead of raising."""
    try:
        return entry.is_file()
    except OSError:
        return False


def list_samples(root: str | os.PathLike, split: str) -> tuple[list[str], list[int], list[str]]:
    """`(files, labels, classes)` of one split: files sorted by (wnid, file name), labels = class
    indices, classes = sorted training wnids. Sample index i everywhere means `files[i]`."""
    root = Path(root)
    classes = find_classes(root, split)
    index = {c: i for i, c in enumerate(classes)}
    split_dir = root / split
    present = _class_dirs(split_dir)
    extra = [c for c in present if c not in index]
    if extra:
        raise DatasetLayoutError(
            f"{split_dir} has class folders that are not in {root / 'train'}: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}; both splits must use the same wnids "
            f"(check with `ran-bench data verify {root}`)")
    files: list[str] = []
    labels: list[int] = []
    for c in present:
        names = sorted(e.name for e in os.scandir(split_dir / c) if is_regular_file(e) and is_image_name(e.name))
        files.extend(str(split_dir / c / n) for n in names)
        labels.extend([index[c]] * len(names))
    if not files:
        flat = any(is_regular_file(e) and is_image_name(e.name) for e in os.scandir(split_dir))
        raise DatasetLayoutError(
            f"{split_dir} has no images in class folders (expected {split_dir}/<wnid>/*.JPEG)" + (
                f"; its images lie directly in it, as in the flat ILSVRC2012 validation folder: run "
                f"`ran-bench data prepare-val {split_dir} --ground-truth LOC_val_solution.csv`" if flat else ""))
    return files, labels, classes
