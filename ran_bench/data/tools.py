"""Dataset tools behind `ran-bench data`: arrange the flat ILSVRC2012 validation folder into
class folders, and scan a dataset for the files that trip loaders."""

from __future__ import annotations

import csv
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ran_bench.data.folder import is_image_name
from ran_bench.errors import InputError

WNID = re.compile(r"^n\d{8}$")


# -- prepare-val --------------------------------------------------------------------------------
def read_ground_truth(ground_truth: str | os.PathLike, synsets: str | os.PathLike | None = None) -> dict[str, str]:
    """{validation file stem: wnid} from `LOC_val_solution.csv` (wnids inline) or from the devkit's
    `ILSVRC2012_validation_ground_truth.txt` (one ILSVRC2012_ID per line, line i is image i) plus
    `synsets`, a text file of the devkit's ILSVRC2012_ID -> wnid table (`meta.mat`'s order):
    one wnid per line in ID order, or lines `ID wnid`."""
    ground_truth = Path(ground_truth)
    if not ground_truth.is_file():
        raise InputError(f"--ground-truth {ground_truth} does not exist (LOC_val_solution.csv, or the devkit's "
                         f"ILSVRC2012_validation_ground_truth.txt)")
    text = ground_truth.read_text(encoding="utf-8-sig")  # files saved by Excel start with a BOM
    if ground_truth.suffix.lower() == ".csv" or text.startswith("ImageId"):
        out = {}
        for row in csv.DictReader(text.splitlines()):
            try:
                out[row["ImageId"]] = row["PredictionString"].split()[0]
            except (KeyError, IndexError):
                raise InputError(f"{ground_truth}: expected LOC_val_solution.csv rows "
                                 f"'ImageId,PredictionString', got {row}") from None
        return out
    try:
        ids = [int(x) for x in text.split()]
    except ValueError:
        raise InputError(f"{ground_truth} is neither LOC_val_solution.csv (header 'ImageId,PredictionString') "
                         f"nor the devkit's ground truth (one ILSVRC2012_ID per line)") from None
    if synsets is None:
        raise InputError(f"{ground_truth} holds ILSVRC2012_IDs, not wnids: pass --synsets with the devkit's "
                         f"ID -> wnid table (from meta.mat), or use LOC_val_solution.csv instead")
    table = _read_synsets(Path(synsets))
    bad = sorted({i for i in ids if i not in table})
    if bad:
        raise InputError(f"{ground_truth} uses ILSVRC2012_IDs {bad[:5]} that {synsets} does not define")
    return {f"ILSVRC2012_val_{i + 1:08d}": table[cls] for i, cls in enumerate(ids)}


def _read_synsets(path: Path) -> dict[int, str]:
    if not path.is_file():
        raise InputError(f"--synsets {path} does not exist (the devkit's ILSVRC2012_ID -> wnid table)")
    table: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if parts[0].isdigit() and len(parts) > 1 and WNID.match(parts[1]):
            table[int(parts[0])] = parts[1]
        elif WNID.match(parts[0]):
            table[len(table) + 1] = parts[0]
        else:
            raise InputError(f"{path}:{lineno}: expected 'wnid' or 'ILSVRC2012_ID wnid', got {line!r}")
    wnids = [table[k] for k in sorted(table)]
    if len(wnids) > 1 and wnids == sorted(wnids):
        raise InputError(
            f"{path} lists the wnids in sorted order, which is not the devkit's ILSVRC2012_ID order "
            f"(it looks like LOC_synset_mapping.txt); with it every validation label would be wrong. "
            f"Export the (ILSVRC2012_ID, WNID) pairs of the devkit's meta.mat, or use LOC_val_solution.csv")
    return table


@dataclass
class PrepareReport:
    moved: int = 0
    already_in_place: int = 0
    missing: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    classes: int = 0


