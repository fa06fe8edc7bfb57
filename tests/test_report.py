"""`ran-bench report`: the paper's tables beside fixture runs, as well-formed markdown with plots."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import yaml

from ran_bench import report
from ran_bench.cli import main as cli_main
from ran_bench.metrics import MetricsError
from ran_bench.report.cells import percent
from ran_bench.results import Evaluation, Results, ResultsError


def make_run(root: Path, name: str, *, config: dict | None = None, metrics: list[dict] | None = None,
             evaluations: list[tuple[int, float, float]] = (), num_samples: int = 50_000, **fields) -> Path:
    """A run directory as `ran-bench train` leaves it: results.json, config.yaml, metrics.jsonl."""
    run = root / name
    values = dict(
        model="attention56", dataset="imagenet", data_root="/data/imagenet", num_classes=1000,
        params=31_810_728, macs=6_271_000_000, macs_input_size=224, train_size=224,
        evaluations=[Evaluation(size=s, top1_err=t1, top5_err=t5, num_samples=num_samples, step=0)
                     for s, t1, t5 in evaluations],
        steps=530_000, total_steps=530_000, images_seen=530_000 * 256, epochs=105.9,
        global_batch_size=256, world_size=8, device_type="cuda", device_name="NVIDIA H100",
        precision="bf16", wall_time_s=3600.0 * 20, gpu_hours=160.0, git_commit="0123456789abcdef",
    )
    values.update(fields)
    Results(**values).save(run / "results.json")
    cfg = config if config is not None else {"model": {"name": values["model"]}, "data": {"label_noise": 0.0}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if metrics is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run


def training_log(steps: int, eval_size: int) -> list[dict]:
    lines = [{"kind": "train", "step": s, "epoch": s / 100, "loss": 7.0 - s / steps, "lr": 0.1,
              "images_per_s": 900.0, "data_wait_s": 0.01, "time": float(s)} for s in range(10, steps + 1, 10)]
    lines += [{"kind": "eval", "step": s, "size": eval_size, "top1_err": 90.0 - s / 10, "top5_err": 70.0 - s / 10,
               "num_samples": 50_000} for s in (steps // 2, steps)]
    return lines


def parse_tables(markdown: str) -> list[dict]:
    """Every markdown table: header cells, rows of cells; asserts the structure is well formed."""
    tables, block = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            cells = [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in block]
            assert len(block) >= 3, f"table without rows: {block}"
            assert re.fullmatch(r"\|(\s*:?-{3,}:?\s*\|)+", block[1]), f"bad separator row: {block[1]}"
            header, rows = cells[0], cells[2:]
            assert len(cells[1]) == len(header), f"separator has {len(cells[1])} cells for {len(header)} columns"
            for row in rows:
                assert len(row) == len(header), f"row {row} has {len(row)} cells for header {header}"
            tables.append({"header": header, "rows": [dict(zip(header, r)) for r in rows]})
            block = []
    return tables


def table_with(tables: list[dict], *columns: str) -> dict:
    matching = [t for t in tables if set(columns) <= set(t["header"])]
    assert len(matching) == 1, f"expected one table with columns {columns}, found {len(matching)}"
    return matching[0]


@pytest.fixture(scope="module")
def imagenet_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_run(root, "ran56", evaluations=[(224, 22.5, 6.4)], train_images_per_s=2400.0,
             infer_images_per_s=7300.0, metrics=training_log(100, 224))
    make_run(root, "ran92_partial", model="attention92", params=52_466_344, macs=10_534_000_000,
             steps=100_000, images_seen=100_000 * 256, world_size=4, gpu_hours=40.0,
             evaluations=[(224, 25.0, 8.0), (320, 23.1, 6.9)], metrics=training_log(50, 320))
    out = root / "out" / "imagenet.md"
    assert report.main(argparse.Namespace(run_dirs=[root / "ran56", root / "ran92_partial"], output=out,
                                           bench_csv=None)) == 0
    return out, out.read_text()


def test_table7_rows_hold_paper_measured_and_differences(imagenet_report):
    _, text = imagenet_report
    table = table_with(parse_tables(text), "top-1 err % (paper)")
    rows = {r["Network"]: r for r in table["rows"]}
    # Every Table 7 network, in the paper's order, once (each fixture model has one run).
    assert [r["Network"] for r in table["rows"]] == [
        "ResNet-152", "Attention-56", "ResNeXt-101 (32x4d)", "AttentionNeXt-56", "Inception-ResNet-v1",
        "AttentionInception-56", "ResNet-200 (pre-activation)", "Inception-ResNet-v2", "Attention-92"]

    a56 = rows["Attention-56"]
    assert (a56["params M (paper)"], a56["params M (measured)"], a56["Δ params M"]) == ("31.9", "31.81", "-0.09")
    assert (a56["MACs G (paper)"], a56["MACs G (measured)"], a56["Δ MACs G"]) == ("6.3", "6.27", "-0.03")
    assert (a56["test size"], a56["top-1 err % (paper)"], a56["top-1 err % (measured)"], a56["Δ top-1"]) == \
        ("224", "21.76", "22.50", "+0.74")
    assert (a56["top-5 err % (paper)"], a56["top-5 err % (measured)"], a56["Δ top-5"]) == ("5.9", "6.40", "+0.50")
    assert a56["run"] == "ran56"

    # Attention-92 is tested at 320 in the paper: the 320 evaluation is used, not the 224 one.
    a92 = rows["Attention-92"]
    assert (a92["test size"], a92["top-1 err % (paper)"], a92["top-1 err % (measured)"], a92["Δ top-1"]) == \
        ("320", "19.5", "23.10", "+3.60")
    assert (a92["top-5 err % (paper)"], a92["top-5 err % (measured)"], a92["Δ top-5"]) == ("4.8", "6.90", "+2.10")
    assert (a92["params M (measured)"], a92["Δ params M"]) == ("52.47", "+1.17")
    # Stopped at 100k of its 530k steps: partial, and short of the paper's schedule.
    assert a92["run"] == "ran92_partial (partial, 18.9% of the paper's schedule)"


def test_a_short_schedule_is_never_shown_as_a_reproduction(tmp_path, monkeypatch):
    """A run that completed its own 1000-step schedule still saw 0.19% of the paper's 530k x 256
    images: its cell and its plot label say so."""
    annotations = []
    from matplotlib.axes import Axes

    original = Axes.annotate
    monkeypatch.setattr(Axes, "annotate",
                        lambda ax, text, *a, **k: annotations.append(text) or original(ax, text, *a, **k))
    run = make_run(tmp_path, "ran56_1k", steps=1000, total_steps=1000, images_seen=1000 * 256, epochs=0.2,
                   evaluations=[(224, 99.0, 97.0)])
    full = make_run(tmp_path, "ran92_full", model="attention92", evaluations=[(320, 19.9, 4.9)])
    tables = parse_tables(report.write_report([run, full], tmp_path / "r.md").read_text())
    rows = {r["Network"]: r for r in table_with(tables, "top-1 err % (paper)")["rows"]}
    assert rows["Attention-56"]["run"] == "ran56_1k (0.189% of the paper's schedule)"
    assert rows["Attention-92"]["run"] == "ran92_full"  # the paper's 530k x 256 images: no mark
    assert "ran56_1k (0.189% of the paper's schedule)" in annotations
    assert "ran92_full" in annotations


def test_percent_never_rounds_a_partial_up_to_100():
    assert percent(529_800 / 530_000) == "99.96%"
    assert percent((135_680_000 - 1) / 135_680_000) == "99.999999%"
    assert percent(1.0) == "100%"
    assert percent(13.25) == "1,325%"  # a run longer than the paper's schedule
    assert percent(100_000 / 530_000) == "18.9%"


def test_cells_with_a_pipe_or_a_newline_keep_the_tables_columns(tmp_path):
    """A run directory named with '|' and a model option holding '|' and a newline are escaped."""
    run = make_run(tmp_path, "pipe|run", model="cifar_attention56", dataset="cifar10", num_classes=10,
                   params=850_000, macs=10**8, macs_input_size=32, train_size=32, augmentation="cifar",
                   config={"model": {"name": "cifar_attention56", "options": {"note": "x|y\nz"}}},
                   evaluations=[(32, 7.5, 0.6)], num_samples=10_000)
    tables = parse_tables(report.write_report([run], tmp_path / "r.md").read_text())
    [other] = table_with(tables, "why not in a paper table")["rows"]
    assert (other["run"], other["options"], other["top-1 err %"]) == ("pipe\\|run", "note=x\\|y z", "7.50")
    assert table_with(tables, "of the paper's schedule")["rows"][0]["run"] == "pipe\\|run"


def test_paper_numbers_are_shown_as_printed(tmp_path):
    """The paper's digits are kept: Table 6 prints 20.50 for WRN-28-10 on CIFAR-100, not 20.5."""
    run = make_run(tmp_path, "c10", model="cifar_attention92", dataset="cifar10", num_classes=10,
                   params=1_950_000, macs=2 * 10**8, macs_input_size=32, train_size=32, augmentation="cifar",
                   evaluations=[(32, 5.0, 0.2)], num_samples=10_000)
    text = report.write_report([run], tmp_path / "r.md").read_text()
    t6 = {(r["network"], r["data set"]): r for r in table_with(parse_tables(text), "network", "data set")["rows"]}
    assert t6["WRN-28-10", "CIFAR-100"]["top-1 err % (paper)"] == "20.50"
    assert t6["WRN-16-8", "CIFAR-10"]["params M (paper)"] == "11.0"
    # Table 4's gap is from a blog summary, not from the paper (reference/paper.md): said so.
    table4 = next(line for line in text.splitlines() if line.startswith("Table 4"))
    assert "A blog summary of the paper (not the paper itself) states" in table4 and "0.94" in table4


