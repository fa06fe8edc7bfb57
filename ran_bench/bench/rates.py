"""What a training schedule costs at the rates `ran-bench bench train` recorded in results.csv:
hours on one device and wall time on N devices. `ran-bench report` (its "to reproduce" table) and
`ran-bench train` (a line of its start-up log) both take their figures from here.

The rules:
- results.csv: $RAN_BENCH_RESULTS_CSV when set, else this checkout's reports/bench/results.csv
  (where `ran-bench bench` records by default); a missing or unreadable file gives no figure.
- rows: the `bench train` rows of the model at the size it trains at, per device (as
  `device_description` names it, so on CPU with its core and thread counts) and precision;
- rates, per device (one process): the fastest model-only rate (synthetic batches already on the
  device: the cost with a loader that keeps up) and, where one was recorded, the fastest
  end-to-end rate (the loader and data that row names feeding the trainer), each its own figure;
  the start-up line of `ran-bench train` takes the model-only rate where there is one;
- hours on one device = images / rate / 3600; wall time on N devices = those hours / N, divided
  also by the efficiency a `bench scaling` row of the same model, size, device and precision
  measured at N processes where one exists; without one, linear scaling is an assumption;
- no row: no figure; nothing is estimated.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ran_bench.bench.record import read_csv
from ran_bench.fileio import REPO

RESULTS_CSV_ENV = "RAN_BENCH_RESULTS_CSV"


def results_csv() -> Path:
    """The results.csv the figures come from: $RAN_BENCH_RESULTS_CSV, else reports/bench/results.csv."""
    return Path(os.environ.get(RESULTS_CSV_ENV) or REPO / "reports" / "bench" / "results.csv")


def read_rows(csv_path: str | os.PathLike | None = None) -> tuple[list[dict[str, str]], str | None]:
    """The rows of `csv_path` (default `results_csv()`) and None, or no rows and why the file
    could not be read; never raises."""
    path = Path(csv_path) if csv_path is not None else results_csv()
    if not path.is_file():
        return [], f"{path} does not exist"
    try:
        return read_csv(path), None
    except (OSError, ValueError, csv.Error) as e:  # ValueError covers BenchError and undecodable bytes
        return [], f"{path} could not be read ({e})"


def commit_text(commit: str) -> str:
    """A short commit ("-dirty" kept), or "not recorded" for rows measured without git history."""
    if not commit:
        return "not recorded"
    dirty = commit.endswith("-dirty")
    return commit.removesuffix("-dirty")[:10] + ("-dirty" if dirty else "")


def _number(text: str) -> float | None:
    """A positive finite number from a CSV cell, or None (empty or malformed cells give no figure)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _same_size(row: dict[str, str], size: int) -> bool:
    try:
        return int(row["size"]) == size
    except ValueError:
        return False


@dataclass(frozen=True)
class TrainRate:
    """The training rate per device that one `bench train` row recorded, and which rate it is."""

    row: dict[str, str]
    images_per_s: float
    end_to_end: bool

    @property
    def device(self) -> str:
        return self.row["device_name"]

    @property
    def precision(self) -> str:
        return self.row["precision"]

    def hours(self, images: int) -> float:
        """Hours on one device to train on `images` images at this rate."""
        return images / self.images_per_s / 3600

    def kind(self) -> str:
        """Which rate: end-to-end with the loader it measured, or model-only (no loader)."""
        row = self.row
        if not self.end_to_end:
            return "model-only (synthetic batches: the loader not included)"
        alone = _number(row["images_per_s"])
        return (f"end-to-end ({row['end_to_end_backend'] or 'its'} loader on {row['data_root'] or 'unrecorded data'}; "
                f"the model alone: {'not recorded' if alone is None else rate_text(alone) + ' images/s'})")

    def source(self, with_device: bool = False) -> str:
        """The bench row the rate comes from: when, (device, precision,) batch, layout, commit."""
        row = self.row
        layout = [name for name in ("channels_last", "compile") if row[name] == "True"]
        parts = [f"`bench train` row of {row['time_utc'] or 'an unrecorded time'}"]
        parts += [row["device_name"], row["precision"]] if with_device else []
        parts += [f"batch {row['batch_size']} per device", *layout, f"commit {commit_text(row['git_commit'])}"]
        return ", ".join(parts)


