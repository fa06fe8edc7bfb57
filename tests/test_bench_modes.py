"""The measuring modes of the benchmark harness (`ran-bench bench train|infer|data|scaling`,
`ran_bench.bench.modes`): what their figures mean, not how fast this machine is."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from ran_bench.bench import modes, steps
from ran_bench.bench.record import read_csv
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
    "roofline_images_per_s": OPTIONAL_NUMBER, "roofline_fraction": OPTIONAL_NUMBER, "roofline_source": OPTIONAL_STR,
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
    # a CPU has no data-sheet roofline: blank, with the reason
    assert record["roofline_images_per_s"] is None and record["roofline_fraction"] is None
    assert record["roofline_source"] == "no data-sheet roofline for CPUs"


def test_bench_cli_names_the_missing_flag(capsys):
    assert cli_main(["bench", "train", "--batch-size", "2"]) == 2
    assert "needs --model NAME" in capsys.readouterr().err
    assert cli_main(["bench", "infer", "--model", "no_such_model"]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


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


# ---------------------------------------------------------------------------------------------
# The overhead ratio compares the same work


def test_trainer_step_and_bare_loop_do_the_same_work():
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = _tiny_conv()
    initial = copy.deepcopy(model.state_dict())
    batches = steps.make_batches(3, batch_size=4, size=8, num_classes=10, device=torch.device("cpu"),
                                 channels_last=False)
    arms = steps.overhead_arms(Accelerator(cpu=True), model, batches, precision="fp32", compile=False)
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
    monkeypatch.setattr(modes, "build_loader", lambda *a, **k: loaders.append(CountingLoader(build(*a, **k)))
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
    rows = read_csv(tmp_path / "results.csv")
    assert [(r["mode"], r["world_size"]) for r in rows] == [("scaling", "1"), ("scaling", "2")]
    assert rows[0]["command"] == ("OMP_NUM_THREADS=1 ran-bench bench scaling --model cifar_attention56 "
                                  "--batch-size 2 --size 32 --precision fp32 --steps 2 --warmup 1 --repeats 1 "
                                  "--procs 1,2")


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
                               f"for '{name}', not the benchmarked torch.nn.modules.container.Sequential "
                               "(330 parameters)")