def test_rows_without_a_run_say_not_run_and_keep_the_paper_numbers(imagenet_report):
    _, text = imagenet_report
    rows = {r["Network"]: r for r in table_with(parse_tables(text), "top-1 err % (paper)")["rows"]}
    r200 = rows["ResNet-200 (pre-activation)"]
    assert (r200["params M (paper)"], r200["MACs G (paper)"], r200["test size"], r200["top-1 err % (paper)"],
            r200["top-5 err % (paper)"]) == ("64.7", "15.0", "320", "20.1", "4.8")
    for network in ("ResNet-152", "ResNet-200 (pre-activation)", "Inception-ResNet-v2"):
        row = rows[network]
        assert row["params M (measured)"] == row["top-1 err % (measured)"] == row["top-5 err % (measured)"] == "not run"
        assert row["Δ top-1"] == row["Δ top-5"] == "—"
    # The paper gives no params or FLOPs for Inception-ResNet-v2: shown as a dash, never filled in.
    assert rows["Inception-ResNet-v2"]["params M (paper)"] == rows["Inception-ResNet-v2"]["MACs G (paper)"] == "—"


def test_provenance_and_throughput(imagenet_report):
    _, text = imagenet_report
    tables = parse_tables(text)
    prov = {r["run"]: r for r in table_with(tables, "of the paper's schedule")["rows"]}
    assert prov["ran56"]["status"] == "complete"
    assert prov["ran92_partial"]["status"] == "partial"
    assert prov["ran92_partial"]["steps done / configured"] == "100,000 / 530,000 (18.9%)"
    assert prov["ran92_partial"]["of the paper's schedule"].startswith("18.9% of 135,680,000 images")
    assert prov["ran92_partial"]["world size x device"] == "4 x NVIDIA H100"
    assert (prov["ran56"]["precision"], prov["ran56"]["GPU-hours"], prov["ran56"]["wall time"]) == \
        ("bf16", "160.00", "20h00m")
    assert prov["ran92_partial"]["evaluated (size: images)"] == "224: 50,000; 320: 50,000"
    speed = table_with(tables, "train images/s")["rows"]
    assert [r["run"] for r in speed] == ["ran56"]  # only the run that recorded throughput
    assert (speed[0]["train images/s"], speed[0]["train images/s per device"], speed[0]["inference images/s"]) == \
        ("2,400.0", "300.0", "7,300.0")
    # Each figure column is defined where it is shown (what the trainer's field measures).
    section = text[text.index("## Throughput"):text.index("## Training curves")]
    for column in ("train images/s", "train images/s per device", "inference images/s"):
        assert f"\n- {column}: " in section, f"no definition of {column!r}"
    assert "the evaluation pass only" in section and "summed over all segments" in section


