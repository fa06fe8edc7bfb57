"""One benchmark result (`BenchRecord`): the environment it was measured in, its JSON file and its
row of results.csv. The JSON keys and the CSV columns are the fields of `BenchRecord`, in order.
Older rows read a new field as empty (new fields go last, so column positions hold too); renaming
or dropping one breaks the readers (the README, users' scripts), so it needs a new SCHEMA_VERSION
and a migrated reports/bench/results.csv."""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ran_bench.bench import BenchError
from ran_bench.fileio import atomic_write, git_commit
from ran_bench.runtime import device_name

SCHEMA_VERSION = 1


@dataclass
class BenchRecord:
    """One benchmark result: the JSON file, and one row of results.csv (lists joined by spaces).

    Rates are images/s of one process unless named `_total`; None = not measured in this mode.
    """

    mode: str
    model: str
    size: int
    batch_size: int  # per process
    world_size: int
    precision: str
    channels_last: bool
    compile: bool
    backend: str  # loader of the timed batches: "synthetic" = random tensors made once on the device
    steps: int
    warmup: int
    repeats: int
    step_time_s: list[float]  # mean seconds per step in each repeat
    step_time_median_s: float
    images_per_s: float  # median over repeats
    images_per_s_min: float
    images_per_s_max: float
    images_per_s_total: float  # all processes
    peak_memory_mib: float
    peak_memory_kind: str
    params: int | None
    macs: int | None  # multiply-adds of one forward pass of one image at `size`
    flops_per_image: int | None
    tflops: float | None
    peak_tflops: float | None
    peak_source: str
    mfu: float | None
    flop_convention: str
    # "is my data loader the bottleneck?" (train with --data-root)
    data_root: str | None = None
    end_to_end_backend: str | None = None
    end_to_end_images_per_s: float | None = None
    end_to_end_fraction: float | None = None  # end-to-end / model-only rate
    limiter: str | None = None  # "data loader" or "model"
    # overhead check (train with --overhead): step-time ratios on the same pre-made batches
    overhead_trainer_images_per_s: float | None = None
    bare_images_per_s: float | None = None
    trainer_over_bare: float | None = None
    timm_images_per_s: float | None = None
    trainer_over_timm: float | None = None
    timm_model: str | None = None
    # scaling (one record per process count)
    scaling_efficiency: float | None = None
    # data mode: decoding threads/workers per process
    num_threads: int | None = None
    # environment
    device_type: str = ""
    device_name: str = ""
    torch_version: str = ""
    cuda_version: str = ""
    cudnn_version: str = ""
    dali_version: str = ""
    timm_version: str = ""
    accelerate_version: str = ""
    python_version: str = ""
    load_average_1min: float | None = None  # other work on the machine at the end of the run
    git_commit: str = ""
    time_utc: str = ""
    command: str = ""
    schema_version: int = SCHEMA_VERSION
    # Unfused roofline of the training step (train on a GPU of ran_bench.bench.flops.ROOFLINE_DEVICES):
    # after schema_version, so that schema 1's columns keep their positions.
    roofline_images_per_s: float | None = None  # a computed limit, not a measurement
    roofline_fraction: float | None = None  # images_per_s / roofline_images_per_s
    roofline_source: str | None = None  # the DEVICES entry used, or why there is no roofline


CSV_FIELDS = [f.name for f in dataclasses.fields(BenchRecord)]


def device_description(device: torch.device) -> str:
    """The device, and on CPU how many cores and torch threads the figures were measured with."""
    if device.type == "cuda":
        return device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{device_name(device)} ({cores} cores, {torch.get_num_threads()} torch threads/process)"


def _dist_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def software_versions(device: torch.device) -> dict[str, str]:
    """Versions a throughput figure depends on ("" when absent; CUDA and cuDNN only for CUDA runs)."""
    dali = next((d.version for d in importlib.metadata.distributions()
                 if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")), "")
    return {
        "torch_version": torch.__version__,
        "cuda_version": (torch.version.cuda or "") if device.type == "cuda" else "",
        "cudnn_version": str(torch.backends.cudnn.version() or "") if device.type == "cuda" else "",
        "dali_version": dali,
        "timm_version": _dist_version("timm"),
        "accelerate_version": _dist_version("accelerate"),
        "python_version": platform.python_version(),
    }


def fill_environment(record: BenchRecord, device: torch.device, command: str) -> BenchRecord:
    """Set the record's device, software versions, load, commit, time and command; returns it."""
    record.device_type = device.type
    record.device_name = device_description(device)
    for key, value in software_versions(device).items():
        setattr(record, key, value)
    record.load_average_1min = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    record.git_commit = git_commit()
    record.time_utc = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    record.command = command
    return record


def record_name(record: BenchRecord) -> str:
    """File stem of a record's JSON: what was measured, where."""
    parts = [record.mode, record.model or record.backend, str(record.size), record.precision,
             f"bs{record.batch_size}"]
    if record.world_size > 1:
        parts.append(f"np{record.world_size}")
    if record.channels_last:
        parts.append("cl")
    if record.compile:
        parts.append("compile")
    parts.append(record.device_type)
    return "_".join(parts)


def write_json(records: Sequence[BenchRecord], json_path: Path) -> None:
    """One record as a JSON object, several (a scaling run) as a list, written atomically."""
    payload: Any = dataclasses.asdict(records[0]) if len(records) == 1 else [dataclasses.asdict(r) for r in records]
    with atomic_write(json_path) as f:
        f.write(json.dumps(payload, indent=2) + "\n")


def csv_value(value: Any) -> str:
    """One field as results.csv writes it: "" for None, lists joined by spaces, floats to 6 significant digits."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(f"{v:.6g}" for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def csv_row(record: BenchRecord) -> dict[str, str]:
    """The record as a results.csv row: "" for None, floats to 6 significant digits."""
    return {k: csv_value(v) for k, v in dataclasses.asdict(record).items()}


def append_csv(records: Sequence[BenchRecord], csv_path: Path) -> None:
    """Append rows to `csv_path` (written atomically, with the header). Rows written before a
    column was added get it empty."""
    rows = read_csv(csv_path) if csv_path.exists() and csv_path.stat().st_size > 0 else []
    rows += [csv_row(rec) for rec in records]
    write_csv(rows, csv_path)


def write_csv(rows: Sequence[dict[str, str]], csv_path: Path) -> None:
    with atomic_write(csv_path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(csv_path: Path) -> list[dict[str, str]]:
    """Rows of a results.csv, every column of this version present ("" where an older file had none)."""
    with Path(csv_path).open(newline="") as f:
        reader = csv.DictReader(f)
        unknown = [k for k in reader.fieldnames or [] if k not in CSV_FIELDS]
        if unknown or "mode" not in (reader.fieldnames or []):
            raise BenchError(
                f"{csv_path} is not a ran-bench results.csv (unknown columns {unknown}); move it aside "
                "and run the benchmark again, or give the results.csv that `ran-bench bench` wrote")
        return [{k: row.get(k) or "" for k in CSV_FIELDS} for row in reader]
