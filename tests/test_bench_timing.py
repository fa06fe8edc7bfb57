"""Timed regions and the FLOP/MFU arithmetic of the benchmarks (`ran_bench.bench.timing`,
`ran_bench.bench.flops`): what the figures mean, not how fast this machine is."""

from __future__ import annotations

import torch

from ran_bench.bench import flops, timing
from ran_bench.runtime import synchronize

# ---------------------------------------------------------------------------------------------
# Timed regions synchronise the device


def test_timed_region_is_bracketed_by_device_synchronisation(monkeypatch):
    events: list[str] = []
    clock = iter(range(100))
    monkeypatch.setattr(timing, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(timing, "_clock", lambda: events.append("clock") or float(next(clock)))

    times = timing.time_steps(lambda: events.append("step"), device=torch.device("cuda"), steps=3, warmup=2,
                             repeats=2)

    region = ["sync", "clock", "step", "step", "step", "sync", "clock"]
    assert events == ["step", "step"] + region + region
    assert times == [1 / 3, 1 / 3]  # each region: one clock tick over 3 steps


def test_synchronize_waits_for_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    synchronize(torch.device("cpu"))
    assert calls == []
    synchronize(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]


# ---------------------------------------------------------------------------------------------
# The peak MFU is measured against


def test_peak_is_looked_up_by_gpu_name_for_bf16_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert flops.resolve_peak(cuda, "bf16", None)[0] == 989.4
    assert flops.resolve_peak(cuda, "fp32", None)[0] is None  # the table holds bf16/fp16 peaks only
    # Names match on whole tokens, never as substrings of another product's name.
    for name, peak in [("NVIDIA A10", 125.0),  # not A100's
                       ("NVIDIA L40", 181.05), ("NVIDIA L40S", 362.05), ("NVIDIA L4", 121.0),  # not L4's
                       ("NVIDIA GH200 480GB", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert flops.resolve_peak(cuda, "bf16", None)[0] == peak, name
    # Unknown variants get no peak (and say so) rather than the peak of a name they contain.
    for name in ("NVIDIA A10G", "NVIDIA H800", "NVIDIA H20", "NVIDIA GeForce RTX 4090"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        peak, source = flops.resolve_peak(cuda, "bf16", None)
        assert peak is None and source.startswith(f"{name} is not in the peak table") and "--peak-tflops" in source
    assert flops.resolve_peak(torch.device("cpu"), "fp32", None)[0] is None
    assert flops.resolve_peak(torch.device("cpu"), "fp32", 1.5) == (1.5, "given with --peak-tflops")


# ---------------------------------------------------------------------------------------------
# "Is my data loader the bottleneck?"


def test_loader_verdict():
    assert timing.loader_verdict(100.0, 50.0) == (0.5, "data loader")
    assert timing.loader_verdict(100.0, 95.0) == (0.95, "model")  # within the spread of repeats