def test_plots_are_linked_and_exist(imagenet_report):
    out, text = imagenet_report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == ["imagenet_table7.png", "imagenet_training.png"]
    for link in links:
        png = out.parent / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    assert "Other runs" not in text and "Table 1" not in text  # no CIFAR or unmatched runs given


def test_demo_run_goes_to_other_runs(tmp_path):
    run = make_run(tmp_path, "demo", model="cifar_resnet164", dataset="demo", num_classes=10, params=1_700_000,
                   macs=250_000_000, macs_input_size=64, train_size=64, steps=300, total_steps=300,
                   images_seen=300 * 64, epochs=12.0, global_batch_size=64, world_size=2, device_type="cpu",
                   device_name="cpu", precision="fp32", wall_time_s=125.0, gpu_hours=0.0,
                   evaluations=[(64, 31.25, 3.5)], metrics=training_log(300, 64))
    out = report.write_report([run], tmp_path / "reports" / "demo.md")
    text = out.read_text()
    assert "Runs: 0 compared with a Table 7 row, 0 with a CIFAR table row, 1 match no paper row" in text
    tables = parse_tables(text)
    other = table_with(tables, "why not in a paper table")["rows"]
    assert len(other) == 1
    assert (other[0]["run"], other[0]["data set"], other[0]["test size"], other[0]["top-1 err %"],
            other[0]["top-5 err %"], other[0]["status"]) == ("demo", "demo", "64", "31.25", "3.50", "complete")
    assert other[0]["why not in a paper table"] == "trained on demo, not a data set of the paper's tables"
    assert other[0]["chance top-1 err %"] == "90.00"  # 10 classes
    table7 = {r["Network"]: r for r in table_with(tables, "top-1 err % (paper)")["rows"]}
    assert all(r["run"] == "not run" for r in table7.values())
    prov = table_with(tables, "of the paper's schedule")["rows"][0]
    assert (prov["of the paper's schedule"], prov["GPU-hours"], prov["wall time"]) == ("—", "0 (cpu)", "2m05s")
    assert (out.parent / "demo_training.png").is_file()


