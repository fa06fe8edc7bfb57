"""The benchmark harness (`ran-bench bench`): what its figures mean, not how fast this machine is."""

from __future__ import annotations

import copy
import csv
import json
import re

import pytest
import torch
import torch.nn as nn

from ran_bench import bench
from ran_bench.cli import main as cli_main
from ran_bench.models import _registry

# ---------------------------------------------------------------------------------------------
# A tiny registered model whose multiply-adds are known from its shapes.

TINY = "bench_tiny_linear"
TINY_SIZE = 4
# One Linear layer over a flattened 3 x 4 x 4 image to 10 classes: 48 x 10 multiply-adds.
TINY_MACS = 3 * TINY_SIZE * TINY_SIZE * 10


def _tiny_linear(num_classes: int = 10, **kwargs) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * TINY_SIZE * TINY_SIZE, num_classes))


def _tiny_conv(num_classes: int = 10, **kwargs) -> nn.Module:
    """Convolution, BatchNorm (running statistics) and a classifier: what the real models have."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


@pytest.fixture(scope="module")
def tiny_model():
    """Register the tiny model with ran_bench's and timm's registries for this module only."""
    from timm.models import _registry as timm_registry

    mp = pytest.MonkeyPatch()
    mp.setitem(_registry._MODELS, TINY, _registry.ModelInfo(TINY, _tiny_linear, TINY_SIZE, "cifar", 10))

    def timm_entrypoint(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return _tiny_linear(**kwargs)

    mp.setitem(timm_registry._model_entrypoints, TINY, timm_entrypoint)
    yield TINY
    mp.undo()


@pytest.fixture(scope="module")
def train_run(tiny_model, tmp_path_factory):
    """One `ran-bench bench train --overhead` run of the tiny model with a given peak."""
    out = tmp_path_factory.mktemp("bench")
    rc = cli_main(["bench", "train", "--model", tiny_model, "--batch-size", "4", "--steps", "3", "--warmup", "1",
                   "--repeats", "2", "--peak-tflops", "0.001", "--overhead", "--out-dir", str(out)])
    assert rc == 0
    (path,) = out.glob("*.json")
    return out, json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# JSON schema

# The keys of a record and their JSON types; a renamed or dropped key breaks the readers
# (README generation, `ran-bench report`, users' scripts).
NUMBER = (int, float)
OPTIONAL_NUMBER = (int, float, type(None))
OPTIONAL_STR = (str, type(None))
SCHEMA = {
    "mode": str, "model": str, "size": int, "batch_size": int, "world_size": int, "precision": str,
    "channels_last": bool, "compile": bool, "backend": str, "steps": int, "warmup": int, "repeats": int,
    "step_time_s": list, "step_time_median_s": float, "images_per_s": float, "images_per_s_min": float,
    "images_per_s_max": float, "images_per_s_total": float, "peak_memory_mib": NUMBER, "peak_memory_kind": str,
    "params": int, "macs": int, "flops_per_image": int, "tflops": float, "peak_tflops": OPTIONAL_NUMBER,
    "peak_source": str, "mfu": OPTIONAL_NUMBER, "flop_convention": str,
    "data_root": OPTIONAL_STR, "end_to_end_backend": OPTIONAL_STR, "end_to_end_images_per_s": OPTIONAL_NUMBER,
    "end_to_end_fraction": OPTIONAL_NUMBER, "limiter": OPTIONAL_STR,
    "overhead_trainer_images_per_s": OPTIONAL_NUMBER, "bare_images_per_s": OPTIONAL_NUMBER,
    "trainer_over_bare": OPTIONAL_NUMBER, "timm_images_per_s": OPTIONAL_NUMBER,
    "trainer_over_timm": OPTIONAL_NUMBER, "timm_model": OPTIONAL_STR, "scaling_efficiency": OPTIONAL_NUMBER,
    "num_threads": (int, type(None)),
    "device_type": str, "device_name": str, "torch_version": str, "cuda_version": str, "cudnn_version": str,
    "dali_version": str, "timm_version": str, "accelerate_version": str, "python_version": str,
    "load_average_1min": OPTIONAL_NUMBER, "git_commit": str, "time_utc": str, "command": str, "schema_version": int,
}


def test_train_json_has_the_schema_keys_and_types(train_run):
    _, record = train_run
    assert set(record) == set(SCHEMA)
    wrong = {k: type(v).__name__ for k, v in record.items() if not isinstance(v, SCHEMA[k])}
    assert not wrong, f"keys with the wrong JSON type: {wrong}"
    assert record["mode"] == "train" and record["model"] == TINY and record["size"] == TINY_SIZE
    assert len(record["step_time_s"]) == 2  # one per repeat
    assert record["peak_memory_kind"] == "cpu_process_peak_rss" and record["peak_memory_mib"] > 0
    assert record["torch_version"] == torch.__version__
    assert record["command"].endswith(f"ran-bench bench train --model {TINY} --batch-size 4 --size {TINY_SIZE} "
                                      "--precision fp32 --steps 3 --warmup 1 --repeats 2 --peak-tflops 0.001 "
                                      "--overhead")
    # the overhead check ran all three loops, timm's on our model through timm's registry
    assert record["trainer_over_bare"] > 0 and record["trainer_over_timm"] > 0
    assert record["timm_model"] == "torch.nn.modules.container.Sequential"


def test_bench_cli_names_the_missing_flag(capsys):
    assert cli_main(["bench", "train", "--batch-size", "2"]) == 2
    assert "needs --model NAME" in capsys.readouterr().err
    assert cli_main(["bench", "infer", "--model", "no_such_model"]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Timed regions synchronise the device


def test_timed_region_is_bracketed_by_device_synchronisation(monkeypatch):
    events: list[str] = []
    clock = iter(range(100))
    monkeypatch.setattr(bench, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(bench, "_clock", lambda: events.append("clock") or float(next(clock)))

    times = bench.time_steps(lambda: events.append("step"), device=torch.device("cuda"), steps=3, warmup=2,
                             repeats=2)

    region = ["sync", "clock", "step", "step", "step", "sync", "clock"]
    assert events == ["step", "step"] + region + region
    assert times == [1 / 3, 1 / 3]  # each region: one clock tick over 3 steps


def test_synchronize_waits_for_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    bench.synchronize(torch.device("cpu"))
    assert calls == []
    bench.synchronize(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]


# ---------------------------------------------------------------------------------------------
# MFU from the counted multiply-adds


def test_mfu_comes_from_the_models_counted_multiply_adds(train_run):
    _, r = train_run
    assert r["macs"] == TINY_MACS
    assert r["flops_per_image"] == 3 * 2 * TINY_MACS  # training step = 3 x forward, FLOP = 2 x MAC
    assert r["tflops"] == pytest.approx(3 * 2 * TINY_MACS * r["images_per_s"] / 1e12)
    assert r["peak_tflops"] == 0.001 and r["peak_source"] == "given with --peak-tflops"
    assert r["mfu"] == pytest.approx(r["tflops"] / 0.001)


def test_inference_counts_one_forward(tiny_model, tmp_path):
    assert cli_main(["bench", "infer", "--model", tiny_model, "--batch-size", "2", "--steps", "2", "--warmup", "0",
                     "--repeats", "1", "--peak-tflops", "2", "--out-dir", str(tmp_path), "--no-record"]) == 0
    (path,) = tmp_path.glob("infer_*.json")
    r = json.loads(path.read_text())
    assert r["flops_per_image"] == 2 * TINY_MACS
    assert r["mfu"] == pytest.approx(2 * TINY_MACS * r["images_per_s"] / 1e12 / 2)
    assert not (tmp_path / "results.csv").exists()  # --no-record


def test_peak_is_looked_up_by_gpu_name_for_bf16_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert bench.resolve_peak(cuda, "bf16", None)[0] == 989.4
    assert bench.resolve_peak(cuda, "fp32", None)[0] is None  # the table holds bf16/fp16 peaks only
    # Names match on whole tokens, never as substrings of another product's name.
    for name, peak in [("NVIDIA A10", 125.0),  # not A100's
                       ("NVIDIA L40", 181.05), ("NVIDIA L40S", 362.05), ("NVIDIA L4", 121.0),  # not L4's
                       ("NVIDIA GH200 480GB", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert bench.resolve_peak(cuda, "bf16", None)[0] == peak, name
    # Unknown variants get no peak (and say so) rather than the peak of a name they contain.
    for name in ("NVIDIA A10G", "NVIDIA H800", "NVIDIA H20", "NVIDIA GeForce RTX 4090"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        peak, source = bench.resolve_peak(cuda, "bf16", None)
        assert peak is None and source.startswith(f"{name} is not in the peak table") and "--peak-tflops" in source
    assert bench.resolve_peak(torch.device("cpu"), "fp32", None)[0] is None
    assert bench.resolve_peak(torch.device("cpu"), "fp32", 1.5) == (1.5, "given with --peak-tflops")


# ---------------------------------------------------------------------------------------------
# The overhead ratio compares the same work


def test_trainer_step_and_bare_loop_do_the_same_work():
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = _tiny_conv()
    initial = copy.deepcopy(model.state_dict())
    batches = bench.make_batches(3, batch_size=4, size=8, num_classes=10, device=torch.device("cpu"),
                                 channels_last=False)
    arms = bench.overhead_arms(Accelerator(cpu=True), model, batches, precision="fp32", compile=False)
    for _ in range(5):  # more steps than batches: both cycle through the same batches in order
        arms.trainer_step()
        arms.bare_step()

    trained = arms.trainer_model.state_dict()
    assert not torch.equal(trained["0.weight"], initial["0.weight"])  # the steps did train
    for key, value in arms.bare_model.state_dict().items():
        assert torch.equal(value, trained[key]), f"{key} differs between the trainer's step and the bare loop"
    assert torch.equal(model.state_dict()["0.weight"], initial["0.weight"])  # the model given is copied, untouched


# ---------------------------------------------------------------------------------------------
# "Is my data loader the bottleneck?"


def test_end_to_end_rate_with_a_real_loader_names_the_limit(tiny_model, tmp_path):
    from ran_bench.data.demo import make_demo

    make_demo(tmp_path / "data", train_per_class=2, val_per_class=1, num_classes=4, min_side=16, max_side=24)
    out = tmp_path / "out"
    assert cli_main(["bench", "train", "--model", tiny_model, "--batch-size", "4", "--steps", "3", "--warmup", "1",
                     "--repeats", "1", "--data-root", str(tmp_path / "data"), "--backend", "torchvision",
                     "--num-threads", "0", "--out-dir", str(out), "--no-record"]) == 0
    (path,) = out.glob("*.json")
    r = json.loads(path.read_text())
    assert r["backend"] == "synthetic" and r["end_to_end_backend"] == "torchvision"
    assert r["end_to_end_fraction"] == pytest.approx(r["end_to_end_images_per_s"] / r["images_per_s"])
    # Decoding JPEGs takes far longer than one Linear layer on 4x4 images: the loader limits.
    assert r["limiter"] == "data loader"
    assert r["data_root"].startswith(f"{tmp_path / 'data'} (8 JPEGs, ")  # 4 classes x 2: what was read
    assert f"--backend torchvision --data-root {tmp_path / 'data'} --num-threads 0" in r["command"]


class CountingLoader:
    """A loader that counts the batches taken from it."""

    def __init__(self, loader):
        self.loader, self.taken = loader, 0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.taken += 1
            yield batch


def test_data_mode_times_steps_batches_not_whole_epochs(tmp_path, monkeypatch):
    """`bench data --data-root` on ImageNet must not read the data set (repeats + 1) times: it takes
    --warmup batches, then --repeats x --steps timed batches, and keeps the --steps given."""
    import ran_bench.data
    from ran_bench.data.demo import make_demo

    loaders = []
    build = ran_bench.data.build_loader
    monkeypatch.setattr(ran_bench.data, "build_loader", lambda *a, **k: loaders.append(CountingLoader(build(*a, **k)))
                        or loaders[-1])
    make_demo(tmp_path / "data", train_per_class=3, val_per_class=1, num_classes=4, min_side=16, max_side=24)
    out = tmp_path / "out"
    assert cli_main(["bench", "data", "--backend", "torchvision", "--data-root", str(tmp_path / "data"),
                     "--batch-size", "4", "--size", "8", "--num-threads", "0", "--steps", "2", "--warmup", "1",
                     "--repeats", "2", "--out-dir", str(out)]) == 0
    (path,) = out.glob("data_*.json")
    r = json.loads(path.read_text())
    assert (r["mode"], r["backend"], r["num_threads"], r["macs"]) == ("data", "torchvision", 0, None)
    assert (r["steps"], r["warmup"], r["repeats"], len(r["step_time_s"])) == (2, 1, 2, 2)
    assert [loader.taken for loader in loaders] == [1 + 2 * 2]  # 3 batches per epoch: not whole epochs
    assert r["data_root"].startswith(f"{tmp_path / 'data'} (12 JPEGs, ")
    assert r["command"].endswith(f"ran-bench bench data --backend torchvision --batch-size 4 --size 8 "
                                 f"--data-root {tmp_path / 'data'} --num-threads 0 --steps 2 --warmup 1 --repeats 2")
    readme = (out / "README.md").read_text()
    assert "## Input pipeline alone" in readme and "| 2 x 2 batches, after 1 |" in readme


def test_data_mode_dali_falls_back_to_torchvision_as_its_help_says(tmp_path, monkeypatch):
    import ran_bench.data
    from ran_bench.data.demo import make_demo

    monkeypatch.setattr(ran_bench.data, "dali_available", lambda: False)
    make_demo(tmp_path / "data", train_per_class=2, val_per_class=1, num_classes=2, min_side=16, max_side=20)
    assert cli_main(["bench", "data", "--backend", "dali", "--data-root", str(tmp_path / "data"), "--batch-size", "2",
                     "--size", "8", "--num-threads", "0", "--steps", "1", "--warmup", "0", "--repeats", "1",
                     "--out-dir", str(tmp_path / "out"), "--no-record"]) == 0
    (path,) = (tmp_path / "out").glob("data_*.json")
    assert json.loads(path.read_text())["backend"] == "torchvision"  # the loader that ran


def test_loader_verdict():
    assert bench.loader_verdict(100.0, 50.0) == (0.5, "data loader")
    assert bench.loader_verdict(100.0, 95.0) == (0.95, "model")  # within the spread of repeats


# ---------------------------------------------------------------------------------------------
# Scaling


def test_train_refuses_a_world_size_other_than_expected(tiny_model, tmp_path, capsys):
    # `accelerate launch --multi_gpu` on a CPU machine starts independent single processes.
    assert cli_main(["bench", "train", "--model", tiny_model, "--expect-world-size", "2", "--out-dir",
                     str(tmp_path)]) == 2
    assert "expected 2 processes but Accelerate sees 1" in capsys.readouterr().err


@pytest.mark.dist
@pytest.mark.slow  # two torchrun launches: ~30 s alone, minutes on a loaded 2-core machine
def test_scaling_launches_one_and_two_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli_main(["bench", "scaling", "--model", "cifar_attention56", "--size", "32", "--batch-size", "2",
                     "--steps", "2", "--warmup", "1", "--repeats", "1", "--procs", "1,2",
                     "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("scaling_*.json")
    records = json.loads(path.read_text())
    assert [r["world_size"] for r in records] == [1, 2]
    assert records[0]["scaling_efficiency"] == 1.0
    two = records[1]
    assert two["images_per_s_total"] == pytest.approx(2 * two["images_per_s"])
    assert two["scaling_efficiency"] == pytest.approx(two["images_per_s"] / records[0]["images_per_s"])
    rows = bench.read_csv(tmp_path / "results.csv")
    assert [(r["mode"], r["world_size"]) for r in rows] == [("scaling", "1"), ("scaling", "2")]
    assert rows[0]["command"] == ("OMP_NUM_THREADS=1 ran-bench bench scaling --model cifar_attention56 "
                                  "--batch-size 2 --size 32 --precision fp32 --steps 2 --warmup 1 --repeats 1 "
                                  "--procs 1,2")


# ---------------------------------------------------------------------------------------------
# results.csv and the generated README


def _record(**changes) -> bench.BenchRecord:
    base = dict(mode="train", model="attention56", size=224, batch_size=8, world_size=1, precision="fp32",
                channels_last=False, compile=False, backend="synthetic", steps=2, warmup=1, repeats=2,
                step_time_s=[0.5, 0.6], step_time_median_s=0.55, images_per_s=14.5, images_per_s_min=13.3,
                images_per_s_max=16.0, images_per_s_total=14.5, peak_memory_mib=2048.0,
                peak_memory_kind="cpu_process_peak_rss", params=31_810_728, macs=6_271_000_000,
                flops_per_image=37_626_000_000, tflops=0.55, peak_tflops=None, peak_source="none", mfu=None,
                flop_convention=bench.FLOP_CONVENTION, device_type="cpu", device_name="Test CPU (2 cores)",
                torch_version="2.14.1", command="ran-bench bench train --model attention56 --batch-size 8")
    base.update(changes)
    return bench.BenchRecord(**base)


def test_csv_rows_and_generated_readme(tmp_path):
    train = _record()
    scaling = _record(mode="scaling", model="cifar_attention56", size=32, world_size=2, images_per_s_total=29.0,
                      scaling_efficiency=0.9, device_name="Other CPU",
                      command="ran-bench bench scaling --model cifar_attention56 --procs 1,2")
    bench.save([train], tmp_path)
    bench.save([scaling], tmp_path)

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
    bench.save([_record(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", cuda_version="13.0",
                        peak_memory_kind="cuda_max_memory_allocated")], gpu)
    bench.save([_record()], tmp_path)
    assert cli_main(["bench", "readme", "--out-dir", str(tmp_path), "--add", str(gpu / "results.csv")]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in readme and "torch 2.14.1, CUDA 13.0" in readme and "GPU alloc" in readme
    assert len(bench.read_csv(tmp_path / "results.csv")) == 2


def test_csv_of_another_program_is_refused_with_its_name(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("mode,model,speed\ntrain,x,1\n")
    with pytest.raises(ValueError, match=r"results.csv is not a ran-bench results.csv \(unknown columns \['speed'\]\)"):
        bench.append_csv([_record()], path)


def test_rows_of_an_older_csv_are_kept_when_columns_are_added(tmp_path):
    path = tmp_path / "results.csv"
    old_columns = [c for c in bench.CSV_FIELDS if c != "load_average_1min"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow({c: "" for c in old_columns} | {"mode": "infer", "model": "old_row", "command": "old"})
    bench.append_csv([_record(load_average_1min=1.5)], path)
    rows = bench.read_csv(path)
    assert [(r["model"], r["load_average_1min"]) for r in rows] == [("old_row", ""), ("attention56", "1.5")]
    assert path.read_text().splitlines()[0] == ",".join(bench.CSV_FIELDS)


def test_adding_the_same_csv_twice_keeps_one_copy_of_its_rows(tmp_path):
    gpu = tmp_path / "gpu"
    bench.save([_record(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", time_utc="2026-11-25T16:31:49Z")], gpu)
    bench.save([_record(time_utc="2026-11-25T17:00:00Z")], tmp_path)
    for _ in range(2):
        assert cli_main(["bench", "readme", "--out-dir", str(tmp_path), "--add", str(gpu / "results.csv")]) == 0
    rows = bench.read_csv(tmp_path / "results.csv")
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
    readme = bench.render_readme([{k: bench._csv_value(v) for k, v in vars(r).items()} for r in rows])
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


def test_overhead_skips_timm_when_timm_builds_another_model(tmp_path, monkeypatch):
    """For names timm owns (resnet200: timm's is post-activation, ours pre-activation) the ratio
    would compare two networks: it is not run, and the record says which model timm builds."""
    from timm.models import _registry as timm_registry

    name = "bench_tiny_owned_by_timm"
    monkeypatch.setitem(_registry._MODELS, name, _registry.ModelInfo(name, _tiny_conv, TINY_SIZE, "cifar", 10))
    monkeypatch.setitem(timm_registry._model_entrypoints, name, lambda pretrained=False, **kw: _tiny_linear(
        num_classes=kw.get("num_classes", 10)))
    assert cli_main(["bench", "train", "--model", name, "--batch-size", "2", "--steps", "1", "--warmup", "0",
                     "--repeats", "1", "--overhead", "--out-dir", str(tmp_path), "--no-record"]) == 0
    (path,) = tmp_path.glob("*.json")
    r = json.loads(path.read_text())
    assert r["trainer_over_bare"] > 0
    assert r["trainer_over_timm"] is None and r["timm_images_per_s"] is None
    assert r["timm_model"] == ("not run: timm builds torch.nn.modules.container.Sequential (490 parameters) "
                               f"for '{name}', not the benchmarked torch.nn.modules.container.Sequential (330 parameters)")
