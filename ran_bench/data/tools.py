"""Dataset tools behind `ran-bench data`: arrange the flat ILSVRC2012 validation folder into
class folders, and scan a dataset for the files that trip loaders, with each loader's verdict."""

from __future__ import annotations

import csv
import io
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ran_bench.data.dali import dali_version, find_undecodable
from ran_bench.data.folder import is_image_name, is_regular_file
from ran_bench.errors import InputError
from ran_bench.runtime import dali_available

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
# Kinds of odd files and what the loaders do with them.
ODD_KINDS = {
    "unreadable": "cannot be read (no permission, I/O error): both loaders stop the run on it, a file-system "
                  "fault; restore the file",
    "empty": "zero-byte file; both loaders replace it by a flat image",
    "undecodable": "cannot be decoded (truncated, corrupt, not an image); both loaders replace it by a flat image",
    "dali_unsupported": "PIL decodes it, DALI cannot (e.g. a GIF named .JPEG): the torchvision loader decodes it, "
                        "the DALI loader replaces it by a flat image. Convert it to JPEG to train on it with DALI",
    "pil_unsupported": "DALI decodes it, PIL cannot: the DALI loader decodes it, the torchvision loader replaces "
                       "it by a flat image",
    "grayscale": "grayscale JPEG; decoded to 3-channel RGB by both loaders",
    "cmyk": "CMYK JPEG; decoded to RGB by both loaders",
    "other_mode": "unusual colour mode; converted to RGB",
    "wrong_format": "not a JPEG although named so (PNG, BMP, TIFF, WebP, PNM, JPEG 2000); both loaders "
                    "sniff the format and decode it",
    "non_image": "not an image file; ignored by the loaders",
    "broken_symlink": "symbolic link to nothing (a missing target or a loop); ignored by the loaders, which list "
                      "only regular files",
    "not_a_file": "not a regular file (a folder, FIFO or socket); ignored by the loaders",
    "stray": "file outside a class folder; ignored by the loaders",
}
# The kinds each loader replaces by a flat image.
REPLACED = {"torchvision": ("empty", "undecodable", "pil_unsupported"),
            "dali": ("empty", "undecodable", "dali_unsupported")}


# PIL's names of the formats DALI's decoders.image reads (checked with DALI 2.4 on the CPU: GIF,
# ICO and TGA fail; "PPM" is PIL's name for every PNM file; "MPO" is a camera JPEG carrying extra
# pictures, which DALI decodes as the JPEG it starts with). DALI's verdict without DALI.
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})


def inspect_image(path: str) -> tuple[str, list[str], str]:
    """(path, odd kinds, detail) after reading the file and decoding it with PIL as the torchvision
    loader does; "dali_unsupported" from the format (`DALI_FORMATS`)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return path, ["unreadable"], e.strerror or str(e)
    if not data:
        return path, ["empty"], "0 bytes"
    kinds: list[str] = []
    buf = io.BytesIO(data)
    try:
        with Image.open(buf) as im:
            fmt, mode = im.format, im.mode
            im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - every failure is a finding, not a crash
        return path, ["undecodable"], f"{type(e).__name__}: {e}".replace(f" {buf!r}", "")  # PIL names the buffer
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


def dali_undecodable(paths: list[str], *, num_threads: int, progress: bool) -> set[str]:
    """The files among `paths` that the DALI loader replaces, found with its own checked decode
    (`find_undecodable`: peek, the random-crop decoder and a full decode), 1024 files at a time."""
    bad: set[str] = set()
    with tqdm(total=len(paths), desc="decode with DALI", unit="img", disable=not progress) as bar:
        for i in range(0, len(paths), 1024):
            part = paths[i:i + 1024]
            bad.update(find_undecodable(part, train=True, num_threads=num_threads))
            bar.update(len(part))
    return bad


@dataclass
class VerifyReport:
    root: str
    images: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> count
    odd: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # kind -> [(path, detail)]
    replaced: dict[str, list[str]] = field(default_factory=dict)  # backend -> files it replaces by a flat image
    dali_verdict: str = ""  # how the DALI loader's verdict was obtained
    errors: list[str] = field(default_factory=list)  # problems that break training
    warnings: list[str] = field(default_factory=list)


def verify(root: str | os.PathLike, *, splits=("train", "val"), num_classes: int | None = None,
           workers: int = 1, progress: bool = True, dali: bool | None = None) -> VerifyReport:
    """Read and decode every file of ROOT/<split>/<class>/ and report counts, class mismatches, odd
    files and what each loader does with them. `dali`: decode every file with DALI too, for the
    DALI loader's verdict (default: when DALI is installed); else it is judged by the file format."""
    root = Path(root)
    report = VerifyReport(root=str(root))
    odd: dict[str, list[tuple[str, str]]] = {k: [] for k in ODD_KINDS}
    to_decode = _scan(root, splits, report, odd)
    found: dict[str, tuple[list[str], str]] = {}
    with ProcessPoolExecutor(workers) if workers > 1 else _Inline() as pool:
        results = pool.map(inspect_image, to_decode, chunksize=64)
        for path, kinds, detail in tqdm(results, total=len(to_decode), desc=f"verify {root}",
                                        unit="img", disable=not progress):
            found[path] = kinds, detail
    if dali_available() if dali is None else dali:
        _decode_with_dali(found, workers=workers, progress=progress)
        report.dali_verdict = f"decoded every file with DALI {dali_version()} on the CPU, as the loader does"
    else:
        report.dali_verdict = ("judged by the file format that PIL reads, without decoding with DALI "
                               "(DALI is not installed, or --no-dali)")
    for path in to_decode:
        kinds, detail = found[path]
        for k in kinds:
            odd[k].append((path, detail))
    report.odd = {k: v for k, v in odd.items() if v}
    report.replaced = {backend: sorted(p for k in kinds for p, _ in odd[k]) for backend, kinds in REPLACED.items()}
    if odd["unreadable"]:
        path, cause = odd["unreadable"][0]
        report.errors.append(f"{len(odd['unreadable'])} unreadable file(s), e.g. {path} ({cause}); both loaders "
                             f"stop the run on them")
    _check_splits(report, root, num_classes, odd["stray"])
    return report