def test_table7_model_on_other_data_is_not_compared_with_the_paper(tmp_path):
    run = make_run(tmp_path, "a56demo", dataset="demo", num_classes=10, evaluations=[(224, 40.0, 10.0)])
    tables = parse_tables(report.write_report([run], tmp_path / "r.md").read_text())
    rows = {r["Network"]: r for r in table_with(tables, "top-1 err % (paper)")["rows"]}
    assert rows["Attention-56"]["top-1 err % (measured)"] == "not run"
    other = table_with(tables, "why not in a paper table")["rows"]
    assert other[0]["why not in a paper table"] == "trained on demo, not a data set of the paper's tables"
    # An ImageNet subset is not ImageNet-1K, whatever the data set is called.
    subset = make_run(tmp_path, "a56subset", num_classes=100, evaluations=[(224, 30.0, 10.0)])
    tables = parse_tables(report.write_report([subset], tmp_path / "r.md").read_text())
    rows = {r["Network"]: r for r in table_with(tables, "top-1 err % (paper)")["rows"]}
    assert rows["Attention-56"]["run"] == "not run"
    other = table_with(tables, "why not in a paper table")["rows"]
    assert other[0]["why not in a paper table"] == \
        "trained on imagenet (100 classes), not a data set of the paper's tables"


def test_run_not_evaluated_at_the_rows_test_size(tmp_path):
    run = make_run(tmp_path, "ran92", model="attention92", evaluations=[(224, 21.0, 5.5)])
    tables = parse_tables(report.write_report([run], tmp_path / "r.md").read_text())
    row = {r["Network"]: r for r in table_with(tables, "top-1 err % (paper)")["rows"]}["Attention-92"]
    assert row["top-1 err % (measured)"] == "not evaluated at 320"
    assert row["Δ top-1"] == "—"


