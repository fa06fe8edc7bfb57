"""`ran-bench bench train --profile` (`ran_bench.bench.profiling`): the trace it writes, and the table
of self time by op kind, in the kinds of the roofline (`ran_bench.roofline`)."""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch.nn as nn
from torch.autograd import DeviceType

from ran_bench.bench import profiling
from ran_bench.cli import main as cli_main
from ran_bench.models import _registry
from ran_bench.roofline import DEVICES, KINDS, KindCost, Roofline, model_step

TINY = "bench_profile_tiny_conv"
SIZE = 8
STEPS = profiling.PROFILE_ACTIVE


def _tiny_conv(num_classes: int = 10, **kwargs) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))


@pytest.fixture(scope="module")
def tiny_conv():
    mp = pytest.MonkeyPatch()
    mp.setitem(_registry._MODELS, TINY, _registry.ModelInfo(TINY, _tiny_conv, SIZE, "cifar", 10))
    yield TINY
    mp.undo()


@pytest.fixture(scope="module")
def profiled(tiny_conv, tmp_path_factory):
    """One `bench train --profile` run of the tiny convolutional model: its out dir and what it printed."""
    out = tmp_path_factory.mktemp("profile")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli_main(["bench", "train", "--model", tiny_conv, "--batch-size", "4", "--steps", "1", "--warmup", "0",
                         "--repeats", "1", "--profile", "--out-dir", str(out), "--no-record"]) == 0
    return out, printed.getvalue()


def _table(printed: str) -> dict[str, float]:
    """{kind: CPU self ms per step} of the printed table, its total row included."""
    rows = re.findall(r"^  (\S.*?)\s+(-?\d+\.\d\d)\s+-?[\d.]+%$", printed, flags=re.M)
    return {kind: float(ms) for kind, ms in rows}


def test_profile_writes_a_chrome_trace_of_the_profiled_steps(profiled):
    out, printed = profiled
    trace = out / f"train_{TINY}_{SIZE}_fp32_bs4_cpu.pt.trace.json"
    assert f"trace: {trace} " in printed
    events = json.loads(trace.read_text())["traceEvents"]  # valid JSON in Chrome's trace format
    names = [e["name"] for e in events if e.get("ph") == "X"]
    assert sum(n.startswith("ProfilerStep#") for n in names) == STEPS  # the schedule's active steps only
    assert "aten::conv2d" in names and "Optimizer.step#SGD.step" in names  # the trainer's whole step


def test_profile_table_kinds_sum_to_the_profiled_total(profiled):
    out, printed = profiled
    table = _table(printed)
    assert list(table) == [*KINDS, profiling.OUTSIDE, "total"]
    total = table.pop("total")
    assert all(ms >= 0 for ms in table.values()), table
    assert sum(table.values()) == pytest.approx(total, abs=0.01 * len(table))  # each row rounded to 0.01 ms
    # The total is what the trace holds: the profiled steps' time, every event inside one.
    (trace,) = out.glob("*.pt.trace.json")
    steps = [e["dur"] for e in json.loads(trace.read_text())["traceEvents"] if e["name"].startswith("ProfilerStep#")]
    assert total == pytest.approx(sum(steps) / 1e3 / STEPS, abs=0.01)


def test_a_tiny_models_convolution_time_is_under_convolution(profiled):
    """Every event inside the forward convolution and its backward, allocations included, and nothing
    else: the trace's durations of those two events are the convolution row."""
    out, printed = profiled
    (trace,) = out.glob("*.pt.trace.json")
    conv = [e["dur"] for e in json.loads(trace.read_text())["traceEvents"]
            if e["name"] in ("aten::conv2d", "autograd::engine::evaluate_function: ConvolutionBackward0")]
    assert len(conv) == 2 * STEPS
    table = _table(printed)
    assert table["convolution"] > 0
    assert table["convolution"] == pytest.approx(sum(conv) / 1e3 / STEPS, abs=0.01)
    assert table["optimizer"] > 0 and table["batch norm"] > 0


