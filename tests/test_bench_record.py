"""The record of a benchmark (`ran_bench.bench.record`), results.csv, and the README generated
from it (`ran_bench.bench.readme`, the `readme` mode of `ran_bench.bench.command`)."""

from __future__ import annotations

import csv
import re

import pytest

from ran_bench.bench import readme as bench_readme
from ran_bench.bench import record as bench_record
from ran_bench.bench.command import save
from ran_bench.bench.flops import FLOP_CONVENTION
from ran_bench.cli import main as cli_main

# ---------------------------------------------------------------------------------------------
# results.csv and the generated README


def _record(**changes) -> bench_record.BenchRecord:
    base = dict(mode="train", model="attention56", size=224, batch_size=8, world_size=1, precision="fp32",
                channels_last=False, compile=False, backend="synthetic", steps=2, warmup=1, repeats=2,
                step_time_s=[0.5, 0.6], step_time_median_s=0.55, images_per_s=14.5, images_per_s_min=13.3,
                images_per_s_max=16.0, images_per_s_total=14.5, peak_memory_mib=2048.0,
                peak_memory_kind="cpu_process_peak_rss", params=31_810_728, macs=6_271_000_000,
                flops_per_image=37_626_000_000, tflops=0.55, peak_tflops=None, peak_source="none", mfu=None,
                flop_convention=FLOP_CONVENTION, device_type="cpu", device_name="Test CPU (2 cores)",
                torch_version="2.14.1", command="ran-bench bench train --model attention56 --batch-size 8")
    base.update(changes)
    return bench_record.BenchRecord(**base)


def test_csv_rows_and_generated_readme(tmp_path):
    train = _record()
    scaling = _record(mode="scaling", model="cifar_attention56", size=32, world_size=2, images_per_s_total=29.0,
                      scaling_efficiency=0.9, device_name="Other CPU",
                      command="ran-bench bench scaling --model cifar_attention56 --procs 1,2")
    save([train], tmp_path)
    save([scaling], tmp_path)

    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == ["train", "scaling"]
    assert rows[0]["command"] == train.command and rows[0]["step_time_s"] == "0.5 0.6"
    assert rows[1]["scaling_efficiency"] == "0.9" and rows[1]["mfu"] == ""

    readme = (tmp_path / "README.md").read_text()
    train_part = readme[readme.index("## Training step"):readme.index("## Scaling")]
    scaling_part = readme[readme.index("## Scaling"):]
    assert "| attention56 | 224 | 8 | fp32 |" in train_part
    assert "Test CPU (2 cores)" in train_part and "torch 2.14.1" in train_part and f"`{train.command}`" in train_part
    assert "| cifar_attention56 | 32 | 8 | fp32 | 2 | 29.0 |" in scaling_part and "90%" in scaling_part
    assert f"`{scaling.command}`" in scaling_part and "Other CPU" in scaling_part


def test_readme_mode_adds_rows_of_another_csv(tmp_path):
    gpu = tmp_path / "gpu"
    save([_record(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", cuda_version="13.0",
                        peak_memory_kind="cuda_max_memory_allocated")], gpu)
    save([_record()], tmp_path)
    assert cli_main(["bench", "readme", "--out-dir", str(tmp_path), "--add", str(gpu / "results.csv")]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in readme and "torch 2.14.1, CUDA 13.0" in readme and "GPU alloc" in readme
    assert len(bench_record.read_csv(tmp_path / "results.csv")) == 2


def test_csv_of_another_program_is_refused_with_its_name(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("mode,model,speed\ntrain,x,1\n")
    with pytest.raises(ValueError, match=r"results.csv is not a ran-bench results.csv \(unknown columns \['speed'\]\)"):
        bench_record.append_csv([_record()], path)


def test_rows_of_an_older_csv_are_kept_when_columns_are_added(tmp_path):
    path = tmp_path / "results.csv"
    old_columns = [c for c in bench_record.CSV_FIELDS if c != "load_average_1min"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow({c: "" for c in old_columns} | {"mode": "infer", "model": "old_row", "command": "old"})
    bench_record.append_csv([_record(load_average_1min=1.5)], path)
    rows = bench_record.read_csv(path)
    assert [(r["model"], r["load_average_1min"]) for r in rows] == [("old_row", ""), ("attention56", "1.5")]
    assert path.read_text().splitlines()[0] == ",".join(bench_record.CSV_FIELDS)


def test_adding_the_same_csv_twice_keeps_one_copy_of_its_rows(tmp_path):
    gpu = tmp_path / "gpu"
    save([_record(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", time_utc="2026-11-25T16:31:49Z")], gpu)
    save([_record(time_utc="2026-11-25T17:00:00Z")], tmp_path)
    for _ in range(2):
        assert cli_main(["bench", "readme", "--out-dir", str(tmp_path), "--add", str(gpu / "results.csv")]) == 0
    rows = bench_record.read_csv(tmp_path / "results.csv")
    assert [(r["device_name"], r["time_utc"]) for r in rows] == [
        ("Test CPU (2 cores)", "2026-11-25T17:00:00Z"), ("NVIDIA H100 80GB HBM3", "2026-11-25T16:31:49Z")]


def test_readme_states_provenance_from_the_rows_only(tmp_path):
    """Commit per row (short, "-dirty" kept, "not recorded" where the copy had no git), the images a
    loader row read or that they were not recorded, and no claim about the machine beyond the row."""
    rows = [_record(git_commit="0123456789abcdef0123-dirty"),
            _record(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", git_commit=""),
            _record(mode="data", model="", backend="torchvision", data_root="/tmp/j", num_threads=8, steps=5, warmup=5,
                    repeats=3, command="ran-bench bench data --backend torchvision --data-root /tmp/j --repeats 3"),
            _record(mode="data", model="", backend="dali", data_root="generated (400 JPEGs, 56 kB mean)",
                    num_threads=2, steps=20, warmup=5, repeats=3,
                    command="ran-bench bench data --backend dali --steps 20 --warmup 5 --repeats 3")]
    readme = bench_readme.render_readme([bench_record.csv_row(r) for r in rows])
    train = {row["device"]: row for row in _markdown_rows(readme, "## Training step")}
    assert train["Test CPU (2 cores)"]["commit"] == "0123456789-dirty"
    assert train["NVIDIA H100 80GB HBM3"]["commit"] == "not recorded"
    data = _markdown_rows(readme, "## Input pipeline alone")
    assert [(r["images"], r["timed"]) for r in data] == [
        ("/tmp/j (images not recorded)", "3 epochs of 5 batches, after 1 epoch"),  # the earlier whole-epoch harness
        ("generated (400 JPEGs, 56 kB mean)", "3 x 20 batches, after 5")]
    assert "shared 2-core" not in readme and "other work slowed them" not in readme


def _markdown_rows(markdown: str, section: str) -> list[dict[str, str]]:
    """The rows of the first table after `section`, as {header: cell}."""
    lines = markdown[markdown.index(section):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[start:end]]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def test_git_commit_falls_back_to_the_environment_without_git(tmp_path, monkeypatch):
    from ran_bench import fileio

    monkeypatch.setattr(fileio, "REPO", tmp_path)  # a copy of the checkout without .git
    monkeypatch.delenv("RAN_BENCH_GIT_COMMIT", raising=False)
    assert fileio.git_commit() == "unknown"
    monkeypatch.setenv("RAN_BENCH_GIT_COMMIT", "17df357aa-dirty")
    assert fileio.git_commit() == "17df357aa-dirty"
