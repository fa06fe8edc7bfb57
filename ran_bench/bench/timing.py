"""Timed regions, peak memory, and whether the data loader or the model limits a run."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ran_bench.bench import BenchError
from ran_bench.runtime import synchronize

# The share of the model-only rate below which the end-to-end run counts as limited by the loader;
# repeats of the same run spread by a few percent, so equal rates must not read as a bottleneck.
LOADER_LIMIT_FRACTION = 0.9

_clock = time.perf_counter  # module attribute so tests can observe the timer reads


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
