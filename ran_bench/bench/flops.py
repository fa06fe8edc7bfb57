"""FLOPs per image, achieved TFLOP/s and MFU against the peak of the device."""

from __future__ import annotations

import re

import torch

from ran_bench.bench import BenchError

FLOP_CONVENTION = (
    "FLOPs = 2 x multiply-adds of ran_bench.models.count_macs (convolutions and matrix products); "
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