def prepare_val(val_dir: str | os.PathLike, ground_truth: str | os.PathLike, synsets=None, *,
                dry_run: bool = False) -> PrepareReport:
    """Move `VAL_DIR/<stem>.JPEG` into `VAL_DIR/<wnid>/<stem>.JPEG`. Idempotent (files already in
    their class folder are counted, not moved); never overwrites an existing destination."""
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise InputError(f"{val_dir} is not a directory (the folder of ILSVRC2012_val_*.JPEG)")
    truth = read_ground_truth(ground_truth, synsets)
    report = PrepareReport(classes=len(set(truth.values())))
    flat = {Path(e.name).stem: e.name for e in os.scandir(val_dir) if e.is_file() and is_image_name(e.name)}
    report.unlisted = sorted(name for stem, name in flat.items() if stem not in truth)
    placed = {(d.name, Path(f.name).stem) for d in os.scandir(val_dir) if d.is_dir()
              for f in os.scandir(d.path) if f.is_file()}
    for stem, wnid in sorted(truth.items()):
        name = flat.get(stem)
        if name is None:
            if (wnid, stem) in placed:
                report.already_in_place += 1
            else:
                report.missing.append(stem)
            continue
        dest = val_dir / wnid / name
        if dest.exists():
            report.conflicts.append(str(dest))
            continue
        if not dry_run:
            dest.parent.mkdir(exist_ok=True)
            os.rename(val_dir / name, dest)
        report.moved += 1
    return report


# -- verify -------------------------------------------------------------------------------------
# Kinds of odd files; FATAL ones break training, the others are handled by the loaders.
ODD_KINDS = {
    "undecodable": "cannot be decoded (truncated or corrupt); the loaders replace it by a flat image",
    "grayscale": "grayscale JPEG; decoded to 3-channel RGB by both loaders",
    "cmyk": "CMYK JPEG; decoded to RGB by both loaders",
    "other_mode": "unusual colour mode; converted to RGB",
    "wrong_format": "not a JPEG although named so (PNG, BMP, TIFF, WebP, PNM, JPEG 2000); both loaders "
                    "sniff the format and decode it",
    "dali_unsupported": "a format DALI's decoder cannot read (e.g. GIF) although named as an image; the "
                        "torchvision loader decodes it, the DALI loader replaces it by a flat image. "
                        "Convert it to JPEG to train on it with DALI",
    "non_image": "not an image file; ignored by the loaders",
    "stray": "file outside a class folder; ignored by the loaders",
}


# PIL's names of the formats DALI's decoders.image reads (checked with DALI 2.4 on the CPU: GIF,
# ICO and TGA fail; "PPM" is PIL's name for every PNM file; "MPO" is a camera JPEG carrying extra
# pictures, which DALI decodes as the JPEG it starts with).
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})


def inspect_image(path: str) -> tuple[str, list[str], str]:
    """(path, odd kinds, detail) after fully decoding the file with PIL."""
    kinds: list[str] = []
    try:
        with Image.open(path) as im:
            fmt, mode = im.format, im.mode
            im.load()
    except Exception as e:  # noqa: BLE001 - every failure is a finding, not a crash
        return path, ["undecodable"], f"{type(e).__name__}: {e}"
    if fmt not in DALI_FORMATS:
        kinds.append("dali_unsupported")
    elif path.lower().endswith((".jpg", ".jpeg")) and fmt not in ("JPEG", "MPO"):
        kinds.append("wrong_format")
    if mode == "L":
        kinds.append("grayscale")
    elif mode == "CMYK":
        kinds.append("cmyk")
    elif mode != "RGB":
        kinds.append("other_mode")
    return path, kinds, f"{fmt} {mode}"


@dataclass
class VerifyReport:
    root: str
    images: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> count
    odd: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # kind -> [(path, detail)]
    errors: list[str] = field(default_factory=list)  # problems that break training
    warnings: list[str] = field(default_factory=list)


