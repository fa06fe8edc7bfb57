"""Throughput, MFU, scaling and overhead benchmarks (`ran-bench bench`).

Modes:
- `train`: the trainer's own step (`ran_bench.train.train_step` on an Accelerate-prepared model and
  optimizer, with the trainer's loss and optimizer) on synthetic batches already on the device: the
  model-only rate. With `--data-root`, also the end-to-end rate with the real loader, and which of
  the two limits. With `--overhead`, also a bare PyTorch loop and timm's benchmark recipe on the
  same pre-made batches, as step-time ratios. What is compared is `train_step` alone (autocast,
  loss, backward, optimizer step, zero_grad through Accelerate), not the training loop around it
  (gradient accumulation context, learning-rate scheduler, metrics, the stop vote).
- `infer`: forward passes of the model in eval mode under `torch.inference_mode`.
- `data`: the input pipeline alone: `--repeats` timed regions of `--steps` batches of the loader
  after `--warmup` batches, on `--data-root` or on generated ImageNet-sized JPEGs.
- `scaling`: `train` under torchrun with 1, 2, ... processes: images/s per process and efficiency.
- `readme`: regenerate `reports/bench/README.md` from `results.csv` (optionally adding the rows of
  other CSV files first, e.g. the ones `scripts/gpu_bench.sh` wrote on a GPU machine).

Timing: `--warmup` untimed steps, then `--repeats` timed regions of `--steps` steps each. Every
timed region starts and ends with `synchronize(device)`, so work queued on a GPU is counted in the
region it belongs to. Figures are the median over the repeats, with min and max.

Conventions, written into every record: FLOPs = 2 x multiply-adds, counted by
`ran_bench.profile.count_macs` (convolutions and matrix products, the paper's convention); a
training step costs 3 x the forward FLOPs (the backward pass ~ 2 x the forward); inference costs
1 x. Achieved TFLOP/s and MFU are per process (per device); MFU is against the bf16/fp16 dense
peak of the device, given with `--peak-tflops` or looked up by GPU name for bf16/fp16 runs.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from ran_bench.errors import UserError
from ran_bench.fileio import atomic_write, git_commit
from ran_bench.fileio import device_name as _device_name

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO / "reports" / "bench"
MODES = ("train", "infer", "data", "scaling", "readme")


class BenchError(ValueError, UserError):
    """A benchmark that cannot run as asked (the message names the flag to change)."""
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEMA_VERSION = 1

FLOP_CONVENTION = (
    "FLOPs = 2 x multiply-adds of ran_bench.profile.count_macs (convolutions and matrix products); "
    "train step = 3 x forward FLOPs, inference = 1 x; TFLOP/s and MFU per process (one device)"
)

# Dense (no sparsity) bf16 = fp16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets (half the
# "with sparsity" figure where only that is printed). Keyed by the tokens of
# torch.cuda.get_device_name() that name the product, after dropping the ones that do not change
# the peak (see _gpu_key): a name with any other token is an unknown variant and gets no peak,
# rather than the peak of a product whose name it happens to contain ("L40" is not an "L4").
GPU_PEAK_BF16_TFLOPS: dict[tuple[str, ...], float] = {
    ("H100",): 989.4,  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H100", "PCIE"): 756.5,
    ("H100", "NVL"): 835.5,
    ("H200",): 989.4,  # SXM
    ("H200", "NVL"): 835.5,
    ("GH200",): 989.4,  # Grace Hopper superchip: its H100/H200 GPU's SXM peak
    ("A100",): 312.0,  # SXM4 and PCIe alike
    ("A100", "PCIE"): 312.0,
    ("L40S",): 362.05,
    ("L40",): 181.05,
    ("L4",): 121.0,
    ("A10",): 125.0,
}
# Tokens of a device name that do not change the peak: the vendor, memory size and type, SXM form.
_PEAK_NEUTRAL_TOKENS = re.compile(r"NVIDIA|TESLA|\d+GB|HBM\d?E?|SXM\d?")

# The share of the model-only rate below which the end-to-end run counts as limited by the loader;
# repeats of the same run spread by a few percent, so equal rates must not read as a bottleneck.
LOADER_LIMIT_FRACTION = 0.9

_clock = time.perf_counter  # module attribute so tests can observe the timer reads


# ---------------------------------------------------------------------------------------------
# Timing, memory, FLOPs


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on `device` has finished (CUDA kernels run asynchronously);
    a no-op on the CPU, where every operation has finished when it returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], *, device: torch.device, steps: int, warmup: int,
               repeats: int) -> list[float]:
    """Mean seconds per call of `step` in each of `repeats` timed regions of `steps` calls, after
    `warmup` untimed calls. Each region is bracketed by device synchronisation."""
    if steps < 1 or repeats < 1 or warmup < 0:
        raise BenchError(f"need --steps >= 1, --repeats >= 1 and --warmup >= 0; got steps={steps}, "
                         f"repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = _clock()
        for _ in range(steps):
            step()
        synchronize(device)
        times.append((_clock() - start) / steps)
    return times


@dataclass
class Timing:
    """Seconds per step of each repeat, for `batch_size` images per step (one process)."""

    step_time_s: list[float]
    batch_size: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_time_s)

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.median_s

    @property
    def images_per_s_min(self) -> float:
        return self.batch_size / max(self.step_time_s)

    @property
    def images_per_s_max(self) -> float:
        return self.batch_size / min(self.step_time_s)


def loader_verdict(model_only: float, end_to_end: float) -> tuple[float, str]:
    """End-to-end rate as a share of the model-only rate, and which one limits: the data loader
    when the share is below LOADER_LIMIT_FRACTION, the model otherwise."""
    fraction = end_to_end / model_only
    return fraction, ("data loader" if fraction < LOADER_LIMIT_FRACTION else "model")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory in MiB and what was measured: the CUDA caching allocator's peak of allocated
    tensor memory since the last reset, or on CPU the process's peak resident set size since it
    started (the OS cannot reset it; it includes Python, libraries and earlier work)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024, "cpu_process_peak_rss"


def flops_per_image(macs: int, mode: str) -> int:
    """FLOPs one image costs in `mode`: 2 per multiply-add, times 3 for a training step."""
    return 2 * macs * (3 if mode == "train" else 1)


def achieved_tflops(macs: int, mode: str, images_per_s: float) -> float:
    return flops_per_image(macs, mode) * images_per_s / 1e12


def model_flops_utilization(tflops: float, peak_tflops: float | None) -> float | None:
    """Achieved over peak TFLOP/s (a fraction), or None when no peak is known."""
    return None if not peak_tflops else tflops / peak_tflops


def resolve_peak(device: torch.device, precision: str, given: float | None) -> tuple[float | None, str]:
    """The peak TFLOP/s MFU is measured against, and where it comes from."""
    if given is not None:
        if given <= 0:
            raise BenchError(f"--peak-tflops must be positive, got {given}")
        return given, "given with --peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for CPUs: give --peak-tflops"
    name = torch.cuda.get_device_name(device)
    if precision == "fp32":
        return None, f"fp32 run: the table holds bf16/fp16 peaks only; give --peak-tflops for {name}"
    key = _gpu_key(name)
    if key in GPU_PEAK_BF16_TFLOPS:
        return GPU_PEAK_BF16_TFLOPS[key], f"bf16/fp16 dense peak of {' '.join(key)} (data sheet)"
    return None, (f"{name} is not in the peak table (known: "
                  f"{', '.join(' '.join(k) for k in GPU_PEAK_BF16_TFLOPS)}): give --peak-tflops")


def _gpu_key(name: str) -> tuple[str, ...]:
    """The product tokens of a GPU name: "NVIDIA A100-SXM4-80GB" -> ("A100",), "NVIDIA H100 PCIe"
    -> ("H100", "PCIE"). Whole tokens, so "A10G" and "GH200" never match "A10" or "H200"."""
    tokens = re.split(r"[^0-9A-Z]+", name.upper())
    return tuple(t for t in tokens if t and not _PEAK_NEUTRAL_TOKENS.fullmatch(t))


# ---------------------------------------------------------------------------------------------
# Environment of a record


def device_name(device: torch.device) -> str:
    """The device, and on CPU how many cores and torch threads the figures were measured with."""
    if device.type == "cuda":
        return _device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{_device_name(device)} ({cores} cores, {torch.get_num_threads()} torch threads/process)"


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


# ---------------------------------------------------------------------------------------------
# The record


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


CSV_FIELDS = [f.name for f in dataclasses.fields(BenchRecord)]


def _fill_environment(record: BenchRecord, device: torch.device, command: str) -> BenchRecord:
    record.device_type = device.type
    record.device_name = device_name(device)
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


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(f"{v:.6g}" for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def append_csv(records: Sequence[BenchRecord], csv_path: Path) -> None:
    """Append rows to `csv_path` (written atomically, with the header). Rows written before a
    column was added get it empty."""
    rows = read_csv(csv_path) if csv_path.exists() and csv_path.stat().st_size > 0 else []
    rows += [{k: _csv_value(v) for k, v in dataclasses.asdict(rec).items()} for rec in records]
    write_csv(rows, csv_path)


def write_csv(rows: Sequence[dict[str, str]], csv_path: Path) -> None:
    csv_path.parent.mkdir(parents=True, exist_ok=True)
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


def save(records: Sequence[BenchRecord], out_dir: Path, *, json_path: Path | None = None,
         record_csv: bool = True) -> Path:
    """Write the JSON (one record, or a list for scaling), append the CSV rows and regenerate the
    README. Returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = Path(json_path) if json_path else out_dir / f"{record_name(records[0])}.json"
    payload: Any = dataclasses.asdict(records[0]) if len(records) == 1 else [dataclasses.asdict(r) for r in records]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(json_path) as f:
        f.write(json.dumps(payload, indent=2) + "\n")
    if record_csv:
        append_csv(records, out_dir / "results.csv")
        write_readme(out_dir / "results.csv", out_dir / "README.md")
    return json_path