def test_cifar_runs_fill_their_ablation_rows(tmp_path):
    cifar = dict(dataset="cifar10", num_classes=10, macs_input_size=32, train_size=32, steps=160_000,
                 total_steps=160_000, images_seen=160_000 * 64, global_batch_size=64, world_size=1,
                 augmentation="cifar", num_samples=10_000)
    runs = [
        make_run(tmp_path, "spatial", model="cifar_attention56", params=850_000, macs=10**8,
                 config={"model": {"name": "cifar_attention56", "options": {"attention": "spatial"}}},
                 evaluations=[(32, 6.5, 0.3)], **cifar),
        make_run(tmp_path, "nal92", model="cifar_attention92", params=1_950_000, macs=2 * 10**8,
                 config={"model": {"name": "cifar_attention92", "options": {"residual_attention": False}}},
                 evaluations=[(32, 5.0, 0.2)], **cifar),
        make_run(tmp_path, "noisy92", model="cifar_attention92", params=1_950_000, macs=2 * 10**8,
                 label_noise=0.3, config={"model": {"name": "cifar_attention92"}, "data": {"label_noise": 0.3}},
                 evaluations=[(32, 6.0, 0.4)], **cifar),
        make_run(tmp_path, "arl92", model="cifar_attention92", params=1_950_000, macs=2 * 10**8,
                 evaluations=[(32, 5.2, 0.2)], **cifar),
        make_run(tmp_path, "localconv", model="cifar_attention56", params=850_000, macs=10**8,
                 config={"model": {"name": "cifar_attention56", "options": {"mask": "local_conv"}}},
                 evaluations=[(32, 7.0, 0.5)], **cifar),
        make_run(tmp_path, "p2", model="cifar_attention92", params=2_500_000, macs=3 * 10**8,
                 config={"model": {"name": "cifar_attention92", "options": {"p": 2}}},
                 evaluations=[(32, 4.9, 0.2)], **cifar),
    ]
    tables = parse_tables(report.write_report(runs, tmp_path / "cifar.md").read_text())

    t1 = table_with(tables, "attention")["rows"]
    by_type = {r["attention"]: r for r in t1}
    assert (by_type["spatial"]["top-1 err % (paper)"], by_type["spatial"]["top-1 err % (measured)"],
            by_type["spatial"]["Δ top-1"], by_type["spatial"]["run"]) == ("6.33", "6.50", "+0.17", "spatial")
    assert by_type["mixed"]["top-1 err % (measured)"] == by_type["channel"]["top-1 err % (measured)"] == "not run"

    t3 = {(r["network"], r["learning"]): r for r in table_with(tables, "learning")["rows"]}
    assert len(t3) == 8
    assert (t3["Attention-92", "NAL"]["top-1 err % (paper)"], t3["Attention-92", "NAL"]["top-1 err % (measured)"],
            t3["Attention-92", "NAL"]["Δ top-1"]) == ("5.35", "5.00", "-0.35")
    assert (t3["Attention-92", "ARL"]["top-1 err % (measured)"], t3["Attention-92", "ARL"]["run"]) == ("5.20", "arl92")
    assert t3["Attention-164", "NAL"]["top-1 err % (measured)"] == "not run"

    t5 = {(r["label noise"], r["network"]): r for r in table_with(tables, "label noise")["rows"]}
    assert (t5["30%", "Attention-92"]["top-1 err % (paper)"], t5["30%", "Attention-92"]["top-1 err % (measured)"],
            t5["30%", "Attention-92"]["Δ top-1"], t5["30%", "Attention-92"]["run"]) == \
        ("5.79", "6.00", "+0.21", "noisy92")
    assert t5["30%", "ResNet-164"]["top-1 err % (measured)"] == "not run"

    t6 = {(r["network"], r["data set"]): r for r in table_with(tables, "network", "data set")["rows"]}
    row = t6["Attention-92", "CIFAR-10"]
    assert (row["params M (paper)"], row["params M (measured)"], row["Δ params M"], row["top-1 err % (paper)"],
            row["top-1 err % (measured)"], row["run"]) == ("1.9", "1.95", "+0.05", "4.99", "5.20", "arl92")
    assert t6["Attention-92", "CIFAR-100"]["top-1 err % (measured)"] == "not run"
    assert t6["WRN-28-10", "CIFAR-10"]["run"] == "not run"

    other = table_with(tables, "why not in a paper table")["rows"]
    assert [(r["run"], r["options"]) for r in other] == [("localconv", "local_conv mask"), ("p2", "p=2")]
    assert other[0]["why not in a paper table"] == "model, options or label noise match no CIFAR table row"


