"""Data-loader benchmark: images/s of the DALI and torchvision pipelines on the same images, with
the same number of decoding threads (DALI threads = torchvision worker processes) and the same
training transform. Prints a table and writes JSON to `reports/bench/`.

    python -m ran_bench.data.bench [--root DATA] [--threads 2] [--size 224] [--batch-size 64]

Without `--root` it generates 400 ImageNet-sized JPEGs (333-500 px sides, the demo's shapes) in
a temporary folder, so the decode cost per image resembles ImageNet's rather than the demo's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ran_bench.data import build_loader, dali_available, list_samples

DEFAULT_OUT = Path("reports/bench")


def measure(root, backend: str, *, split: str, size: int, batch_size: int, num_threads: int, epochs: int,
            device: str) -> dict[str, Any]:
    """Images/s of one backend over `epochs` timed epochs, after one untimed warm-up epoch. The
    per-epoch start-up (DALI pipeline build, worker start) is inside the timing, as in training."""
    loader = build_loader(root, split, size=size, batch_size=batch_size, backend=backend,
                          num_threads=num_threads, device=device)
    per_epoch = []
    for epoch in range(epochs + 1):
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        n = 0
        for images, labels in loader:
            n += labels.numel()
        if images.is_cuda:
            torch.cuda.synchronize()
        if epoch > 0:
            per_epoch.append(n / (time.perf_counter() - t0))
    return {"backend": loader.backend, "images_per_s": statistics.mean(per_epoch),
            "images_per_s_epochs": per_epoch, "images_per_epoch": loader.num_samples}


def run_bench(root: str | None = None, *, backends=("dali", "torchvision"), split: str = "train", size: int = 224,
              batch_size: int = 64, num_threads: int = 2, epochs: int = 3, device: str | None = None,
              out_dir: Path | None = DEFAULT_OUT) -> dict[str, Any]:
    """Benchmark the backends on the same data; returns (and writes) the figures."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data_name = str(root) if root is not None else "generated: make_demo(seed=0), 333-500 px sides, quality 90"
    with tempfile.TemporaryDirectory(prefix="ran_bench_data_") as tmp:
        if root is None:
            from ran_bench.data.demo import make_demo

            root = str(Path(tmp) / "data")
            make_demo(root, seed=0, train_per_class=40, val_per_class=20, min_side=333, max_side=500, quality=90)
        files, _, _ = list_samples(root, split)
        mean_bytes = statistics.mean(Path(f).stat().st_size for f in files)
        results = []
        for backend in backends:
            if backend == "dali" and not dali_available():
                continue
            results.append(measure(root, backend, split=split, size=size, batch_size=batch_size,
                                   num_threads=num_threads, epochs=epochs, device=device))
    report = {
        "benchmark": "data", "split": split, "size": size, "batch_size": batch_size, "num_threads": num_threads,
        "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
        or platform.machine(), "cpu_cores": len(os.sched_getaffinity(0)), "images": len(files),
        "mean_file_kb": mean_bytes / 1024, "data": data_name, "results": results,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine slows both backends
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"data_{device}_{split}_{num_threads}threads.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        report["path"] = str(path)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"data loaders, {report['split']} transform at {report['size']} px, batch {report['batch_size']}, "
             f"{report['num_threads']} decoding threads/workers, device {report['device']} "
             f"({report['device_name']}, {report['cpu_cores']} cores, load average {report['load_average_1min']:.1f} "
             f"at the end); {report['images']} JPEGs of {report['mean_file_kb']:.0f} kB mean",
             "", "| backend | images/s | per epoch |", "|---|---:|---|"]
    for r in report["results"]:
        lines.append(f"| {r['backend']} | {r['images_per_s']:.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in r['images_per_s_epochs'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ran_bench.data.bench", description=__doc__.splitlines()[0])
    p.add_argument("--root", help="dataset root (default: generated ImageNet-sized JPEGs)")
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="DALI threads = torchvision workers")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backends", nargs="+", default=["dali", "torchvision"])
    p.add_argument("--out-dir", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    report = run_bench(args.root, backends=args.backends, split=args.split, size=args.size,
                       batch_size=args.batch_size, num_threads=args.threads, epochs=args.epochs,
                       device=args.device, out_dir=Path(args.out_dir))
    print(format_report(report))
    print(f"\nwritten to {report['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
