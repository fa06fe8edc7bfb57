"""What a row costs: the report's "to reproduce" table and the cost line of `ran-bench train`'s
start-up, computed from `bench train` rows of a results.csv written here (never estimated)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_report import make_run, parse_tables, table_with

from conftest import REPO
from ran_bench.bench import rates
from ran_bench.bench.record import CSV_FIELDS, device_description, write_csv
from ran_bench.cli import main as cli_main
from ran_bench.data.demo import make_demo
from ran_bench.report import cost

ENTRY = str(REPO / "tests" / "tiny_model.py")  # the ran-bench CLI with the tiny test model registered
GPU = "Test GPU 80GB"
IMAGES = 530_000 * 256  # the paper's ImageNet schedule


def bench_row(**fields) -> dict[str, str]:
    """A results.csv row: a model-only `bench train` row of attention92 at 224 on GPU in bf16 at
    1000 images/s, `fields` replacing any column."""
    row = {k: "" for k in CSV_FIELDS}
    row.update(mode="train", model="attention92", size="224", batch_size="128", world_size="1", precision="bf16",
               channels_last="True", compile="False", backend="synthetic", images_per_s="1000",
               device_type="cuda", device_name=GPU, git_commit="0123456789abcdef-dirty",
               time_utc="2026-11-25T16:32:21Z")
    row.update({k: str(v) for k, v in fields.items()})
    return row


def cost_rows(tmp_path, rows: list[dict[str, str]]) -> dict[str, list[dict]]:
    """The "to reproduce" table made from `rows` written to and read from a results.csv, by network."""
    csv_path = tmp_path / "results.csv"
    write_csv(rows, csv_path)
    read, problem = rates.read_rows(csv_path)
    assert problem is None
    by_network: dict[str, list[dict]] = {}
    for row in table_with(parse_tables("\n".join(cost.table(read))), "wall time on 32 devices")["rows"]:
        by_network.setdefault(row["Network"], []).append(row)
    return by_network


def test_a_rows_cost_is_the_papers_images_over_the_recorded_rate_per_device(tmp_path):
    [a92] = cost_rows(tmp_path, [bench_row()])["Attention-92"]
    # 135,680,000 images / 1000 images/s / 3600 = 37.69 GPU-hours; / 8 = 4.71 h; / 32 = 1.18 h.
    assert (a92["train size"], a92["paper's schedule (images)"], a92["device"], a92["precision"]) == \
        ("224", "135,680,000", GPU, "bf16")
    assert a92["images/s per device (rate used)"] == "1,000.0 model-only (synthetic batches: the loader not included)"
    assert a92["hours on one device (GPU-hours)"] == "37.7"
    assert a92["wall time on 8 devices"] == "4.7 h (linear scaling assumed)"
    assert a92["wall time on 32 devices"] == "1.2 h (linear scaling assumed)"
    # The number names its source: which row (time), batch, layout and commit.
    assert a92["bench row"] == ("`bench train` row of 2026-11-25T16:32:21Z, batch 128 per device, channels_last, "
                                "commit 0123456789-dirty")


def test_rows_without_a_bench_train_row_at_the_train_size_say_not_measured(tmp_path):
    table = cost_rows(tmp_path, [
        bench_row(size=320),  # Attention-92 trains at 224 (its recipe): a 320 row is another size
        bench_row(mode="infer", images_per_s=4000),  # inference is not training
        bench_row(model="resnet200", size=320),
        bench_row(model="inception_resnet_v2", size=299, images_per_s=""),  # no rate recorded
        bench_row(model="attention_inception56", size=299, images_per_s="fast"),  # malformed
    ])
    assert len(table) == 9 and all(len(rows) == 1 for rows in table.values())  # every Table 7 row, once
    for network, [row] in table.items():
        assert [row[c] for c in cost.HEADERS[5:9]] == ["not measured"] * 4, network
        assert row["device"] == row["precision"] == "—"
    assert table["Attention-92"][0]["bench row"] == "no `bench train` row of attention92 at 224 (rows at 320: " \
                                                    "not its train size)"
    assert table["ResNet-200 (pre-activation)"][0]["bench row"].startswith("no `bench train` row of resnet200 at 224")
    assert table["Inception-ResNet-v1"][0]["train size"] == "299"  # the Inception rows train at 299
    assert table["ResNet-152"][0]["bench row"] == "no `bench train` row of resnet152 at 224"


def test_each_device_and_precision_gets_its_fastest_model_only_and_end_to_end_rate(tmp_path):
    rows = cost_rows(tmp_path, [
        bench_row(images_per_s=2000, compile=True),
        bench_row(images_per_s=1500, end_to_end_images_per_s=500, end_to_end_backend="dali", data_root="/data/in"),
        bench_row(images_per_s=1600, end_to_end_images_per_s=400, end_to_end_backend="torchvision"),
        bench_row(images_per_s=600, device_name="Other GPU"),
        bench_row(images_per_s=900, device_name="Other GPU", time_utc="2026-11-26T00:00:00Z"),
        bench_row(images_per_s=800, device_name="Other GPU", precision="fp32"),
        bench_row(images_per_s=5, device_name="A CPU", device_type="cpu", precision="fp32"),
    ])["Attention-92"]
    rate = "images/s per device (rate used)"
    # GPUs first, then by device name and precision, model-only before end-to-end.
    assert [(r["device"], r["precision"], r[rate].split(" (")[0]) for r in rows] == [
        ("Other GPU", "bf16", "900.0 model-only"), ("Other GPU", "fp32", "800.0 model-only"),
        (GPU, "bf16", "2,000.0 model-only"), (GPU, "bf16", "500.0 end-to-end"), ("A CPU", "fp32", "5 model-only")]
    other, other32, model_only, e2e, cpu = rows
    assert model_only["hours on one device (GPU-hours)"] == "18.8"  # 135.68M / 2000 / 3600 = 18.84
    assert model_only["bench row"] == ("`bench train` row of 2026-11-25T16:32:21Z, batch 128 per device, "
                                       "channels_last, compile, commit 0123456789-dirty")
    assert e2e[rate] == "500.0 end-to-end (dali loader on /data/in; the model alone: 1,500.0 images/s)"
    assert e2e["hours on one device (GPU-hours)"] == "75.4"  # 135.68M / 500 / 3600 = 75.38
    assert other["bench row"].startswith("`bench train` row of 2026-11-26T00:00:00Z")  # the faster, newer row
    assert other["hours on one device (GPU-hours)"] == "41.9"  # 135.68M / 900 / 3600 = 41.88
    assert other32["hours on one device (GPU-hours)"] == "47.1"  # 135.68M / 800 / 3600 = 47.11
    # 135.68M / 5 / 3600 = 7,538 device-hours; / 8 = 942 h = 39 days; / 32 = 236 h = 10 days.
    assert (cpu["hours on one device (GPU-hours)"], cpu["wall time on 8 devices"], cpu["wall time on 32 devices"]) \
        == ("7,538", "942 h = 39 days (linear scaling assumed)", "236 h = 10 days (linear scaling assumed)")


def test_a_measured_scaling_efficiency_replaces_the_linear_assumption(tmp_path):
    scaling = dict(mode="scaling", world_size=8, images_per_s=900, scaling_efficiency=0.8, git_commit="",
                   time_utc="2026-11-27T00:00:00Z")
    [a92] = cost_rows(tmp_path, [
        bench_row(),
        bench_row(**scaling),
        bench_row(**{**scaling, "model": "attention56", "scaling_efficiency": 0.5}),  # another model
        bench_row(**{**scaling, "world_size": 32, "precision": "fp32", "scaling_efficiency": 0.5}),  # fp32
    ])["Attention-92"]
    # 37.69 GPU-hours / 8 / 0.8 = 5.89 h; 32 devices: no row of this precision, so linear.
    assert a92["wall time on 8 devices"] == ("5.9 h (80% scaling measured by the `bench scaling` row of "
                                             "2026-11-27T00:00:00Z, commit not recorded)")
    assert a92["wall time on 32 devices"] == "1.2 h (linear scaling assumed)"


@pytest.mark.parametrize("content", [None, b"name,value\nx,1\n", b"\xff\xfe\x00garbage\x00\n", b"mode\x00,model\n"],
                         ids=["missing", "foreign", "binary", "nul"])
def test_an_unreadable_results_csv_gives_no_figure_and_says_why(tmp_path, content):
    csv_path = tmp_path / "results.csv"
    if content is not None:
        csv_path.write_bytes(content)
    rows, problem = rates.read_rows(csv_path)
    assert rows == [] and str(csv_path) in problem
    assert rates.schedule_cost_line("attention92", 224, "bf16", GPU, IMAGES, 8, csv_path) is None
    assert problem in cost.note(rows, problem, csv_path)
    rows = table_with(parse_tables("\n".join(cost.table(rows, problem))), "wall time on 32 devices")["rows"]
    assert len(rows) == 9 and {r["hours on one device (GPU-hours)"] for r in rows} == {"not measured"}
    assert {r["bench row"] for r in rows} == {"no bench rows read (see above)"}


def report_text(tmp_path, *args: str) -> str:
    """`ran-bench report` of one Attention-56 run with `args`: the markdown it wrote."""
    run = make_run(tmp_path, "ran56", evaluations=[(224, 22.5, 6.4)])
    out = tmp_path / "out" / "r.md"
    assert cli_main(["report", str(run), "-o", str(out), *args]) == 0
    return out.read_text()


def test_a_report_with_an_unreadable_results_csv_is_written_and_says_why(tmp_path):
    csv_path = tmp_path / "results.csv"
    csv_path.write_text("name,value\nx,1\n")
    text = report_text(tmp_path, "--bench-csv", str(csv_path))
    section = text[text.index("## To reproduce"):]
    assert f"`{csv_path}` ({csv_path} could not be read (" in section and "not a ran-bench results.csv" in section
    rows = table_with(parse_tables(text), "wall time on 32 devices")["rows"]
    assert {r["wall time on 8 devices"] for r in rows} == {"not measured"}


def test_the_train_cost_line_needs_the_runs_model_size_device_and_precision(tmp_path):
    csv_path = tmp_path / "results.csv"
    write_csv([bench_row(), bench_row(**{"mode": "scaling", "world_size": 8, "scaling_efficiency": 0.9}),
               bench_row(images_per_s=800, end_to_end_images_per_s=300, time_utc="2026-11-26T00:00:00Z")], csv_path)
    line = rates.schedule_cost_line("attention92", 224, "bf16", GPU, IMAGES, 8, csv_path)
    # The fastest model-only rate (1000 images/s), not the end-to-end rate of another loader and data.
    # 37.69 GPU-hours; 8 GPUs at the measured 90%: 37.69 / 8 / 0.9 = 5.23 h.
    assert line.startswith("this run's schedule (135,680,000 images) is about 37.7 GPU-hours, 5.2 h on this "
                           "8-GPU job (90% scaling measured by the `bench scaling` row of 2026-11-25T16:32:21Z")
    assert line.endswith("by the `bench train` row of 2026-11-25T16:32:21Z, Test GPU 80GB, bf16, batch 128 per "
                         "device, channels_last, commit 0123456789-dirty")
    assert "1,000.0 images/s per device, model-only" in line
    assert "1.2 h on this 32-GPU job (linear scaling assumed)" in \
        rates.schedule_cost_line("attention92", 224, "bf16", GPU, IMAGES, 32, csv_path)
    for other in [("attention56", 224, "bf16", GPU), ("attention92", 320, "bf16", GPU),
                  ("attention92", 224, "fp32", GPU), ("attention92", 224, "bf16", "Test GPU 40GB")]:
        assert rates.schedule_cost_line(*other, IMAGES, 8, csv_path) is None, other


def test_the_report_reads_the_results_csv_the_environment_names_and_states_the_rules(tmp_path, monkeypatch):
    csv_path = tmp_path / "results.csv"
    write_csv([bench_row(images_per_s=2000)], csv_path)
    monkeypatch.setenv(rates.RESULTS_CSV_ENV, str(csv_path))
    text = report_text(tmp_path)
    section = text[text.index("## To reproduce: what each Table 7 row costs"):]
    assert f"recorded in `{csv_path}` (1 `bench train` rows read)" in section
    # The schedule's source, and the scaling assumption, are in the note.
    assert "stops ImageNet training at 530k iterations" in section and "530,000 x 256 = 135,680,000 images" in section
    assert "that assumes linear scaling, which is not measured" in section
    rows = {r["Network"]: r for r in table_with(parse_tables(text), "wall time on 32 devices")["rows"]}
    assert rows["Attention-92"]["hours on one device (GPU-hours)"] == "18.8"  # 135.68M / 2000 / 3600
    assert rows["Attention-92"]["wall time on 8 devices"] == "2.4 h (linear scaling assumed)"  # 18.84 / 8


def test_without_the_environment_the_checkouts_results_csv_is_read(monkeypatch):
    monkeypatch.delenv(rates.RESULTS_CSV_ENV, raising=False)
    assert rates.results_csv() == REPO / "reports" / "bench" / "results.csv"  # where `bench` records by default


TRAIN_CONFIG = """
model: {{name: test_tiny_net}}
data: {{name: tiny, root: {root}, backend: torchvision, train_size: 32, test_sizes: [32], num_threads: 0}}
optim: {{global_batch_size: 4, per_device_batch_size: 4}}
schedule: {{reference_batch_size: 4, total_steps: 2, milestones: [1]}}
checkpoint: {{every_steps: 2}}
eval: {{every_steps: 0, batch_size: 4}}
precision: fp32
"""


def test_ran_bench_train_logs_the_cost_of_its_schedule_by_its_devices_bench_row(tmp_path):
    make_demo(tmp_path / "data", num_classes=2, train_per_class=4, val_per_class=1, min_side=36, max_side=40)
    (tmp_path / "c.yaml").write_text(TRAIN_CONFIG.format(root=tmp_path / "data"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the device as the trainer below names it: 1 thread (OMP_NUM_THREADS=1)
    here = device_description(torch.device("cpu"))
    torch.set_num_threads(threads)
    csv_path = tmp_path / "results.csv"
    row = dict(model="test_tiny_net", size=32, precision="fp32", device_type="cpu", device_name=here)
    write_csv([bench_row(**row, images_per_s=0.002), bench_row(**{**row, "size": 64}, images_per_s=1),
               bench_row(**{**row, "device_name": here + " elsewhere"}, images_per_s=1)], csv_path)
    env = {**os.environ, rates.RESULTS_CSV_ENV: str(csv_path), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, ENTRY, "train", "--config", str(tmp_path / "c.yaml"), "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = (tmp_path / "run" / "train.log").read_text()
    # 2 steps x 4 images = 8 images at 0.002 images/s: 4000 s = 1.1 device-hours, 1.1 h on 1 process.
    # Only the row of this device at the run's size counts (not the one at 64, not the other device).
    assert [line[line.index("this run's"):] for line in log.splitlines() if "this run's schedule" in line] == [
        f"this run's schedule (8 images) is about 1.1 device-hours, 1.1 h on this 1-process job (one device), "
        f"at 0.002 images/s per device, model-only (synthetic batches: the loader not included), by the `bench train` "
        f"row of 2026-11-25T16:32:21Z, {here}, fp32, batch 128 per device, channels_last, commit 0123456789-dirty"]