def test_cifar_tables_take_only_the_papers_cifar_recipe(tmp_path):
    """A CIFAR run trained with the ImageNet transforms is not the paper's recipe (4-pixel padding,
    random crop, flip): it goes to other runs with that reason, also when results.json predates
    the augmentation field. An evaluation on part of the 10,000 test images is flagged."""
    cifar = dict(model="cifar_attention92", dataset="cifar10", num_classes=10, params=1_950_000, macs=2 * 10**8,
                 macs_input_size=32, train_size=32, steps=160_000, total_steps=160_000, images_seen=160_000 * 64,
                 global_batch_size=64, world_size=1)
    recipe = make_run(tmp_path, "recipe", augmentation="cifar", evaluations=[(32, 5.1, 0.2)], num_samples=5_000,
                      **cifar)
    imagenet_aug = make_run(tmp_path, "imagenet_aug", augmentation="imagenet", evaluations=[(32, 6.0, 0.3)],
                            num_samples=10_000, **cifar)
    old = make_run(tmp_path, "old", augmentation="imagenet", evaluations=[(32, 6.2, 0.3)], num_samples=10_000, **cifar)
    data = json.loads((old / "results.json").read_text())
    del data["augmentation"]  # written before the field existed: the ImageNet transforms
    (old / "results.json").write_text(json.dumps(data))

    tables = parse_tables(report.write_report([recipe, imagenet_aug, old], tmp_path / "r.md").read_text())
    t6 = {(r["network"], r["data set"]): r for r in table_with(tables, "network", "data set")["rows"]}
    assert t6["Attention-92", "CIFAR-10"]["run"] == "recipe"
    assert t6["Attention-92", "CIFAR-10"]["top-1 err % (measured)"] == "5.10 (5,000 of 10,000 images)"
    t3 = {(r["network"], r["learning"]): r for r in table_with(tables, "learning")["rows"]}
    assert t3["Attention-92", "ARL"]["run"] == "recipe"
    other = {r["run"]: r for r in table_with(tables, "why not in a paper table")["rows"]}
    assert sorted(other) == ["imagenet_aug", "old"]
    for row in other.values():
        assert row["why not in a paper table"] == (
            "trained with the imagenet augmentation (data.augmentation: imagenet), not the paper's CIFAR "
            "recipe (4-pixel padding, random 32x32 crop, horizontal flip; data.augmentation: cifar)")
    prov = {r["run"]: r for r in table_with(tables, "of the paper's schedule")["rows"]}
    assert prov["recipe"]["evaluated (size: images)"] == "32: 5,000 (not the full 10,000-image test set)"
    assert prov["imagenet_aug"]["evaluated (size: images)"] == "32: 10,000"
    assert prov["recipe"]["data set"] == "cifar10 (10 classes), cifar augmentation"


def test_missing_results_json_names_the_file(tmp_path, capsys):
    run = make_run(tmp_path, "r", evaluations=[(224, 22.0, 6.0)])
    (run / "results.json").unlink()
    with pytest.raises(ResultsError, match=re.escape(str(run / "results.json"))):
        report.write_report([run], tmp_path / "r.md")
    assert cli_main(["report", str(run), "-o", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert str(run / "results.json") in err and "no results.json" in err
    assert not (tmp_path / "r.md").exists()


def test_malformed_results_json_names_the_file(tmp_path, capsys):
    good = make_run(tmp_path, "good", evaluations=[(224, 22.0, 6.0)])
    bad = make_run(tmp_path, "bad", evaluations=[(224, 22.0, 6.0)])
    (bad / "results.json").write_text('{"model": "attention56", "params": ')
    assert cli_main(["report", str(good), str(bad), "-o", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert f"{bad / 'results.json'}: not valid JSON" in err
    data = json.loads((good / "results.json").read_text())
    data["params"] = "31.8M"
    (bad / "results.json").write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=re.escape(f"{bad / 'results.json'}: params must be int")):
        report.write_report([bad], tmp_path / "r.md")


def test_config_and_metrics_errors_name_the_file(tmp_path):
    run = make_run(tmp_path, "r", evaluations=[(224, 22.0, 6.0)], metrics=training_log(20, 224))
    (run / "config.yaml").unlink()
    with pytest.raises(report.ReportError, match=re.escape(f"{run / 'config.yaml'}: not found")):
        report.load_run(run)
    soft = {"model": {"name": "attention56", "options": {"attention": "soft"}}}
    (run / "config.yaml").write_text(yaml.safe_dump(soft))
    with pytest.raises(report.ReportError, match=r"model.options.attention is 'soft'; valid values: \['mixed'"):
        report.load_run(run)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "attention92"}}))
    with pytest.raises(report.ReportError, match="model.name is 'attention92' but results.json says 'attention56'"):
        report.load_run(run)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "attention56"}}))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    # A truncated last line (a run killed mid-write) is ignored; a broken line inside is an error.
    (run / "metrics.jsonl").write_text("\n".join(lines + ['{"kind": "train", "st']))
    assert len(report.load_run(run).train_metrics) == 2
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]))
    with pytest.raises(MetricsError, match=re.escape(f"{run / 'metrics.jsonl'}:2: not valid JSON")):
        report.load_run(run)