def verify(root: str | os.PathLike, *, splits=("train", "val"), num_classes: int | None = None,
           workers: int = 1, progress: bool = True) -> VerifyReport:
    """Decode every file of ROOT/<split>/<class>/ and report counts, class mismatches and odd files."""
    from tqdm import tqdm

    root = Path(root)
    report = VerifyReport(root=str(root))
    odd: dict[str, list[tuple[str, str]]] = {k: [] for k in ODD_KINDS}
    to_decode: list[str] = []
    present = [s for s in splits if (root / s).is_dir()]
    for split in splits:
        if split not in present:
            report.errors.append(f"missing split folder {root / split}")
    for split in present:
        counts: dict[str, int] = {}
        for entry in sorted(os.scandir(root / split), key=lambda e: e.name):
            if entry.is_file():
                odd["stray"].append((entry.path, "not in a class folder"))
                continue
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            n = 0
            for f in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if not f.is_file():
                    odd["stray"].append((f.path, "not a file"))
                elif is_image_name(f.name):
                    to_decode.append(f.path)
                    n += 1
                else:
                    odd["non_image"].append((f.path, "suffix is not an image suffix"))
            counts[entry.name] = n
        report.images[split] = counts

    with ProcessPoolExecutor(workers) if workers > 1 else _Inline() as pool:
        results = pool.map(inspect_image, to_decode, chunksize=64)
        for path, kinds, detail in tqdm(results, total=len(to_decode), desc=f"verify {root}",
                                        unit="img", disable=not progress):
            for k in kinds:
                odd[k].append((path, detail))
    report.odd = {k: v for k, v in odd.items() if v}

    train = report.images.get("train", {})
    for split, counts in report.images.items():
        if not counts:
            flat = any(is_image_name(Path(p).name) and Path(p).parent == root / split for p, _ in odd["stray"])
            report.errors.append(
                f"{root / split} has no class folders" + (
                    f"; its images lie directly in it (the flat ILSVRC2012 validation folder): sort them "
                    f"into class folders with `ran-bench data prepare-val {root / split} --ground-truth "
                    f"LOC_val_solution.csv`" if flat else ""))
            continue
        if sum(counts.values()) == 0:
            report.errors.append(f"{root / split} has no images")
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            report.warnings.append(f"{split}: {len(empty)} class folders without images: {empty[:5]}")
        if num_classes is not None and len(counts) != num_classes:
            report.errors.append(f"{split} has {len(counts)} classes, expected {num_classes}")
        if split != "train" and train:
            extra = sorted(set(counts) - set(train))
            missing = sorted(set(train) - set(counts))
            if extra:
                report.errors.append(f"{split} has classes that train lacks (class indices would not "
                                     f"match): {extra[:5]}{' ...' if len(extra) > 5 else ''}")
            if missing:
                report.warnings.append(f"{split} lacks {len(missing)} training classes: {missing[:5]}")
    return report


class _Inline:
    """A stand-in for a process pool when workers=1 (no processes to start for small sets)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items, chunksize=1):
        return map(fn, items)


def format_verify(report: VerifyReport) -> str:
    lines = [f"dataset {report.root}"]
    for split, counts in report.images.items():
        if counts:
            values = sorted(counts.values())
            lines.append(f"  {split}: {sum(values)} images in {len(values)} classes "
                         f"(per class min {values[0]}, median {values[len(values) // 2]}, max {values[-1]})")
    for kind, items in report.odd.items():
        lines.append(f"  {len(items)} {kind}: {ODD_KINDS[kind]}")
        lines.extend(f"    {path}  ({detail})" for path, detail in items)
    lines.extend(f"  warning: {w}" for w in report.warnings)
    lines.extend(f"  ERROR: {e}" for e in report.errors)
    lines.append("  result: " + ("problems that break training, see ERROR lines" if report.errors else
                                 "usable for training"))
    return "\n".join(lines)
