"""FLOPs per image, achieved TFLOP/s and MFU against the peak of the device; the unfused roofline
of a training step (`ran_bench.roofline`) on the device's data-sheet limits."""

from __future__ import annotations

import re

import torch

from ran_bench.bench import BenchError
from ran_bench.errors import UserError
from ran_bench.roofline import DEVICES, Roofline, roofline

FLOP_CONVENTION = (
    "FLOPs = 2 x multiply-adds of ran_bench.models.count_macs (convolutions and matrix products); "
    "train step = 3 x forward FLOPs, inference = 1 x; TFLOP/s and MFU per process (one device)"
)

# Dense (no sparsity) bf16 = fp16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets (half the
# "with sparsity" figure where only that is printed). Keyed by the tokens of
# torch.cuda.get_device_name() that name the product, after dropping the ones that do not change
# the peak (see gpu_key): a name with any other token is an unknown variant and gets no peak,
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

# GPU names (as gpu_key splits them, memory size kept) whose data-sheet peak and bandwidth are those
# of a ran_bench.roofline.DEVICES entry; any other variant (PCIe, NVL, 40GB) has other limits.
ROOFLINE_DEVICES: dict[tuple[str, ...], str] = {
    ("H100", "80GB"): "h100",  # "NVIDIA H100 80GB HBM3": SXM5
    ("H200",): "h200",  # "NVIDIA H200": SXM
    ("H200", "141GB"): "h200",
    ("A100", "80GB"): "a100",  # "NVIDIA A100-SXM4-80GB"; the PCIe card adds "PCIE"
    ("B200",): "b200",
}
# The memory size decides the bandwidth, so the roofline's match keeps it.
_ROOFLINE_NEUTRAL_TOKENS = re.compile(r"NVIDIA|TESLA|HBM\d?E?|SXM\d?")


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
    key = gpu_key(name)
    if key in GPU_PEAK_BF16_TFLOPS:
        return GPU_PEAK_BF16_TFLOPS[key], f"bf16/fp16 dense peak of {' '.join(key)} (data sheet)"
    return None, (f"{name} is not in the peak table (known: "
                  f"{', '.join(' '.join(k) for k in GPU_PEAK_BF16_TFLOPS)}): give --peak-tflops")


def gpu_key(name: str, neutral: re.Pattern = _PEAK_NEUTRAL_TOKENS) -> tuple[str, ...]:
    """The product tokens of a GPU name, less the `neutral` ones: "NVIDIA A100-SXM4-80GB" -> ("A100",),
    "NVIDIA H100 PCIe" -> ("H100", "PCIE"). Whole tokens, so "A10G" and "GH200" never match "A10" or "H200"."""
    tokens = re.split(r"[^0-9A-Z]+", name.upper())
    return tuple(t for t in tokens if t and not neutral.fullmatch(t))


def roofline_device(device_type: str, device_name: str, precision: str) -> tuple[str | None, str]:
    """The key of ran_bench.roofline.DEVICES whose limits are this run's device's, and a description of
    it; None and why where there is none (CPUs, fp32 runs, GPUs not in ROOFLINE_DEVICES)."""
    if device_type != "cuda":
        return None, "no data-sheet roofline for CPUs"
    if precision not in ("bf16", "fp16"):
        return None, f"{precision} run: the roofline counts a bf16/fp16 autocast step"
    key = ROOFLINE_DEVICES.get(gpu_key(device_name, _ROOFLINE_NEUTRAL_TOKENS))
    if key is None:
        known = ", ".join(" ".join(k) for k in ROOFLINE_DEVICES)
        return None, f"{device_name} is not in the roofline's device table (known: {known})"
    spec = DEVICES[key]
    return key, (f"{key}: {spec.name}, {spec.peak_tflops:g} TFLOP/s bf16 dense, {spec.bandwidth_tbs:g} TB/s "
                 f"({spec.source}); unfused channels_last bf16 step counted by ran_bench.roofline")


def training_roofline(model: str, size: int, batch: int, *, device_type: str, device_name: str,
                      precision: str) -> tuple[Roofline | None, str]:
    """The unfused roofline of one training step of registered `model` at `size` and `batch` on the
    run's device, and its source (or None and why none): a computed limit, not a measurement."""
    key, source = roofline_device(device_type, device_name, precision)
    if key is None:
        return None, source
    try:
        return roofline(model, size, batch, DEVICES[key]), source
    except UserError as e:  # a model this checkout no longer registers: no limit rather than a guess
        return None, f"not counted: {e}"


def roofline_fraction(images_per_s: float, limit: Roofline | None) -> float | None:
    """Measured over roofline images/s (a fraction; above 1 only where fusion saves memory traffic)."""
    return None if limit is None else images_per_s / limit.images_per_s
