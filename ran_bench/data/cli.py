"""`ran-bench data`: prepare-val, verify, make-demo and cifar (arguments: ran_bench.cli)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from ran_bench.data.cifar import convert_cifar
from ran_bench.data.demo import CLASSES, make_demo, write_odd_files
from ran_bench.data.tools import format_verify, prepare_val, verify
from ran_bench.fileio import write_json_atomic


def main(args: argparse.Namespace) -> int:
    if args.action == "prepare-val":
        return _prepare_val(args)
    if args.action == "verify":
        return _verify(args)
    if args.action == "cifar":
        return _cifar(args)
    return _make_demo(args)


def _prepare_val(args) -> int:
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
    workers = args.workers or len(os.sched_getaffinity(0))
    report = verify(args.root, splits=tuple(args.splits), num_classes=args.num_classes, workers=workers,
                    dali=False if args.no_dali else None)
    print(format_verify(report))
    if args.json:
        write_json_atomic(Path(args.json), dataclasses.asdict(report))
    return 1 if report.errors else 0


def _make_demo(args) -> int:
    counts = make_demo(args.out, seed=args.seed, num_classes=args.classes, train_per_class=args.train_per_class,
                       val_per_class=args.val_per_class, min_side=args.min_side, max_side=args.max_side,
                       workers=args.workers)
    if args.odd_files:
        for split in ("train", "val"):
            write_odd_files(Path(args.out) / split / CLASSES[0], seed=args.seed)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {counts['train']} train and {counts['val']} val images in {args.classes} classes "
          f"to {args.out} ({size / 1e6:.1f} MB)")
    return 0


def _cifar(args) -> int:
    start = time.perf_counter()
    workers = args.workers or len(os.sched_getaffinity(0))
    r = convert_cifar(args.archive, args.out, workers=workers, progress=sys.stderr.isatty())
    print(f"{r.dataset}: wrote {r.images['train']} train and {r.images['val']} val images in {len(r.classes)} "
          f"classes to {r.out} in {time.perf_counter() - start:.0f} s")
    for split, counts in r.per_class.items():
        print(f"  {split}: {min(counts)}-{max(counts)} images per class")
    print(f"train: ran-bench train --config configs/{r.dataset}_attention92.yaml data.root={r.out}")
    return 0
