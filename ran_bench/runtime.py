"""Run-time facts and switches shared by the trainer, the evaluator and the benchmarks: the device's
name, the precision names, autocast, waiting for a device, and which data backend runs."""

from __future__ import annotations

import functools
import logging
import platform
import socket
from contextlib import nullcontext

import torch

from ran_bench.errors import InputError

log = logging.getLogger("ran_bench")

PRECISIONS = ("fp32", "bf16", "fp16")


def device_name(device: torch.device) -> str:
    """GPU name on CUDA, the CPU model otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on `device` has finished (CUDA kernels run asynchronously), so a
    clock read after it counts them; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_precision(precision: str, device_type: str, option: str = "precision") -> str:
    """The precision a run uses: "fp32", "bf16" or "fp16" for `precision` ("auto" or one of them).

    auto: bf16 where the GPU has bf16 hardware (compute capability 8+); V100s and T4s only emulate
    it, slowly, so they get fp16 with a gradient scaler; fp32 on CPU. fp16 needs CUDA: Accelerate
    silently trains in fp32 on CPU, and the run would be recorded as fp16. `option` names the
    setting in the error."""
    if precision == "auto":
        if device_type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision not in PRECISIONS:
        raise InputError(f"{option} must be auto or one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device_type != "cuda":
        raise InputError(f"{option}=fp16 needs a CUDA GPU (autocast with a gradient scaler; on {device_type} it "
                         f"would silently run in fp32); use fp32 or bf16")
    return precision


def accelerate_precision(precision: str) -> str:
    """Accelerate's `mixed_precision` for a precision name."""
    return "no" if precision == "fp32" else precision


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision name (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@functools.cache
def dali_available() -> bool:
    """True when NVIDIA DALI can be imported; the torchvision backend replaces it otherwise."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install counts as absent, with the reason logged
        log.warning("NVIDIA DALI is not usable (%s: %s); using the torchvision data loader instead "
                    "(pip install ran-bench[dali] for the faster pipeline)", type(e).__name__, e)
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The data backend a run uses for `data.backend` ("auto": DALI on CUDA when installed)."""
    if backend != "auto":
        return backend
    return "dali" if device.type == "cuda" and dali_available() else "torchvision"


def free_port() -> int:
    """A TCP port free on this machine now, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
