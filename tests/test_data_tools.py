"""`ran-bench data`: make-demo, verify and prepare-val through the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_faults import make_unreadable
from test_data_odd_files import odd_bytes

from ran_bench import data
from ran_bench.cli import main
from ran_bench.data import UnreadableFileError, build_loader, list_samples

needs_dali = pytest.mark.skipif(not data.dali_available(), reason="NVIDIA DALI is not installed")


def _demo(out: Path, *extra: str) -> int:
    return main(["data", "make-demo", str(out), "--classes", "3", "--train-per-class", "3",
                 "--val-per-class", "2", "--min-side", "24", "--max-side", "40", *extra])


def test_make_demo_is_deterministic_and_refuses_to_overwrite(tmp_path, capsys):
    assert _demo(tmp_path / "a") == 0
    assert "wrote 9 train and 6 val images in 3 classes" in capsys.readouterr().out
    assert _demo(tmp_path / "b") == 0
    files_a, labels, classes = list_samples(tmp_path / "a", "train")
    files_b, _, _ = list_samples(tmp_path / "b", "train")
    assert classes == ["circle", "square", "triangle"] and labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [Path(f).read_bytes() for f in files_a] == [Path(f).read_bytes() for f in files_b]
    assert _demo(tmp_path / "a") == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["data", "make-demo", str(tmp_path / "c"), "--seed", "1", "--classes", "3",
                 "--train-per-class", "3", "--val-per-class", "2", "--min-side", "24", "--max-side", "40"]) == 0
    assert Path(list_samples(tmp_path / "c", "train")[0][0]).read_bytes() != Path(files_a[0]).read_bytes()


def test_verify_reports_every_odd_kind_and_passes(tmp_path, capsys):
    assert _demo(tmp_path / "d", "--odd-files") == 0
    capsys.readouterr()
    assert main(["data", "verify", str(tmp_path / "d"), "--workers", "1", "--json", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    for kind, name in (("undecodable", "odd_truncated.JPEG"), ("grayscale", "odd_grayscale.JPEG"),
                       ("cmyk", "odd_cmyk.JPEG"), ("wrong_format", "odd_png.JPEG"), ("non_image", "notes.txt")):
        assert f"2 {kind}:" in out, kind  # one in train/circle, one in val/circle
        assert str(tmp_path / "d" / "val" / "circle" / name) in out
    assert "train: 13 images in 3 classes" in out  # 9 demo images + 4 odd image files
    assert "usable for training" in out
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["images"]["val"] == {"circle": 6, "square": 2, "triangle": 2} and report["errors"] == []


def test_verify_fails_on_problems_that_break_training(tmp_path, capsys):
    assert _demo(tmp_path / "d") == 0
    (tmp_path / "d" / "val" / "n99999999").mkdir()
    assert main(["data", "verify", str(tmp_path / "d"), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "ERROR: val has classes that train lacks" in out and "n99999999" in out
    (tmp_path / "d" / "val" / "n99999999").rmdir()
    assert main(["data", "verify", str(tmp_path / "d"), "--workers", "1", "--num-classes", "1000"]) == 1
    assert "train has 3 classes, expected 1000" in capsys.readouterr().out
    assert main(["data", "verify", str(tmp_path / "nowhere"), "--workers", "1"]) == 1


def _flat_val(tmp_path: Path, n: int = 5) -> Path:
    val = tmp_path / "val"
    val.mkdir()
    for i in range(1, n + 1):
        (val / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(f"image {i}".encode())
    return val


def test_prepare_val_from_loc_csv_is_idempotent_and_never_overwrites(tmp_path, capsys):
    val = _flat_val(tmp_path)
    wnids = ["n01440764", "n01443537", "n01440764", "n01484850", "n01443537"]
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i:08d},{w} 1 2 3 4 {w} 5 6 7 8\n" for i, w in enumerate(wnids, 1)))
    assert main(["data", "prepare-val", str(val), "--ground-truth", str(csv)]) == 0
    assert "moved 5 images into 3 class folders, 0 already in place" in capsys.readouterr().out
    for i, w in enumerate(wnids, 1):
        assert (val / w / f"ILSVRC2012_val_{i:08d}.JPEG").read_bytes() == f"image {i}".encode()
    assert main(["data", "prepare-val", str(val), "--ground-truth", str(csv)]) == 0
    assert "moved 0 images into 3 class folders, 5 already in place" in capsys.readouterr().out
    # a flat copy reappears next to the placed file: refuse, keep both
    (val / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"other")
    assert main(["data", "prepare-val", str(val), "--ground-truth", str(csv)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (val / wnids[0] / "ILSVRC2012_val_00000001.JPEG").read_bytes() == b"image 1"


def test_prepare_val_from_devkit_ids_and_synsets(tmp_path, capsys):
    val = _flat_val(tmp_path, 4)
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("2\n1\n2\n3\n")
    synsets = tmp_path / "synsets.txt"  # devkit ID order is not sorted wnid order
    synsets.write_text("1 n02119789\n2 n02100735\n3 n02110185\n")
    assert main(["data", "prepare-val", str(val), "--ground-truth", str(gt), "--dry-run"]) == 2
    assert "--synsets" in capsys.readouterr().err
    assert main(["data", "prepare-val", str(val), "--ground-truth", str(gt), "--synsets", str(synsets)]) == 0
    assert sorted(p.relative_to(val).as_posix() for p in val.rglob("*.JPEG")) == [
        "n02100735/ILSVRC2012_val_00000001.JPEG", "n02100735/ILSVRC2012_val_00000003.JPEG",
        "n02110185/ILSVRC2012_val_00000004.JPEG", "n02119789/ILSVRC2012_val_00000002.JPEG"]


def test_prepare_val_rejects_a_sorted_synset_list(tmp_path, capsys):
    val = _flat_val(tmp_path, 2)
    gt = tmp_path / "gt.txt"
    gt.write_text("1\n2\n")
    synsets = tmp_path / "LOC_synset_mapping.txt"
    synsets.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    assert main(["data", "prepare-val", str(val), "--ground-truth", str(gt), "--synsets", str(synsets)]) == 2
    assert "sorted order" in capsys.readouterr().err
    assert len(list(val.glob("*.JPEG"))) == 2  # nothing moved


def _loaders_replace(root: Path, backend: str) -> list[str]:
    """The files a loader replaces by a flat image over one pass of train (batch 1: nothing dropped) and val."""
    bad = []
    for split in ("train", "val"):
        ld = build_loader(root, split, size=24, batch_size=1, backend=backend, num_threads=1)
        assert sum(len(y) for _, y in ld) == len(list_samples(root, split)[0])
        bad += ld.bad_files
    return sorted(bad)


@pytest.mark.parametrize("use_dali", [pytest.param(True, marks=needs_dali), False])
def test_verify_gives_each_loaders_verdict(tmp_path, capsys, use_dali):
    """What verify says each loader does is what it does: a text file and an empty file named
    .JPEG are replaced by both, a GIF named .JPEG by DALI only (PIL reads GIF); a dangling
    symlink is called a broken symlink and ignored by both. With DALI installed the DALI verdict
    comes from decoding with DALI; without (--no-dali), from the file format."""
    root = tmp_path / "d"
    assert _demo(root) == 0
    for split in ("train", "val"):
        for kind in ("text", "gif", "empty"):
            (root / split / "circle" / f"zz_{kind}.JPEG").write_bytes(odd_bytes(kind))
    (root / "val" / "square" / "zz_link.JPEG").symlink_to(root / "val" / "square" / "gone.JPEG")
    capsys.readouterr()
    flags = [] if use_dali else ["--no-dali"]
    assert main(["data", "verify", str(root), "--workers", "1", "--json", str(tmp_path / "v.json"), *flags]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "v.json").read_text())
    expected = {"torchvision": sorted(str(root / s / "circle" / f"zz_{k}.JPEG") for s in ("train", "val")
                                      for k in ("text", "empty")),
                "dali": sorted(str(root / s / "circle" / f"zz_{k}.JPEG") for s in ("train", "val")
                               for k in ("text", "gif", "empty"))}
    assert report["replaced"] == expected
    for backend in ("torchvision", "dali") if data.dali_available() else ("torchvision",):
        assert _loaders_replace(root, backend) == expected[backend], backend
    assert ("result: usable for training: the torchvision loader replaces 4 files by a flat image, "
            "the DALI loader 6") in out
    assert ("decoded every file with DALI" if use_dali else "judged by the file format") in out
    assert "2 empty: zero-byte file; both loaders replace it" in out
    assert "2 dali_unsupported: PIL decodes it, DALI cannot" in out and "wrong_format" not in out
    assert "1 broken_symlink: symbolic link to nothing" in out and str(root / "val" / "square" / "zz_link.JPEG") in out
    assert "stray" not in out


def test_verify_fails_on_an_unreadable_file_as_both_loaders_do(tmp_path, capsys):
    """A file that cannot be read stops both loaders (a file-system fault), so verify must call
    it an error and exit non-zero, not "usable for training"."""
    root = tmp_path / "d"
    assert _demo(root) == 0
    bad = list_samples(root, "train")[0][4]
    make_unreadable(bad)
    capsys.readouterr()
    assert main(["data", "verify", str(root), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "1 unreadable: cannot be read" in out and f"{bad}  (Input/output error)" in out
    assert f"ERROR: 1 unreadable file(s), e.g. {bad} (Input/output error); both loaders stop the run on them" in out
    assert "result: training stops with both loaders, see ERROR lines" in out
    for backend in ("torchvision", "dali") if data.dali_available() else ("torchvision",):
        with pytest.raises(UnreadableFileError, match=f"cannot read {re.escape(bad)}"):
            _loaders_replace(root, backend)


def test_a_flat_val_folder_names_prepare_val(tmp_path, capsys):
    assert _demo(tmp_path / "d") == 0
    val = tmp_path / "d" / "val"
    for i, f in enumerate(sorted(val.rglob("*.JPEG"))):
        f.rename(val / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    for d in [d for d in val.iterdir() if d.is_dir()]:
        d.rmdir()
    capsys.readouterr()
    assert main(["data", "verify", str(tmp_path / "d"), "--workers", "1"]) == 1
    assert f"`ran-bench data prepare-val {val} --ground-truth LOC_val_solution.csv`" in capsys.readouterr().out
    from ran_bench.data import DatasetLayoutError, build_loader

    with pytest.raises(DatasetLayoutError, match="ran-bench data prepare-val"):
        build_loader(tmp_path / "d", "val", size=24, batch_size=2, backend="torchvision", num_threads=0)


def test_prepare_val_reads_a_csv_with_a_byte_order_mark(tmp_path, capsys):
    val = _flat_val(tmp_path, 2)
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 3 4\n"
                   "ILSVRC2012_val_00000002,n01443537 1 2 3 4\n", encoding="utf-8-sig")
    assert csv.read_bytes().startswith(b"\xef\xbb\xbf")
    assert main(["data", "prepare-val", str(val), "--ground-truth", str(csv)]) == 0
    assert (val / "n01443537" / "ILSVRC2012_val_00000002.JPEG").is_file()


def test_a_camera_mpo_jpeg_is_not_reported_as_odd(tmp_path):
    # Cameras write MPO (a JPEG followed by more pictures); PIL names the format MPO, and DALI and
    # PIL both decode its first picture, so verify must not tell users to convert it.
    from ran_bench.data.tools import inspect_image

    first = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    path = tmp_path / "camera.JPEG"
    first.save(path, format="MPO", save_all=True, append_images=[Image.new("RGB", (50, 40))])
    assert inspect_image(str(path)) == (str(path), [], "MPO RGB")
