"""Where the time of the trainer's step goes (`ran-bench bench train --profile`): a torch.profiler
trace of a few steps (Chrome trace JSON, which Perfetto and TensorBoard open) and the self time of
its events by op kind, with the kinds of the roofline (`ran_bench.roofline.KINDS`), so that the
profile and the roofline can be compared kind by kind.

How profiler events get a kind (`event_kind`):
- an op event is named by its op: `aten::X` is op X; an autograd node, `autograd::engine::evaluate_function:
  XBackward0`, its inner `XBackward0` event and `torch::autograd::AccumulateGrad`, are ops named by the node;
  the op name gets the roofline's kind by name (`ran_bench.roofline.name_kind`);
- an event inside an op takes that op's kind when its own name says no more than "elementwise" (the
  allocations, views, copies and runtime calls a convolution makes are the convolution's cost), and
  its own kind otherwise;
- every event inside `Optimizer.step#...` or `Optimizer.zero_grad#...` is "optimizer";
- events in no op (the profiler's step, i.e. Python between ops; runtime calls outside ops) are
  OUTSIDE, which the roofline has no counterpart of;
- GPU time (kernels, copies) goes with the op that launched it; device time no op launched is OUTSIDE.
Two shape rules of the roofline need arguments the profile does not keep: a global average pool is
pooling in the forward (through its `aten::adaptive_avg_pool2d`) but its backward (`MeanBackward1`) is
elementwise here; a bias gradient's `sum` inside `AddmmBackward0` goes with the matmul here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from ran_bench.roofline import KINDS, Roofline, name_kind
from ran_bench.runtime import synchronize

OUTSIDE = "outside ops"
PROFILE_KINDS = (*KINDS, OUTSIDE)
# Profiler warm-up steps (traced, then discarded: the profiler's own start-up) and traced steps.
PROFILE_WARMUP = 2
PROFILE_ACTIVE = 3

_NODE = re.compile(r"^[A-Za-z0-9_]+Backward\d*$")  # an autograd node's own event, e.g. ConvolutionBackward0
_OP_PREFIXES = ("aten::", "autograd::engine::evaluate_function: ", "torch::autograd::")


def op_name(event_name: str) -> str | None:
    """The op an event stands for ("aten::mkldnn_convolution" -> "mkldnn_convolution",
    "autograd::engine::evaluate_function: AddmmBackward0" -> "AddmmBackward0"); None for events that
    are no op (profiler steps, annotations, CUDA runtime calls)."""
    for prefix in _OP_PREFIXES:
        if event_name.startswith(prefix):
            return event_name[len(prefix):]
    return event_name if _NODE.match(event_name) else None


def event_kind(event_name: str, enclosing: str | None) -> str | None:
    """The kind of an event inside an event of kind `enclosing` (None: inside no op); None = OUTSIDE."""
    if enclosing == "optimizer" or event_name.startswith("Optimizer."):
        return "optimizer"
    op = op_name(event_name)
    if op is None:
        return enclosing
    own = name_kind(op)
    return enclosing if own == "elementwise" and enclosing else own


@dataclass
class KindTime:
    """Self time of one kind over the traced steps, in microseconds: on the CPU (all threads) and on the GPU."""

    cpu_us: float = 0.0
    device_us: float = 0.0


def _roots(events: list[Any]) -> list[Any]:
    return [e for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None]


def profiled_total(events: Iterable[Any]) -> KindTime:
    """What was profiled: the total time of the top-level CPU events, and of all device events."""
    events = list(events)
    return KindTime(sum(e.cpu_time_total for e in _roots(events) if not e.is_async), _device_us(events))


def _device_us(events: list[Any]) -> float:
    return sum(e.time_range.elapsed_us() for e in events if e.device_type != DeviceType.CPU)


def kind_times(events: Iterable[Any]) -> dict[str, KindTime]:
    """Self CPU time and launched device time of profiler `events` (torch.autograd.profiler_util.
    FunctionEvent, as `prof.events()` gives them) by kind, every kind of PROFILE_KINDS present. The
    CPU times add up to `profiled_total`'s (self times of a tree sum to its roots' total times);
    device time that no op launched is OUTSIDE's."""
    events = list(events)
    times = {kind: KindTime() for kind in PROFILE_KINDS}
    stack = [(e, None) for e in _roots(events)]
    attributed = 0.0
    while stack:
        event, enclosing = stack.pop()
        kind = event_kind(event.name, enclosing)
        times[kind or OUTSIDE].cpu_us += event.self_cpu_time_total
        times[kind or OUTSIDE].device_us += event.self_device_time_total
        attributed += event.self_device_time_total
        stack.extend((child, kind) for child in event.cpu_children)
    times[OUTSIDE].device_us += _device_us(events) - attributed
    return times