def test_cli_writes_the_report(tmp_path):
    from ran_bench.cli import main

    run = make_run(tmp_path, "ran56", evaluations=[(224, 22.5, 6.4)])
    out = tmp_path / "rep" / "imagenet.md"
    assert main(["report", str(run), "-o", str(out)]) == 0
    assert (tmp_path / "rep" / "imagenet_table7.png").is_file()
    assert "| Attention-56 | 224 | 31.9 | 31.81 | -0.09 |" in out.read_text()


def test_two_runs_of_one_network_get_one_row_each(tmp_path):
    runs = [make_run(tmp_path / "a", "seed0", evaluations=[(224, 22.0, 6.0)]),
            make_run(tmp_path / "b", "seed0", evaluations=[(224, 21.5, 5.8)])]
    tables = parse_tables(report.write_report(runs, tmp_path / "r.md").read_text())
    rows = [r for r in table_with(tables, "top-1 err % (paper)")["rows"] if r["Network"] == "Attention-56"]
    # Same directory name: the labels take the parent folder to stay distinct.
    assert [(r["run"], r["top-1 err % (measured)"], r["Δ top-1"]) for r in rows] == \
        [("a/seed0", "22.00", "+0.24"), ("b/seed0", "21.50", "-0.26")]


@pytest.mark.slow
def test_report_of_a_real_trainer_run(tmp_path):
    """The trainer's own run directory (results.json, config.yaml, metrics.jsonl) reports as a
    partial run on other data: the contract between `ran-bench train` and `ran-bench report`."""
    import os
    import subprocess
    import sys

    from ran_bench.data.demo import make_demo

    repo = Path(__file__).resolve().parent.parent
    make_demo(tmp_path / "data", num_classes=4, train_per_class=4, val_per_class=2, min_side=36, max_side=40)
    (tmp_path / "c.yaml").write_text(f"""
model: {{name: test_tiny_net, options: {{norm: group}}}}
data: {{name: tiny, root: {tmp_path / 'data'}, backend: torchvision, num_threads: 0, train_size: 32, test_sizes: [32]}}
optim: {{global_batch_size: 4, per_device_batch_size: 4}}
schedule: {{reference_batch_size: 4, total_steps: 4, milestones: [3], max_steps: 3}}
eval: {{every_steps: 2, batch_size: 4}}
log: {{every_steps: 1}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(repo / "tests")}
    proc = subprocess.run([sys.executable, str(repo / "tests" / "tiny_model.py"), "train", "--config",
                           str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, cwd=repo, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = report.load_run(tmp_path / "run")
    assert [m["step"] for m in run.train_metrics] == [1, 2, 3] and [m["step"] for m in run.eval_metrics] == [2, 3]
    assert run.non_default_options() == {"norm": "group"}

    out = report.write_report([tmp_path / "run"], tmp_path / "reports" / "demo.md")
    tables = parse_tables(out.read_text())
    other = table_with(tables, "why not in a paper table")["rows"]
    evaluation = run.results.evaluation(32)
    assert [(r["run"], r["model"], r["options"], r["test size"], r["top-1 err %"], r["chance top-1 err %"],
             r["status"]) for r in other] == \
        [("run", "test_tiny_net", "norm=group", "32", f"{evaluation.top1_err:.2f}", "75.00", "partial")]
    prov = table_with(tables, "of the paper's schedule")["rows"][0]
    # 3 of 4 steps (schedule.max_steps stopped it), 8 validation images (4 classes x 2).
    assert (prov["status"], prov["steps done / configured"], prov["evaluated (size: images)"]) == \
        ("partial", "3 / 4 (75%)", "32: 8")
    assert (out.parent / "demo_training.png").read_bytes()[:4] == b"\x89PNG"
