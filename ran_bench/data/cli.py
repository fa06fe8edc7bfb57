"""`ran-bench data`: prepare-val, verify, make-demo and cifar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("prepare-val", help="move the flat ILSVRC2012 validation images into class folders")
    p.add_argument("val_dir", help="folder with ILSVRC2012_val_*.JPEG (becomes VAL_DIR/<wnid>/*.JPEG)")
    p.add_argument("--ground-truth", required=True,
                   help="LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt "
                        "(then --synsets is needed)")
    p.add_argument("--synsets", help="the devkit's ILSVRC2012_ID -> wnid table (meta.mat order) as text: "
                                     "one wnid per line in ID order, or 'ID wnid' lines")
    p.add_argument("--dry-run", action="store_true", help="count what would be moved, move nothing")

    p = sub.add_parser("verify", help="scan a dataset: images per class, class mismatches, odd files")
    p.add_argument("root", help="dataset root with train/<wnid>/ and val/<wnid>/")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--num-classes", type=int, help="expected number of classes (1000 for ImageNet-1K)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.add_argument("--json", help="also write the report as JSON to this file")

    p = sub.add_parser("make-demo", help="generate the small demo dataset (shapes in 10 classes)")
    p.add_argument("out", nargs="?", default="data/demo", help="output folder (default: data/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--min-side", type=int, default=80)
    p.add_argument("--max-side", type=int, default=160)
    p.add_argument("--odd-files", action="store_true",
                   help="also write a grayscale, a CMYK, a PNG-named-.JPEG, a truncated JPEG and a text "
                        "file into the first class of each split (for testing loaders and verify)")

    p = sub.add_parser("cifar", help="convert the official CIFAR-10/100 python archive into class folders of PNGs",
                       description="Convert cifar-10-python.tar.gz or cifar-100-python.tar.gz (download them "
                                   "from https://www.cs.toronto.edu/~kriz/cifar.html) into OUT/train/<label>_<name>/"
                                   "*.png and OUT/val/<label>_<name>/*.png (the test set), lossless 32x32 PNGs; "
                                   "folder order is the official label order.")
    p.add_argument("archive", help="cifar-10-python.tar.gz or cifar-100-python.tar.gz (CIFAR-10 vs 100 is "
                                   "detected from its members)")
    p.add_argument("out", help="new or empty output folder (e.g. data/cifar10, the configs' data.root)")
    p.add_argument("--workers", type=int, default=None, help="PNG-writing processes (default: all cores)")


def main(args: argparse.Namespace) -> int:
    if args.action == "prepare-val":
        return _prepare_val(args)
    if args.action == "verify":
        return _verify(args)
    if args.action == "cifar":
        return _cifar(args)
    return _make_demo(args)


def _prepare_val(args) -> int:
    from ran_bench.data.tools import prepare_val

    r = prepare_val(args.val_dir, args.ground_truth, args.synsets, dry_run=args.dry_run)
    verb = "would move" if args.dry_run else "moved"
    print(f"{args.val_dir}: {verb} {r.moved} images into {r.classes} class folders, "
          f"{r.already_in_place} already in place, {len(r.missing)} listed but missing, "
          f"{len(r.unlisted)} images not in the ground truth (left where they are)")
    for path in r.conflicts:
        print(f"refusing to overwrite {path} (its flat copy is still there; remove one of them)", file=sys.stderr)
    for stem in r.missing[:10]:
        print(f"missing: {stem}", file=sys.stderr)
    return 1 if r.conflicts or r.missing else 0


def _verify(args) -> int:
    import dataclasses
    import os

    from ran_bench.data.tools import format_verify, verify

    workers = args.workers or len(os.sched_getaffinity(0))
    report = verify(args.root, splits=tuple(args.splits), num_classes=args.num_classes, workers=workers)
    print(format_verify(report))
    if args.json:
        from ran_bench.results import write_json_atomic

        write_json_atomic(Path(args.json), dataclasses.asdict(report))
    return 1 if report.errors else 0


def _make_demo(args) -> int:
    from ran_bench.data.demo import CLASSES, make_demo, write_odd_files

    counts = make_demo(args.out, seed=args.seed, num_classes=args.classes, train_per_class=args.train_per_class,
                       val_per_class=args.val_per_class, min_side=args.min_side, max_side=args.max_side)
    if args.odd_files:
        for split in ("train", "val"):
            write_odd_files(Path(args.out) / split / CLASSES[0], seed=args.seed)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {counts['train']} train and {counts['val']} val images in {args.classes} classes "
          f"to {args.out} ({size / 1e6:.1f} MB)")
    return 0


def _cifar(args) -> int:
    import os
    import time

    from ran_bench.data.cifar import convert_cifar

    start = time.perf_counter()
    workers = args.workers or len(os.sched_getaffinity(0))
    r = convert_cifar(args.archive, args.out, workers=workers, progress=sys.stderr.isatty())
    print(f"{r.dataset}: wrote {r.images['train']} train and {r.images['val']} val images in {len(r.classes)} "
          f"classes to {r.out} in {time.perf_counter() - start:.0f} s")
    for split, counts in r.per_class.items():
        print(f"  {split}: {min(counts)}-{max(counts)} images per class")
    print(f"train: ran-bench train --config configs/{r.dataset}_attention92.yaml data.root={r.out}")
    return 0