@dataclass
class StepProfile:
    """The traced steps: self time by kind, the profiled total and the trace file."""

    kinds: dict[str, KindTime]
    total: KindTime
    steps: int
    warmup: int
    trace_path: Path
    device_type: str


def profile_steps(step: Callable[[], Any], *, device: torch.device, trace_path: Path,
                  warmup: int = PROFILE_WARMUP, active: int = PROFILE_ACTIVE) -> StepProfile:
    """Run `step` under torch.profiler (CPU activity, plus CUDA on a GPU) for `warmup` + `active`
    steps, the schedule tracing the last `active`; write their Chrome trace to `trace_path` and return
    their time by kind. Each step ends with device synchronisation, so its kernels fall in its window."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trace_path = Path(trace_path)
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    traced: dict[str, Any] = {}

    def ready(prof: profile) -> None:
        prof.export_chrome_trace(str(trace_path))
        traced["kinds"], traced["total"] = kind_times(prof.events()), profiled_total(prof.events())

    with profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1),
                 on_trace_ready=ready) as prof:
        for _ in range(warmup + active):
            step()
            synchronize(device)
            prof.step()
    return StepProfile(traced["kinds"], traced["total"], active, warmup, trace_path, device.type)


def format_profile(result: StepProfile, limit: Roofline | None = None) -> str:
    """The table a person reads: ms per step and share by kind, on the GPU beside the roofline's ms."""
    gpu = result.device_type == "cuda"
    cpu_total, gpu_total = result.total.cpu_us, result.total.device_us
    roof = {k.kind: k.seconds * 1e3 for k in limit.kinds} if limit is not None else None
    head = f"{'kind':<20} {'CPU self ms/step':>16} {'share':>6}"
    if gpu:
        head += f" {'GPU ms/step':>11} {'share':>6}" + (f" {'roofline ms/step':>16}" if roof else "")
    lines = [f"where the time goes: {result.steps} profiled steps of the trainer's step (after {result.warmup} "
             f"profiler warm-up steps), self time by op kind (the roofline's kinds; CPU time summed over threads)",
             f"  trace: {result.trace_path} (open in https://ui.perfetto.dev or TensorBoard)", "  " + head]

    def row(name: str, cpu_us: float, gpu_us: float, roof_ms: float | None) -> str:
        text = f"{name:<20} {cpu_us / 1e3 / result.steps:>16.2f} {_share(cpu_us, cpu_total):>6}"
        if gpu:
            text += f" {gpu_us / 1e3 / result.steps:>11.2f} {_share(gpu_us, gpu_total):>6}"
            if roof is not None:
                text += f" {roof_ms:>16.2f}" if roof_ms is not None else f" {'–':>16}"
        return "  " + text

    for kind, t in result.kinds.items():
        lines.append(row(kind, t.cpu_us, t.device_us, (roof or {}).get(kind, 0.0) if kind != OUTSIDE else None))
    lines.append(row("total", cpu_total, gpu_total, limit.seconds * 1e3 if limit is not None else None))
    return "\n".join(lines)


def _share(part: float, total: float) -> str:
    return f"{part / total:.1%}" if total else "–"