def _scan(root: Path, splits, report: VerifyReport, odd: dict[str, list[tuple[str, str]]]) -> list[str]:
    """List ROOT/<split>/<class>/: the image files to decode; counts, missing splits and files the
    loaders ignore go into `report` and `odd`."""
    to_decode: list[str] = []
    present = [s for s in splits if (root / s).is_dir()]
    report.errors += [f"missing split folder {root / s}" for s in splits if s not in present]
    for split in present:
        counts: dict[str, int] = {}
        for entry in sorted(os.scandir(root / split), key=lambda e: e.name):
            if entry.is_symlink() and not os.path.exists(entry.path):
                odd["broken_symlink"].append((entry.path, f"-> {os.readlink(entry.path)}"))
                continue
            if entry.is_file():
                odd["stray"].append((entry.path, "not in a class folder"))
                continue
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            n = 0
            for f in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if f.is_symlink() and not os.path.exists(f.path):
                    odd["broken_symlink"].append((f.path, f"-> {os.readlink(f.path)}"))
                elif not is_regular_file(f):
                    odd["not_a_file"].append((f.path, "a folder" if f.is_dir() else "not a regular file"))
                elif is_image_name(f.name):
                    to_decode.append(f.path)
                    n += 1
                else:
                    odd["non_image"].append((f.path, "suffix is not an image suffix"))
            counts[entry.name] = n
        report.images[split] = counts
    return to_decode


def _decode_with_dali(found: dict[str, tuple[list[str], str]], *, workers: int, progress: bool) -> None:
    """Replace the format-based DALI verdict in `found` (path -> (kinds, detail)) by DALI's own."""
    readable = [p for p, (kinds, _) in found.items() if kinds != ["unreadable"]]
    dali_bad = dali_undecodable(readable, num_threads=workers, progress=progress)
    for path in readable:
        kinds, detail = found[path]
        kinds = [k for k in kinds if k != "dali_unsupported"]
        if kinds == ["undecodable"] and path not in dali_bad:
            kinds = ["pil_unsupported"]
        elif path in dali_bad and kinds not in (["undecodable"], ["empty"]):
            kinds = ["dali_unsupported"] + [k for k in kinds if k != "wrong_format"]
        found[path] = kinds, detail


def _check_splits(report: VerifyReport, root: Path, num_classes: int | None, stray: list[tuple[str, str]]) -> None:
    """Errors and warnings about the class folders of each split."""
    train = report.images.get("train", {})
    for split, counts in report.images.items():
        if not counts:
            flat = any(is_image_name(Path(p).name) and Path(p).parent == root / split for p, _ in stray)
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
    lines.append(f"  DALI loader's verdict: {report.dali_verdict}")
    tv, dali = (len(report.replaced.get(b, [])) for b in ("torchvision", "dali"))
    replaced = f"the torchvision loader replaces {tv} files by a flat image, the DALI loader {dali}"
    lines.append("  result: " + (f"training stops with both loaders, see ERROR lines ({replaced})" if report.errors
                                 else f"usable for training: {replaced}"))
    return "\n".join(lines)