def train_rates(rows: list[dict[str, str]], model: str, size: int) -> list[TrainRate]:
    """The rates of the `bench train` rows of `model` at `size`: per device and precision, the
    fastest model-only rate and the fastest end-to-end rate, each where one was recorded; GPUs
    first, model-only before end-to-end."""
    best: dict[tuple[str, str, bool], TrainRate] = {}
    for row in rows:
        if row["mode"] != "train" or row["model"] != model or not _same_size(row, size):
            continue
        for end_to_end, column in ((False, "images_per_s"), (True, "end_to_end_images_per_s")):
            value, key = _number(row[column]), (row["device_name"], row["precision"], end_to_end)
            if value is not None and (key not in best or value > best[key].images_per_s):
                best[key] = TrainRate(row, value, end_to_end)
    return sorted(best.values(), key=lambda r: (r.row["device_type"] != "cuda", r.device, r.precision, r.end_to_end))


def other_sizes(rows: list[dict[str, str]], model: str, size: int) -> list[str]:
    """The sizes of the `bench train` rows of `model` at a size other than `size`."""
    return sorted({r["size"] for r in rows if r["mode"] == "train" and r["model"] == model and not _same_size(r, size)})


def scaling_row(rows: list[dict[str, str]], rate: TrainRate, devices: int) -> dict[str, str] | None:
    """The newest `bench scaling` row of the rate's model, size, device and precision at `devices`
    processes with a recorded efficiency, or None."""
    keys = ("model", "size", "device_name", "precision")
    found = [r for r in rows if r["mode"] == "scaling" and r["world_size"] == str(devices)
             and all(r[k] == rate.row[k] for k in keys) and _number(r["scaling_efficiency"]) is not None]
    return max(found, key=lambda r: r["time_utc"]) if found else None


def wall_hours(rows: list[dict[str, str]], rate: TrainRate, images: int, devices: int) -> tuple[float, str]:
    """Hours on `devices` devices and how they scale from one: "one device", "linear scaling
    assumed" or the efficiency measured by a `bench scaling` row, named."""
    hours = rate.hours(images) / devices
    if devices == 1:
        return hours, "one device"
    row = scaling_row(rows, rate, devices)
    if row is None:
        return hours, "linear scaling assumed"
    efficiency = _number(row["scaling_efficiency"])
    return hours / efficiency, (f"{100 * efficiency:.0f}% scaling measured by the `bench scaling` row of "
                                f"{row['time_utc']}, commit {commit_text(row['git_commit'])}")


def hours_text(hours: float) -> str:
    """A wall time: minutes under an hour, days beyond two."""
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours:,.0f} h = {hours / 24:,.0f} days"


def rate_text(images_per_s: float) -> str:
    """Images/s: one decimal from 10 up, three significant digits below (slow CPU rows)."""
    return f"{images_per_s:,.1f}" if images_per_s >= 10 else f"{images_per_s:.3g}"


def device_hours_text(hours: float) -> str:
    """Device-hours: two significant digits under one, one decimal under 100, whole above."""
    if hours < 1:
        return f"{hours:.2g}"
    return f"{hours:,.1f}" if hours < 100 else f"{hours:,.0f}"


def schedule_cost_line(model: str, size: int, precision: str, device: str, images: int, world_size: int,
                       csv_path: str | os.PathLike | None = None) -> str | None:
    """What `images` training images of `model` at `size` cost on `device` (as
    `ran_bench.bench.record.device_description` names it) in `precision`, by the matching `bench
    train` row of `csv_path` (default `results_csv()`); None when none matches or the file cannot
    be read."""
    rows, _ = read_rows(csv_path)
    # train_rates puts the model-only rate first: that one where both were recorded.
    rate = next((r for r in train_rates(rows, model, size) if r.device == device and r.precision == precision), None)
    if rate is None:
        return None
    gpu = rate.row["device_type"] == "cuda"
    wall, how = wall_hours(rows, rate, images, world_size)
    return (f"this run's schedule ({images:,} images) is about {device_hours_text(rate.hours(images))} "
            f"{'GPU' if gpu else 'device'}-hours, {hours_text(wall)} on this {world_size}-"
            f"{'GPU' if gpu else 'process'} job ({how}), at {rate_text(rate.images_per_s)} images/s per device, "
            f"{rate.kind()}, by the {rate.source(with_device=True)}")
