"""The roofline columns of a benchmark row (`ran_bench.bench.flops.training_roofline`): which GPUs
get one, what it is, the blank of CPU rows, rows recorded before the columns existed, and the
README's "% of roofline" beside MFU."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn as nn

from ran_bench.bench import flops, modes
from ran_bench.bench import readme as bench_readme
from ran_bench.bench import record as bench_record
from ran_bench.bench.command import summary
from ran_bench.bench.flops import FLOP_CONVENTION
from ran_bench.cli import main as cli_main
from ran_bench.models import _registry
from ran_bench.roofline import DEVICES, roofline

TINY = "bench_roofline_tiny_conv"
H100 = "NVIDIA H100 80GB HBM3"


def _tiny_conv(num_classes: int = 10, **kwargs) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))


@pytest.fixture
def tiny_conv(monkeypatch):
    monkeypatch.setitem(_registry._MODELS, TINY, _registry.ModelInfo(TINY, _tiny_conv, 8, "cifar", 10))
    return TINY


@pytest.mark.parametrize("name, key", [
    (H100, "h100"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA B200", "b200"),
    ("NVIDIA A100-SXM4-40GB", None),  # 1.6 TB/s, not the 80GB's 2.0
    ("NVIDIA A100 80GB PCIe", None),
    ("NVIDIA H100 PCIe", None),
    ("NVIDIA H100 NVL", None),
    ("NVIDIA H200 NVL", None),
    ("NVIDIA GH200 480GB", None),
    ("NVIDIA L40S", None),
])
def test_gpu_names_map_to_the_roofline_device_with_the_same_limits(name, key):
    found, source = flops.roofline_device("cuda", name, "bf16")
    assert found == key
    if key is None:
        assert source.startswith(f"{name} is not in the roofline's device table")
    else:
        assert source.startswith(f"{key}: {DEVICES[key].name}, ")


def test_cpu_and_fp32_runs_have_no_roofline():
    assert flops.roofline_device("cpu", "AMD EPYC (2 cores)", "bf16") == (None, "no data-sheet roofline for CPUs")
    assert flops.roofline_device("cuda", H100, "fp32") == (
        None, "fp32 run: the roofline counts a bf16/fp16 autocast step")
    assert flops.roofline_device("cuda", H100, "fp16")[0] == "h100"


def test_the_peak_table_still_matches_names_without_their_memory_size():
    assert flops.GPU_PEAK_BF16_TFLOPS[flops.gpu_key("NVIDIA A100-SXM4-40GB")] == 312.0
    assert flops.gpu_key("NVIDIA H100 80GB HBM3") == ("H100",)


def _gpu_record(**changes) -> bench_record.BenchRecord:
    base = dict(mode="train", model=TINY, size=8, batch_size=2, world_size=1, precision="bf16", channels_last=True,
                compile=False, backend="synthetic", steps=2, warmup=1, repeats=1, step_time_s=[0.001],
                step_time_median_s=0.001, images_per_s=2000.0, images_per_s_min=2000.0, images_per_s_max=2000.0,
                images_per_s_total=2000.0, peak_memory_mib=10.0, peak_memory_kind="cuda_max_memory_allocated",
                params=1, macs=1, flops_per_image=6, tflops=1.0, peak_tflops=989.4, peak_source="x", mfu=0.001,
                flop_convention=FLOP_CONVENTION)
    return bench_record.BenchRecord(**(base | changes))


def test_a_gpu_training_row_gets_the_roofline_of_its_model_size_and_batch(tiny_conv, monkeypatch):
    """% of roofline is measured over limit: a step measured at a quarter of the limit is 25%."""
    monkeypatch.setattr(modes, "device_name", lambda device: H100)
    expected = roofline(TINY, 8, 2, DEVICES["h100"]).images_per_s
    record = _gpu_record(images_per_s=expected / 4, device_type="cuda", device_name=H100)
    limit = modes._add_roofline(record, torch.device("cuda"))
    assert limit.images_per_s == record.roofline_images_per_s == pytest.approx(expected)
    assert record.roofline_fraction == pytest.approx(0.25)
    assert record.roofline_source.startswith("h100: H100 SXM, 989 TFLOP/s bf16 dense, 3.35 TB/s")
    row = bench_record.csv_row(record)
    assert float(row["roofline_images_per_s"]) == pytest.approx(expected, rel=1e-5)
    assert f"  % of roofline: 25.0% of the unfused roofline's {expected:.1f} images/s (h100: " in summary(record)


def test_a_cpu_training_row_has_a_blank_roofline_and_says_why(tiny_conv, tmp_path):
    assert cli_main(["bench", "train", "--model", tiny_conv, "--batch-size", "2", "--steps", "1", "--warmup", "0",
                     "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    (row,) = bench_record.read_csv(tmp_path / "results.csv")
    assert (row["roofline_images_per_s"], row["roofline_fraction"]) == ("", "")  # blank, not a number
    assert row["roofline_source"] == "no data-sheet roofline for CPUs"
    # the new columns come after schema 1's, which keep their positions
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("schema_version") + 1:] == ["roofline_images_per_s", "roofline_fraction",
                                                            "roofline_source"]


def test_readme_gives_older_gpu_training_rows_their_roofline_and_no_others(tiny_conv, tmp_path):
    """Rows written before the columns existed: the H100 bf16 training row gets the computed limit
    (said to be added afterwards); CPU, fp32, inference and unknown-GPU rows stay blank."""
    old_columns = bench_record.CSV_FIELDS[:bench_record.CSV_FIELDS.index("schema_version") + 1]
    rows = [_gpu_record(device_type="cuda", device_name=H100),
            _gpu_record(device_type="cpu", device_name="AMD EPYC (2 cores)", precision="fp32"),
            _gpu_record(device_type="cuda", device_name=H100, precision="fp32"),
            _gpu_record(device_type="cuda", device_name=H100, mode="infer"),
            _gpu_record(device_type="cuda", device_name="NVIDIA H100 PCIe")]
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(bench_record.csv_row(r) for r in rows)
    for _ in range(2):  # a second run finds nothing left to add
        assert cli_main(["bench", "readme", "--out-dir", str(tmp_path)]) == 0
    got = bench_record.read_csv(path)
    expected = roofline(TINY, 8, 2, DEVICES["h100"]).images_per_s
    assert float(got[0]["roofline_images_per_s"]) == pytest.approx(expected, rel=1e-5)
    assert float(got[0]["roofline_fraction"]) == pytest.approx(2000.0 / expected, rel=1e-5)
    assert got[0]["roofline_source"].startswith("h100: ")
    assert got[0]["roofline_source"].endswith("added by `ran-bench bench readme` from the row, after the run")
    assert [(r["roofline_images_per_s"], r["roofline_source"]) for r in got[1:]] == [("", "")] * 4

    readme = (tmp_path / "README.md").read_text()
    header = next(line for line in readme.splitlines() if line.startswith("| model |"))
    cells = [c.strip() for c in header.split("|")[1:-1]]
    assert cells[cells.index("MFU") + 1] == "% of roofline (of images/s)"
    first = next(line for line in readme.splitlines() if f"| {TINY} |" in line)
    recorded = float(got[0]["roofline_images_per_s"])  # results.csv keeps 6 significant digits
    assert f"| 0.1% | {2000.0 / recorded:.1%} of {recorded:.0f} (h100) |" in first
    assert "MFU = achieved FLOP/s over the device's dense peak" in readme
    assert "% of roofline" in readme and "measured images/s over the unfused roofline's images/s" in readme


def test_readme_cell_is_blank_without_a_roofline():
    row = bench_record.csv_row(_gpu_record(roofline_source="no data-sheet roofline for CPUs"))
    assert bench_readme._roofline_cell(row) == "–"