# ---------------------------------------------------------------------------------------------
# README generated from results.csv


def _f(value: str, fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    if value in ("", None):
        return "–"
    return fmt.format(float(value) * scale)


def _versions(row: dict[str, str]) -> str:
    parts = [f"torch {row['torch_version']}"]
    if row["cuda_version"]:
        parts.append(f"CUDA {row['cuda_version']}")
    if row["dali_version"]:
        parts.append(f"DALI {row['dali_version']}")
    return ", ".join(parts)


def _device(row: dict[str, str]) -> str:
    load = row["load_average_1min"]
    return row["device_name"] + (f", load {float(load):.1f}" if row["device_type"] == "cpu" and load else "")


def _rate(row: dict[str, str]) -> str:
    return f"{_f(row['images_per_s'])} ({_f(row['images_per_s_min'])}–{_f(row['images_per_s_max'])})"


def _commit(row: dict[str, str]) -> str:
    """Short commit of the code that measured a row ("-dirty" kept); rows measured where the
    commit was unknown (a copy without .git, before RAN_BENCH_GIT_COMMIT) say so."""
    commit = row["git_commit"]
    if commit in ("", "unknown"):
        return "not recorded"
    dirty = commit.endswith("-dirty")
    return commit.removesuffix("-dirty")[:10] + ("-dirty" if dirty else "")


def _images(root: str) -> str:
    """The images a loader row read: `ROOT (N JPEGs, K kB mean)`; older rows recorded only a path."""
    return root if " JPEGs, " in root else f"{root} (images not recorded)"


def _timed(row: dict[str, str]) -> str:
    """What a data row timed. Rows whose command has no --steps come from the earlier harness,
    which timed whole epochs (steps = batches per epoch, after one untimed epoch)."""
    if "--steps" not in row["command"]:
        return f"{row['repeats']} epochs of {row['steps']} batches, after 1 epoch"
    return f"{row['repeats']} x {row['steps']} batches, after {row['warmup']}"


def _timm_cell(row: dict[str, str]) -> str:
    if row["trainer_over_timm"]:
        return f"{_f(row['trainer_over_timm'], '{:.3f}')} ({row['timm_model'].rsplit('.', 1)[-1]})"
    return row["timm_model"] or "–"


def _memory(row: dict[str, str]) -> str:
    kind = "GPU alloc" if row["peak_memory_kind"].startswith("cuda") else "RSS"
    return f"{_f(row['peak_memory_mib'], '{:.0f}')} MiB {kind}"


def _model_columns(row: dict[str, str]) -> list[str]:
    flags = [x for x, on in (("channels_last", row["channels_last"]), ("compile", row["compile"]))
             if on == "True"]
    return [row["model"], row["size"], row["batch_size"], row["precision"], ", ".join(flags) or "–"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def render_readme(rows: list[dict[str, str]]) -> str:
    """Markdown tables of the recorded results, one section per mode, every row with its device,
    software versions and exact command."""
    lines = [
        "# Benchmark results",
        "",
        "Generated by `ran-bench bench readme` from [results.csv](results.csv); every `ran-bench bench`",
        "run appends its row and regenerates this file. Do not edit by hand.",
        "",
        f"- Conventions: {FLOP_CONVENTION}. MFU against the bf16/fp16 dense peak of the device "
        "(given with `--peak-tflops`, or from a table of GPU data-sheet peaks; none for CPUs).",
        "- images/s: median over repeats of one process (min–max over repeats in brackets); "
        "timed regions are bracketed by device synchronisation.",
        "- Peak memory: `GPU alloc` = torch.cuda.max_memory_allocated; `RSS` = the process's peak "
        "resident set size on CPU (includes Python and libraries).",
        "- device: the GPU, or the CPU with its cores, torch threads per process and 1-minute load "
        "average at the end of the run (other work on the machine slows a CPU row).",
        "- commit: the ran-bench commit that measured the row (`-dirty`: with uncommitted changes); "
        "\"not recorded\" where the code ran from a copy without git history.",
        "",
    ]
    sections = {
        "train": "Training step (`bench train`)",
        "infer": "Inference (`bench infer`)",
        "data": "Input pipeline alone (`bench data`)",
        "scaling": "Scaling with processes (`bench scaling`)",
    }
    for mode, title in sections.items():
        mode_rows = [r for r in rows if r["mode"] == mode]
        if not mode_rows:
            continue
        lines += [f"## {title}", ""]
        env = lambda r: [_device(r), _versions(r), _commit(r), f"`{r['command']}`"]  # noqa: E731
        if mode in ("train", "infer"):
            header = ["model", "size", "batch", "precision", "layout/compile", "images/s", "step ms",
                      "peak memory", "GMACs/img", "TFLOP/s", "MFU"]
            if mode == "train":
                header += ["end-to-end images/s (loader on images; limiter)", "train_step/bare", "train_step/timm"]
            table = []
            for r in mode_rows:
                cells = _model_columns(r) + [
                    _rate(r), _f(r["step_time_median_s"], "{:.1f}", 1e3), _memory(r),
                    _f(r["macs"], "{:.2f}", 1e-9), _f(r["tflops"], "{:.3g}"), _f(r["mfu"], "{:.1%}")]
                if mode == "train":
                    e2e = "–" if not r["end_to_end_images_per_s"] else (
                        f"{_f(r['end_to_end_images_per_s'])} ({r['end_to_end_backend']} on "
                        f"{_images(r['data_root'])}; {r['limiter']})")
                    overhead = [_f(r["trainer_over_bare"], "{:.3f}"), _timm_cell(r)] if r["trainer_over_bare"] else ["–", "–"]
                    cells += [e2e, *overhead]
                table.append(cells + env(r))
            lines += _table(header + ["device", "versions", "commit", "command"], table)
            if mode == "train":
                lines += ["", "train_step/bare and train_step/timm (`--overhead`): step-time ratios of the "
                          "trainer's `train_step` alone (autocast, loss, backward, optimizer step and "
                          "zero_grad through Accelerate; not the training loop around it: gradient "
                          "accumulation context, scheduler, metrics, stop vote) over a bare PyTorch "
                          "forward/backward/step loop on a copy of the same initial model, and over timm's "
                          "benchmark recipe on the model `timm.create_model` builds (its class in brackets; "
                          "run only when that is the benchmarked model: same class and parameter count). "
                          "All three cycle through the same pre-made batches; 1.0 = no overhead."]
        elif mode == "data":
            header = ["backend", "images", "size", "batch", "threads", "timed", "images/s", "peak memory"]
            table = [[r["backend"], _images(r["data_root"]), r["size"], r["batch_size"], r["num_threads"], _timed(r),
                      _rate(r), _memory(r)] + env(r) for r in mode_rows]
            lines += _table(header + ["device", "versions", "commit", "command"], table)
            lines += ["", "timed: the loader's batches in each timed repeat (images/s = images of those "
                      "batches over their seconds, median over repeats), after untimed warm-up batches; "
                      "a repeat that crosses the end of an epoch includes the next epoch's start-up."]
        else:
            header = ["model", "size", "batch/process", "precision", "processes", "images/s total",
                      "images/s per process", "efficiency"]
            table = [[r["model"], r["size"], r["batch_size"], r["precision"], r["world_size"],
                      _f(r["images_per_s_total"]), _rate(r), _f(r["scaling_efficiency"], "{:.0%}")]
                     + env(r) for r in mode_rows]
            lines += _table(header + ["device", "versions", "commit", "command"], table)
        lines.append("")
    if not rows:
        lines += ["No results recorded yet.", ""]
    return "\n".join(lines)


def _row_key(row: dict[str, str]) -> tuple[str, str, str]:
    """What identifies one measurement: adding the same CSV twice must not double its rows."""
    return row["time_utc"], row["command"], row["device_name"]


def write_readme(csv_path: Path, readme_path: Path) -> None:
    rows = read_csv(csv_path) if csv_path.exists() else []
    with atomic_write(readme_path) as f:
        f.write(render_readme(rows))


# ---------------------------------------------------------------------------------------------
# Models and step functions


def _autocast(device: torch.device, precision: str):
    """The autocast context of `precision` (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def build_model(name: str, size: int, device: torch.device, *, channels_last: bool) -> tuple[nn.Module, int, int]:
    """The registered model on `device` (channels_last if asked), its parameters and its
    multiply-adds at `size` (counted before any compilation)."""
    from ran_bench.models import create_model
    from ran_bench.profile import count_macs, count_params

    model = create_model(name).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, count_params(model), count_macs(model, size)


def make_batches(n: int, *, batch_size: int, size: int, num_classes: int, device: torch.device,
                 channels_last: bool, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` different random (images, labels) batches made once on `device`: the same inputs for
    every loop the overhead check compares."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        images = torch.randn(batch_size, 3, size, size, generator=g).to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(num_classes, (batch_size,), generator=g).to(device)
        batches.append((images, labels))
    return batches


def _cycle(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from batches


def describe_images(root: str | os.PathLike, name: str | None = None) -> str:
    """`ROOT (N JPEGs, K kB mean)` for the training images a row read (`name` instead of a
    temporary ROOT): a path alone says nothing once the machine that ran the benchmark is gone."""
    from ran_bench.data import list_samples

    files, _, _ = list_samples(str(root), "train")
    kb = statistics.mean(Path(f).stat().st_size for f in files) / 1024
    return f"{name or root} ({len(files)} JPEGs, {kb:.0f} kB mean)"


def _endless(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of `loader` across epochs (set_epoch before each pass, as the trainer does)."""
    if len(loader) == 0:
        raise BenchError(f"the loader has no full batch per process ({loader.num_samples} samples, batch "
                         f"{loader.batch_size}); lower --batch-size or use a larger --data-root")
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def trainer_parts(model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The trainer's loss and optimizer for `model`, built by the trainer's own builders from the
    default recipe (`ran_bench.config.OptimConfig`: Nesterov SGD, momentum 0.9, weight
    decay 1e-4, learning rate 0.1 per 256 images; cross-entropy)."""
    from ran_bench.config import Config

    from ran_bench.train import build_criterion, build_optimizer

    cfg = Config()
    return build_criterion(cfg), build_optimizer(cfg, model)


def trainer_step_fn(accelerator, model: nn.Module, optimizer, criterion, batches: Iterator) -> Callable[[], torch.Tensor]:
    """One call = one real training step of the trainer (`ran_bench.train.train_step`) on the next batch."""
    from ran_bench.train import train_step

    def step() -> torch.Tensor:
        images, labels = next(batches)
        return train_step(accelerator, model, optimizer, criterion, images, labels)

    return step


def bare_step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                 batches: Iterator, *, device: torch.device, precision: str) -> Callable[[], torch.Tensor]:
    """One call = forward (under the same autocast), loss, backward, optimizer step, zero_grad in
    plain PyTorch: the floor the trainer's step is compared with."""
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step() -> torch.Tensor:
        images, labels = next(batches)
        with _autocast(device, precision):
            loss = criterion(model(images), labels)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _class_path(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__name__}"


def timm_counterpart(name: str, ours: nn.Module, *, num_classes: int) -> tuple[nn.Module | None, str]:
    """`timm.create_model(name)` when it is the benchmarked network (same class, same parameter
    count), with its class path; otherwise None and why. Our models reach timm through the registry
    mirror, but for names timm owns (resnet152, resnet200, ...) timm builds its own model, and a
    step-time ratio between two different networks says nothing about the trainer's overhead."""
    import timm

    from ran_bench.profile import count_params

    if not timm.is_model(name):
        return None, "not run: not in timm's registry"
    model = timm.create_model(name, num_classes=num_classes)
    if type(model) is not type(ours) or count_params(model) != count_params(ours):
        return None, (f"not run: timm builds {_class_path(model)} ({count_params(model):,} parameters) "
                      f"for {name!r}, not the benchmarked {_class_path(ours)} ({count_params(ours):,} parameters)")
    return model, _class_path(model)


def timm_step_fn(model: nn.Module, batches: Iterator, *, device: torch.device, precision: str,
                 channels_last: bool, compile: bool) -> Callable[[], torch.Tensor]:
    """The training step of timm's `benchmark.py` (TrainBenchmarkRunner), which ships in timm's
    repository but not in its wheel, on `model` (from `timm_counterpart`):
    `timm.optim.create_optimizer_v2` with opt="sgd", lr=1e-4, cross-entropy, then zero_grad,
    forward and loss under autocast, backward, optimizer step. Inputs are our pre-made batches
    instead of one `torch.randn` batch."""
    import timm.optim

    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = timm.optim.create_optimizer_v2(model, opt="sgd", lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if compile:
        model = torch.compile(model)

    def step() -> torch.Tensor:
        images, labels = next(batches)
        optimizer.zero_grad()
        with _autocast(device, precision):
            loss = loss_fn(model(images), labels)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()

    return step


@dataclass
class OverheadArms:
    """The trainer's step and a bare PyTorch loop on two copies of one model (same weights, same
    optimizer settings, same loss) that cycle through the same pre-made batches."""

    trainer_model: nn.Module
    bare_model: nn.Module
    trainer_step: Callable[[], torch.Tensor]
    bare_step: Callable[[], torch.Tensor]


def overhead_arms(accelerator, model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                  precision: str, compile: bool) -> OverheadArms:
    """Set up the overhead comparison from `model` as it is now (it is copied, not trained)."""
    trainer_model, bare_model = copy.deepcopy(model), copy.deepcopy(model)
    criterion_t, optimizer_t = trainer_parts(trainer_model)
    criterion_b, optimizer_b = trainer_parts(bare_model)
    run_t = torch.compile(trainer_model) if compile else trainer_model
    run_b = torch.compile(bare_model) if compile else bare_model
    run_t, optimizer_t = accelerator.prepare(run_t, optimizer_t)
    return OverheadArms(
        trainer_model=trainer_model,
        bare_model=bare_model,
        trainer_step=trainer_step_fn(accelerator, run_t, optimizer_t, criterion_t, _cycle(batches)),
        bare_step=bare_step_fn(run_b, optimizer_b, criterion_b, _cycle(batches), device=accelerator.device,
                               precision=precision),
    )


# ---------------------------------------------------------------------------------------------
# Modes


def _accelerate_precision(precision: str, device_type: str) -> str:
    if precision == "fp16" and device_type != "cuda":
        raise BenchError("--precision fp16 needs a CUDA device (autocast with a gradient scaler); "
                         "use fp32 or bf16 on CPU")
    return "no" if precision == "fp32" else precision


def _precision(args: argparse.Namespace) -> str:
    return args.precision or ("bf16" if torch.cuda.is_available() else "fp32")


def _size(args: argparse.Namespace) -> int:
    if args.size is not None:
        return args.size
    if args.model:
        from ran_bench.models import model_info

        return model_info(args.model).input_size
    return 224


def _base_record(args: argparse.Namespace, *, mode: str, size: int, precision: str, world_size: int,
                 timing: Timing, backend: str, device: torch.device) -> BenchRecord:
    mem, kind = peak_memory(device)
    return BenchRecord(
        mode=mode, model=args.model or "", size=size, batch_size=args.batch_size, world_size=world_size,
        precision=precision, channels_last=args.channels_last, compile=args.compile, backend=backend,
        steps=args.steps, warmup=args.warmup, repeats=args.repeats, step_time_s=timing.step_time_s,
        step_time_median_s=timing.median_s, images_per_s=timing.images_per_s,
        images_per_s_min=timing.images_per_s_min, images_per_s_max=timing.images_per_s_max,
        images_per_s_total=timing.images_per_s * world_size, peak_memory_mib=mem, peak_memory_kind=kind,
        params=None, macs=None, flops_per_image=None, tflops=None, peak_tflops=None, peak_source="",
        mfu=None, flop_convention=FLOP_CONVENTION)


def _add_flops(record: BenchRecord, *, params: int, macs: int, device: torch.device, given_peak: float | None) -> None:
    record.params, record.macs = params, macs
    record.flops_per_image = flops_per_image(macs, record.mode)
    record.tflops = achieved_tflops(macs, record.mode, record.images_per_s)
    record.peak_tflops, record.peak_source = resolve_peak(device, record.precision, given_peak)
    record.mfu = model_flops_utilization(record.tflops, record.peak_tflops)


def run_train(args: argparse.Namespace) -> BenchRecord:
    """The trainer's step: model-only rate, optionally end-to-end rate and overhead ratios."""
    from accelerate import Accelerator

    from ran_bench.data import build_loader
    from ran_bench.models import model_info

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = _precision(args)
    accelerator = Accelerator(mixed_precision=_accelerate_precision(precision, device_type), cpu=device_type == "cpu")
    world = accelerator.num_processes
    if args.expect_world_size and world != args.expect_world_size:
        raise BenchError(
            f"expected {args.expect_world_size} processes but Accelerate sees {world}: the launcher "
            "started independent processes (`accelerate launch --multi_gpu` does that on a machine "
            "without GPUs); launch with torchrun --nproc_per_node N")
    if args.overhead and world > 1:
        raise BenchError("--overhead compares single-process loops; run it without a launcher")
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size = _size(args)
    model, params, macs = build_model(args.model, size, device, channels_last=args.channels_last)
    num_classes = model_info(args.model).default_num_classes
    initial = copy.deepcopy(model) if args.overhead else None
    criterion, optimizer = trainer_parts(model)
    run_model = torch.compile(model) if args.compile else model
    run_model, optimizer = accelerator.prepare(run_model, optimizer)

    def loader(root, backend):
        return build_loader(root, "train", size=size, batch_size=args.batch_size, backend=backend,
                            rank=accelerator.process_index, world_size=world, num_threads=args.num_threads,
                            channels_last=args.channels_last, device=device, num_classes=num_classes)

    reset_peak_memory(device)
    timing = Timing(time_steps(trainer_step_fn(accelerator, run_model, optimizer, criterion,
                                               _endless(loader(None, "synthetic"))),
                               device=device, steps=args.steps, warmup=args.warmup, repeats=args.repeats),
                    args.batch_size)
    record = _base_record(args, mode="train", size=size, precision=precision, world_size=world,
                          timing=timing, backend="synthetic", device=device)
    _add_flops(record, params=params, macs=macs, device=device, given_peak=args.peak_tflops)

    if args.data_root:
        from ran_bench.data import find_classes

        classes = len(find_classes(args.data_root, "train"))
        if classes > num_classes:
            raise BenchError(f"--data-root {args.data_root} has {classes} classes but {args.model} has "
                             f"{num_classes} outputs; use a data root with at most {num_classes} classes")
        real = loader(args.data_root, args.backend)
        e2e = Timing(time_steps(trainer_step_fn(accelerator, run_model, optimizer, criterion, _endless(real)),
                                device=device, steps=args.steps, warmup=args.warmup, repeats=args.repeats),
                     args.batch_size)
        record.data_root = describe_images(args.data_root)
        record.end_to_end_backend = real.backend
        record.end_to_end_images_per_s = e2e.images_per_s
        record.end_to_end_fraction, record.limiter = loader_verdict(timing.images_per_s, e2e.images_per_s)

    if initial is not None:
        batches = make_batches(4, batch_size=args.batch_size, size=size, num_classes=num_classes, device=device,
                               channels_last=args.channels_last)
        arms = overhead_arms(accelerator, initial, batches, precision=precision, compile=args.compile)
        timed = dict(device=device, steps=args.steps, warmup=args.warmup, repeats=args.repeats)
        trainer = Timing(time_steps(arms.trainer_step, **timed), args.batch_size)
        bare = Timing(time_steps(arms.bare_step, **timed), args.batch_size)
        del arms
        record.overhead_trainer_images_per_s = trainer.images_per_s
        record.bare_images_per_s = bare.images_per_s
        record.trainer_over_bare = trainer.median_s / bare.median_s
        timm_model, record.timm_model = timm_counterpart(args.model, initial, num_classes=num_classes)
        if timm_model is not None:
            timm_step = timm_step_fn(timm_model, _cycle(batches), device=device, precision=precision,
                                     channels_last=args.channels_last, compile=args.compile)
            timm_timing = Timing(time_steps(timm_step, **timed), args.batch_size)
            record.timm_images_per_s = timm_timing.images_per_s
            record.trainer_over_timm = trainer.median_s / timm_timing.median_s
    return _fill_environment(record, device, command_line(args, world))


def run_infer(args: argparse.Namespace) -> BenchRecord:
    """Forward passes in eval mode under inference_mode and the precision's autocast."""
    from ran_bench.data import build_loader
    from ran_bench.models import model_info

    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
              else torch.device("cpu"))
    precision = _precision(args)
    _accelerate_precision(precision, device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    size = _size(args)
    model, params, macs = build_model(args.model, size, device, channels_last=args.channels_last)
    model.eval()
    run_model = torch.compile(model) if args.compile else model
    batches = _endless(build_loader(None, "train", size=size, batch_size=args.batch_size, backend="synthetic",
                                    channels_last=args.channels_last, device=device,
                                    num_classes=model_info(args.model).default_num_classes))

    def step() -> torch.Tensor:
        images, _ = next(batches)
        with torch.inference_mode(), _autocast(device, precision):
            return run_model(images)

    reset_peak_memory(device)
    timing = Timing(time_steps(step, device=device, steps=args.steps, warmup=args.warmup, repeats=args.repeats),
                    args.batch_size)
    record = _base_record(args, mode="infer", size=size, precision=precision, world_size=1, timing=timing,
                          backend="synthetic", device=device)
    _add_flops(record, params=params, macs=macs, device=device, given_peak=args.peak_tflops)
    return _fill_environment(record, device, command_line(args, 1))


def run_data(args: argparse.Namespace) -> BenchRecord:
    """The input pipeline alone: the training loader of --backend (DALI falls back to torchvision
    when it is not installed, as in training) on --data-root, or on generated ImageNet-sized JPEGs
    (400 images, 333-500 px sides); --warmup untimed batches, then --repeats timed regions of
    --steps batches. A fixed number of batches, not whole epochs: on ImageNet an epoch is hours."""
    from ran_bench.data import build_loader, default_num_threads

    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
              else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = default_num_threads() if args.num_threads is None else args.num_threads
    with tempfile.TemporaryDirectory(prefix="ran_bench_data_") as tmp:
        root, name = args.data_root, None
        if root is None:
            from ran_bench.data.demo import make_demo

            root, name = Path(tmp) / "data", "generated"
            make_demo(root, seed=0, train_per_class=40, val_per_class=20, min_side=333, max_side=500, quality=90)
        loader = build_loader(str(root), "train", size=args.size, batch_size=args.batch_size, backend=args.backend,
                              num_threads=threads, device=device)
        batches = _endless(loader)
        reset_peak_memory(device)
        timing = Timing(time_steps(lambda: next(batches), device=device, steps=args.steps, warmup=args.warmup,
                                   repeats=args.repeats), args.batch_size)
        images = describe_images(root, name=name)
    record = _base_record(args, mode="data", size=args.size, precision="fp32", world_size=1, timing=timing,
                          backend=loader.backend, device=device)
    record.data_root = images
    record.num_threads = threads
    record.channels_last = False  # the loaders' NCHW output is what was measured
    record.peak_source = "no FLOPs: input pipeline only"
    return _fill_environment(record, device, command_line(args, 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _procs(args: argparse.Namespace) -> list[int]:
    if args.procs:
        try:
            procs = [int(p) for p in args.procs.split(",")]
        except ValueError:
            raise BenchError(f"--procs must be comma-separated process counts like 1,2,4; got {args.procs!r}") from None
    elif torch.cuda.is_available():
        procs = [n for n in (1, 2, 4, 8) if n <= torch.cuda.device_count()]
    else:
        procs = [1, 2]
    if not procs or min(procs) < 1:
        raise BenchError(f"--procs must be positive process counts; got {args.procs!r}")
    if torch.cuda.is_available() and max(procs) > torch.cuda.device_count():
        raise BenchError(f"--procs {max(procs)} is more than the {torch.cuda.device_count()} GPUs here "
                         "(one process per GPU)")
    return procs


def run_scaling(args: argparse.Namespace) -> list[BenchRecord]:
    """`bench train` under torchrun with each process count of --procs; per-process rate and
    scaling efficiency = per-process rate / per-process rate of the smallest count."""
    procs = _procs(args)
    records = []
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")  # one core per process, like one device per process
    with tempfile.TemporaryDirectory(prefix="ran_bench_scaling_") as tmp:
        for n in procs:
            out = Path(tmp) / f"np{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                   "--master_port", str(_free_port()), "-m", "ran_bench", "bench", "train",
                   *_figure_args(args), "--expect-world-size", str(n), "--json", str(out), "--no-record"]
            print(f"[scaling] {n} process(es): {shlex.join(cmd)}", flush=True)
            proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
            if proc.returncode != 0 or not out.exists():
                raise BenchError(f"the {n}-process run exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}")
            rec = BenchRecord(**json.loads(out.read_text()))
            if rec.world_size != n:
                raise BenchError(f"asked torchrun for {n} processes but the benchmark ran with {rec.world_size}")
            records.append(rec)
    base = records[0].images_per_s
    command = command_line(args, 1)
    for rec in records:
        rec.mode = "scaling"
        rec.scaling_efficiency = rec.images_per_s / base
        rec.command = command
    return records


# ---------------------------------------------------------------------------------------------
# Command line


def _figure_args(args: argparse.Namespace) -> list[str]:
    """The options that decide the figures, spelt out in full (resolved defaults included)."""
    if args.mode == "data":
        out = ["--backend", args.backend, "--batch-size", str(args.batch_size), "--size", str(args.size)]
        if args.data_root:
            out += ["--data-root", str(args.data_root)]
        if args.num_threads is not None:
            out += ["--num-threads", str(args.num_threads)]
        return out + ["--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    out = []
    if args.model:
        out += ["--model", args.model]
    out += ["--batch-size", str(args.batch_size), "--size", str(args.size), "--precision", args.precision]
    if args.channels_last:
        out.append("--channels-last")
    if args.compile:
        out.append("--compile")
    if args.data_root:
        out += ["--backend", args.backend, "--data-root", str(args.data_root)]
    if args.num_threads is not None:
        out += ["--num-threads", str(args.num_threads)]
    out += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.peak_tflops is not None:
        out += ["--peak-tflops", f"{args.peak_tflops:g}"]
    if args.overhead:
        out.append("--overhead")
    if args.mode == "scaling":
        out += ["--procs", ",".join(map(str, _procs(args)))]
    return out


def command_line(args: argparse.Namespace, world_size: int) -> str:
    """The command that repeats this measurement (launcher and thread count included)."""
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    if world_size > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        nodes = f" --nnodes {world_size // local}" if world_size > local else ""
        launcher = f"torchrun --nproc_per_node {local}{nodes} -m ran_bench"
    else:
        launcher = "ran-bench"
    return f"{env}{launcher} bench {args.mode} {shlex.join(_figure_args(args))}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", choices=MODES,
                        help="train: the trainer's step; infer: forward only; data: the input pipeline alone; "
                             "scaling: train with 1, 2, ... processes; readme: regenerate README.md from results.csv")
    parser.add_argument("--model", help="registered model name (see `ran-bench profile`)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step and process (default 32)")
    parser.add_argument("--size", type=int, help="image side (default: the model's input size; 224 for data)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="fp32, or bf16/fp16 autocast (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and images")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (timing after warm-up)")
    parser.add_argument("--backend", choices=("dali", "torchvision", "synthetic"), default="dali",
                        help="loader of --data-root for the end-to-end rate (train) or the data mode; "
                             "dali falls back to torchvision when DALI is not installed (the row records "
                             "the loader that ran)")
    parser.add_argument("--data-root", type=Path,
                        help="ImageNet-layout folder (ROOT/train/<wnid>/*.JPEG): train also measures the "
                             "end-to-end rate with the real loader and says which one limits; data times "
                             "--steps batches of it per repeat (default for data: 400 generated "
                             "ImageNet-sized JPEGs)")
    parser.add_argument("--num-threads", type=int, help="decoding threads (DALI) or workers (torchvision)")
    parser.add_argument("--steps", type=int, default=20,
                        help="steps (data: loader batches) per timed repeat (default 20)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps (data: batches, covering pipeline build and worker start) first (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; median and min-max (default 3)")
    parser.add_argument("--peak-tflops", type=float,
                        help="peak TFLOP/s of one device for MFU (default: bf16/fp16 data-sheet peak by GPU name)")
    parser.add_argument("--overhead", action="store_true",
                        help="train: also time a bare PyTorch loop and timm's benchmark recipe on the same "
                             "pre-made batches and print step-time ratios of the trainer's train_step (not the "
                             "loop around it) over them; timm's only when timm builds the same model")
    parser.add_argument("--procs", help="scaling: comma-separated process counts (default 1,2 on CPU; "
                                        "1,2,4,8 up to the GPU count on CUDA)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                        help="where the JSON goes and results.csv/README.md are updated (default reports/bench)")
    parser.add_argument("--json", type=Path, help="write the JSON here instead of OUT_DIR/<name>.json")
    parser.add_argument("--no-record", action="store_true", help="write the JSON only, no results.csv row")
    parser.add_argument("--add", type=Path, nargs="*", default=[],
                        help="readme: append the rows of these results.csv files (e.g. from a GPU machine) first")
    parser.add_argument("--expect-world-size", type=int, help=argparse.SUPPRESS)  # set by scaling


def _fmt_rate(t: float, lo: float, hi: float) -> str:
    return f"{t:.1f} images/s (median; {lo:.1f}-{hi:.1f})"


def summary(record: BenchRecord) -> str:
    """What a person reads after a run."""
    r = record
    head = (f"{r.mode}: {r.model or r.backend} {r.size}px batch {r.batch_size}/process, {r.precision}"
            f"{', channels_last' if r.channels_last else ''}{', compiled' if r.compile else ''}, "
            f"{r.world_size} process(es) on {r.device_name}")
    what = {"train": "model-only (the trainer's step, synthetic batches on the device)",
            "infer": "model-only (forward, synthetic batches on the device)",
            "data": f"input pipeline alone ({r.backend})",
            "scaling": "per process (the trainer's step, synthetic batches)"}[r.mode]
    lines = [head,
             f"  {what}: {_fmt_rate(r.images_per_s, r.images_per_s_min, r.images_per_s_max)}, "
             f"{r.step_time_median_s * 1e3:.1f} ms/step over {r.repeats} x {r.steps} steps",
             f"  peak memory: {r.peak_memory_mib:.0f} MiB ({r.peak_memory_kind})"]
    if r.world_size > 1:
        lines.append(f"  all processes: {r.images_per_s_total:.1f} images/s")
    if r.macs is not None:
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "n/a"
        lines.append(f"  {r.macs / 1e9:.3f} GMACs/image forward -> {r.tflops:.3g} TFLOP/s achieved, "
                     f"MFU {mfu} (peak: {r.peak_tflops or 'unknown'}; {r.peak_source})")
        lines.append(f"  convention: {r.flop_convention}")
    if r.end_to_end_images_per_s is not None:
        verdict = ("the data loader limits" if r.limiter == "data loader"
                   else "the model limits (the loader keeps up)")
        lines.append(f"  end-to-end with the {r.end_to_end_backend} loader on {r.data_root}: "
                     f"{r.end_to_end_images_per_s:.1f} images/s = {r.end_to_end_fraction:.0%} of model-only "
                     f"-> {verdict}")
    if r.trainer_over_bare is not None:
        lines.append(f"  overhead of train_step alone (not the training loop around it) on the same pre-made "
                     f"batches: train_step {r.overhead_trainer_images_per_s:.1f} images/s, bare PyTorch "
                     f"forward/backward/step {r.bare_images_per_s:.1f} images/s (same initial weights, optimizer "
                     f"settings, batches and steps): train_step/bare step time = {r.trainer_over_bare:.3f}")
        if r.trainer_over_timm is not None:
            lines.append(f"  timm's benchmark recipe on the same model ({r.timm_model}): {r.timm_images_per_s:.1f} "
                         f"images/s: train_step/timm step time = {r.trainer_over_timm:.3f}")
        else:
            lines.append(f"  timm's benchmark recipe: {r.timm_model}")
    if r.scaling_efficiency is not None:
        lines.append(f"  scaling efficiency vs the smallest process count: {r.scaling_efficiency:.0%}")
    return "\n".join(lines)


def _scaling_table(records: Sequence[BenchRecord]) -> str:
    rows = [f"{'processes':>9}  {'images/s total':>14}  {'per process':>11}  {'efficiency':>10}"]
    rows += [f"{r.world_size:>9}  {r.images_per_s_total:>14.1f}  {r.images_per_s:>11.1f}  "
             f"{r.scaling_efficiency:>10.0%}" for r in records]
    return "\n".join(rows)


def main(args: argparse.Namespace) -> int:
    if args.mode == "readme":
        return _readme(args)
    if args.mode in ("train", "infer", "scaling") and not args.model:
        raise BenchError(f"bench {args.mode} needs --model NAME (see `ran-bench profile` for the names)")
    if args.model:
        from ran_bench.models import model_info

        model_info(args.model)  # unknown names fail here, with the list of known ones
    args.size = _size(args)
    args.precision = _precision(args)
    if args.batch_size < 1:
        raise BenchError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.mode == "scaling":
        records = run_scaling(args)
        print(_scaling_table(records))
    else:
        records = [{"train": run_train, "infer": run_infer, "data": run_data}[args.mode](args)]
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one record per run, from the first process
    for rec in records:
        print(summary(rec))
    path = save(records, args.out_dir, json_path=args.json, record_csv=not args.no_record)
    print(f"wrote {path}" + ("" if args.no_record else f"; appended {args.out_dir / 'results.csv'} and "
                                                      f"regenerated {args.out_dir / 'README.md'}"))
    return 0


def _readme(args: argparse.Namespace) -> int:
    csv_path = args.out_dir / "results.csv"
    for extra in args.add:
        if not Path(extra).is_file():
            raise BenchError(f"--add {extra}: no such file (give the results.csv a benchmark run wrote)")
        rows = read_csv(csv_path) if csv_path.exists() else []
        seen = {_row_key(r) for r in rows}
        offered, added = read_csv(extra), []
        for row in offered:
            if _row_key(row) not in seen:
                seen.add(_row_key(row))
                added.append(row)
        write_csv(rows + added, csv_path)
        skipped = len(offered) - len(added)
        print(f"added {len(added)} row(s) of {extra} to {csv_path}"
              + (f"; {skipped} already there (same time, command and device)" if skipped else ""))
    write_readme(csv_path, args.out_dir / "README.md")
    print(f"regenerated {args.out_dir / 'README.md'} from {csv_path}")
    return 0