def test_profile_is_refused_outside_bench_train(tiny_conv, tmp_path, capsys):
    assert cli_main(["bench", "infer", "--model", tiny_conv, "--profile", "--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --profile traces the training step: use it with bench train, not bench infer"]
    assert not any(tmp_path.iterdir())  # refused before measuring: nothing written


def test_gpu_table_gives_device_time_by_kind_beside_the_roofline():
    """On a GPU the table adds device ms per step and share, and the roofline's ms per step of each kind
    (none for time outside ops, which the roofline has no counterpart of)."""
    kinds = {kind: profiling.KindTime() for kind in profiling.PROFILE_KINDS}
    kinds["convolution"] = profiling.KindTime(cpu_us=3000, device_us=6000)
    kinds["batch norm"] = profiling.KindTime(cpu_us=1500, device_us=3000)
    kinds[profiling.OUTSIDE] = profiling.KindTime(cpu_us=1500, device_us=0)
    limit = Roofline("m", SIZE, 2, DEVICES["h100"], memory_bound_share=1.0, top_ops=(),
                     kinds=(KindCost("convolution", 0, 0, 0.001), KindCost("batch norm", 0, 0, 0.0005)))
    result = profiling.StepProfile(kinds, profiling.KindTime(6000, 9000), steps=3, warmup=2,
                                   trace_path=Path("t.pt.trace.json"), device_type="cuda")
    lines = profiling.format_profile(result, limit).splitlines()
    assert lines[2].split() == ["kind", "CPU", "self", "ms/step", "share", "GPU", "ms/step", "share", "roofline",
                                "ms/step"]
    rows = {line[2:22].strip(): line[22:].split() for line in lines[3:]}
    assert rows == {
        "convolution": ["1.00", "50.0%", "2.00", "66.7%", "1.00"],
        "matmul": ["0.00", "0.0%", "0.00", "0.0%", "0.00"],
        "batch norm": ["0.50", "25.0%", "1.00", "33.3%", "0.50"],
        "elementwise": ["0.00", "0.0%", "0.00", "0.0%", "0.00"],
        "pooling/upsampling": ["0.00", "0.0%", "0.00", "0.0%", "0.00"],
        "loss/other": ["0.00", "0.0%", "0.00", "0.0%", "0.00"],
        "optimizer": ["0.00", "0.0%", "0.00", "0.0%", "0.00"],
        profiling.OUTSIDE: ["0.50", "25.0%", "0.00", "0.0%", "–"],
        "total": ["2.00", "100.0%", "3.00", "100.0%", "1.50"],
    }


# ---------------------------------------------------------------------------------------------
# Kinds of profiler events


@dataclass
class Event:
    """The fields of torch's FunctionEvent that the table reads."""

    name: str
    self_cpu_time_total: float = 0.0
    self_device_time_total: float = 0.0
    device_type: DeviceType = DeviceType.CPU
    cpu_children: list[Event] = field(default_factory=list)
    cpu_parent: Event | None = None
    is_async: bool = False

    @property
    def cpu_time_total(self) -> float:
        return self.self_cpu_time_total + sum(c.cpu_time_total for c in self.cpu_children)

    @property
    def time_range(self):
        return type("Range", (), {"elapsed_us": lambda _: self.self_device_time_total})()


def tree(name: str, self_us: float, *children: Event, device_us: float = 0.0) -> Event:
    event = Event(name, self_us, device_us, cpu_children=list(children))
    for c in children:
        c.cpu_parent = event
    return event


def flatten(*roots: Event) -> list[Event]:
    out = []
    for r in roots:
        out += [r, *flatten(*r.cpu_children)]
    return out


def test_event_kinds_by_name_and_by_the_op_they_run_in():
    roots = [
        tree("ProfilerStep*", 5,  # Python between ops: outside
             tree("aten::conv2d", 1, tree("aten::convolution", 1, tree("aten::mkldnn_convolution", 10,
                                                                        tree("aten::empty", 2)))),
             tree("aten::batch_norm", 1, tree("aten::native_batch_norm", 4, tree("aten::add_", 1))),
             tree("aten::add_", 2),  # num_batches_tracked += 1: elementwise
             tree("aten::adaptive_avg_pool2d", 1, tree("aten::mean", 3)),  # a global pool runs as a mean
             tree("cudaDeviceSynchronize", 6)),
        tree("autograd::engine::evaluate_function: AddmmBackward0", 1,
             tree("AddmmBackward0", 1, tree("aten::mm", 4, tree("cudaLaunchKernel", 1, device_us=7)))),
        tree("autograd::engine::evaluate_function: NllLossBackward0", 1, tree("aten::nll_loss_backward", 2)),
        tree("Optimizer.step#SGD.step", 1, tree("aten::_foreach_add_", 3, device_us=9)),
    ]
    kernels = [Event("gemm_kernel", 0, 7, DeviceType.CUDA), Event("foreach_kernel", 0, 9, DeviceType.CUDA),
               Event("memcpy from no op", 0, 4, DeviceType.CUDA)]
    times = profiling.kind_times(flatten(*roots) + kernels)
    cpu = {k: t.cpu_us for k, t in times.items()}
    assert cpu == {"convolution": 14, "matmul": 7, "batch norm": 6, "elementwise": 2, "pooling/upsampling": 4,
                   "loss/other": 3, "optimizer": 4, profiling.OUTSIDE: 11}
    assert {k: t.device_us for k, t in times.items() if t.device_us} == {"matmul": 7, "optimizer": 9,
                                                                       profiling.OUTSIDE: 4}
    total = profiling.profiled_total(flatten(*roots) + kernels)
    assert (total.cpu_us, total.device_us) == (sum(cpu.values()), 20)


def test_profile_kinds_are_the_roofline_kinds_of_the_same_ops(tiny_conv):
    """Each aten op the roofline counts in the tiny model's step gets the roofline's kind in the
    profile too, except where the roofline decides by context the profile does not keep: the
    optimizer step (the profile has Optimizer.step# around it instead) and a global mean (pooling in
    the roofline, elementwise alone; inside adaptive_avg_pool2d in the profile)."""
    by_context = {"aten.mean", "aten.div", "aten.expand"}
    compared = 0
    for op in model_step(tiny_conv, SIZE, 2):
        if op.kind == "optimizer":
            assert profiling.event_kind(f"aten::{op.op.split('.', 1)[1]}", "optimizer") == "optimizer"
        elif op.op not in by_context:
            assert profiling.event_kind(f"aten::{op.op.split('.', 1)[1]}", None) == op.kind, op.op
            compared += 1
    assert compared >= 10
    assert profiling.event_kind("aten::mean", "pooling/upsampling") == "pooling/upsampling"
