"""`ran-bench export`: a run's model as timm's / the Hub's folder (safetensors, config.json, model
card) that timm loads back with identical outputs and `ran-bench eval` evaluates."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from conftest import make_checkpoint
from ran_bench import export, weights
from ran_bench.checkpoint import save_checkpoint
from ran_bench.cli import main
from ran_bench.config import load_config, to_yaml
from ran_bench.data.demo import make_demo
from ran_bench.models import create_model
from ran_bench.results import Evaluation, run_results
from ran_bench.visualize import preprocess

FILES = ["README.md", "config.json", "model.safetensors"]


def make_data(root: Path) -> Path:
    """The demo shapes in 10 classes as 32x32 JPEGs, 2 validation images per class."""
    make_demo(root, num_classes=10, train_per_class=1, val_per_class=2, min_side=32, max_side=32)
    return root


def make_run(run: Path, data_root: Path, options: dict | None = None) -> torch.nn.Module:
    """A run directory (config.yaml, checkpoint of step 7 of 100) of a CIFAR Attention-56 on the demo
    images, with random weights, non-trivial BatchNorm statistics, and the classifier fitted to name
    every validation image's class: the right weights evaluate to 0% error, any others far worse.
    Returns the model in eval mode."""
    cfg = load_config(None, ["model.name=cifar_attention56", "data.name=demo", f"data.root={data_root}",
                             "data.train_size=32", "data.test_sizes=[32]", "data.augmentation=cifar",
                             "data.num_threads=0", "schedule.total_steps=100", "schedule.milestones=[50]"])
    cfg.model.options = dict(options or {})
    torch.manual_seed(0)
    model = create_model("cifar_attention56", num_classes=10, **cfg.model.options)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 32, 32))
        model.eval()
        images = sorted((data_root / "val").glob("*/*.JPEG"))
        classes = sorted(p.name for p in (data_root / "train").iterdir())
        features = []
        hook = model.fc.register_forward_hook(lambda _m, inputs, _out: features.append(inputs[0]))
        model(torch.cat([preprocess(p, 32, "cifar")[1] for p in images]))
        hook.remove()
        target = 10.0 * F.one_hot(torch.tensor([classes.index(p.parent.name) for p in images]), 10).float()
        model.fc.weight.copy_(torch.linalg.lstsq(features[0], target).solution.T)
        model.fc.bias.zero_()
        assert (model(torch.cat([preprocess(p, 32, "cifar")[1] for p in images])) - target).abs().max() < 1e-2
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    save_checkpoint(run / "checkpoints", make_checkpoint(7, model=model.state_dict(), num_classes=10,
                                                         config=to_yaml(cfg)), keep_last=2)
    return model


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    data_root = make_data(base / "data")
    model = make_run(base / "run", data_root)
    return SimpleNamespace(run=base / "run", data=data_root, model=model)


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)))


def test_export_loads_back_in_timm_with_the_checkpoints_outputs(fitted, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(fitted.run), str(out)]) == 0
    assert "class names: the class folders of" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == FILES
    # safetensors: an 8-byte header length, then the JSON header; no pickle anywhere
    assert (out / "model.safetensors").read_bytes()[8:9] == b"{"
    assert (out / "model.safetensors").stat().st_mode == (out / "config.json").stat().st_mode  # not 0600
    expected = _outputs(fitted.model)
    file = str(out / "model.safetensors")
    loaded = timm.create_model("cifar_attention56", pretrained=True, pretrained_cfg_overlay=dict(file=file))
    assert torch.equal(_outputs(loaded), expected)
    from_folder = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(_outputs(from_folder), expected)
    # timm reads the run's validation transform from config.json: the CIFAR recipe tests the native image
    data_config = timm.data.resolve_data_config({}, model=from_folder)
    assert tuple(data_config["input_size"]) == (3, 32, 32) and data_config["crop_pct"] == 1.0
    assert data_config["interpolation"] == "bilinear" and tuple(data_config["mean"]) == (0.485, 0.456, 0.406)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "cifar_attention56" and config["num_classes"] == 10
    assert config["label_names"] == sorted(p.name for p in (fitted.data / "train").iterdir())
    assert config["pretrained_cfg"]["classifier"] == "fc"
    assert config["ran_bench"]["step"] == 7 and "name: cifar_attention56" in config["ran_bench"]["config"]


def test_the_exports_model_args_rebuild_the_runs_ablation(fitted, tmp_path):
    # Spatial attention has the same parameters as mixed attention: only config.json's model_args
    # make timm build the model that was trained.
    run = tmp_path / "spatial"
    model = make_run(run, fitted.data, {"attention": "spatial"})
    assert main(["export", str(run / "checkpoints" / "step_00000007.pt"), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_args"] == {"attention": "spatial",
                                                                                  "num_classes": 10}
    assert torch.equal(_outputs(timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)), _outputs(model))
    mixed = timm.create_model("cifar_attention56", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "out" / "model.safetensors")))
    assert not torch.allclose(_outputs(mixed), _outputs(model))


def test_eval_accepts_the_exported_folder(fitted, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(fitted.run), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["eval", str(out), f"data.root={fitted.data}"]) == 0
    # The run's weights name every validation image (make_run); any other weights miss most of them.
    assert capsys.readouterr().out == (f"cifar_attention56 step 7 at 32 px: top-1 err 0.00%, top-5 err 0.00% over "
                                       f"20 images ({out / 'model.safetensors'})\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # printed, not recorded


def _results(run: Path, cfg, step: int, **fields) -> None:
    results = run_results(cfg, num_classes=10, params=1_234_567, macs=89_000_000, macs_input_size=32, step=step,
                          images_seen=7 * 256, epochs=89.6, world_size=4, device_type="cuda",
                          device_name="NVIDIA H100 80GB HBM3", precision="bf16", wall_time_s=3725.0,
                          device_seconds=4 * 3725.0, evaluations=[
                              Evaluation(size=32, top1_err=12.5, top5_err=1.25, num_samples=20, step=step,
                                         device_type="cuda", device_name="NVIDIA H100 80GB HBM3", precision="bf16")])
    results.git_commit = "0123abcd" * 5
    for key, value in fields.items():
        setattr(results, key, value)
    results.save(run / "results.json")


def test_model_card_gives_the_runs_measured_numbers_and_says_it_is_partial_on_other_data(fitted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted.run, run)
    cfg = load_config(run / "config.yaml")
    _results(run, cfg, step=7)
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| 32x32 | 12.50 | 1.25 | 20 | NVIDIA H100 80GB HBM3 (cuda) | bf16 |" in card
    assert "**Partial run.** Training stopped at step 7 of the 100 steps of its schedule (7%)" in card
    assert "**Not the paper's data.** Trained on `demo` (10 classes)" in card
    for fact in ("4 x NVIDIA H100 80GB HBM3 (cuda), 1h02m wall time, 4.14 GPU-hours", "global batch 256",
                 "1,234,567 parameters, 0.09 G multiply-adds at 32x32", f"git commit `{'0123abcd' * 5}`",
                 "| precision | bf16 |", "library_name: timm"):
        assert fact in card, fact
    assert "Not evaluated" not in card


def test_model_card_of_weights_without_a_recorded_evaluation_says_so(fitted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted.run, run)
    _results(run, load_config(run / "config.yaml"), step=9)  # the record of a later checkpoint, not of step 7
    assert main(["export", str(run / "checkpoints" / "step_00000007.pt"), str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert ("**Not evaluated.** No evaluation of these weights (step 7) is recorded (the run's results.json "
            "records step 9, not this checkpoint's)") in card
    assert "12.50" not in card and "git commit not recorded" in card
    lone = tmp_path / "lone.pt"
    shutil.copy(run / "checkpoints" / "step_00000007.pt", lone)
    assert main(["export", str(lone), str(tmp_path / "out2")]) == 0
    assert "is recorded (the checkpoint is outside a run directory)" in (tmp_path / "out2" / "README.md").read_text()


def test_model_card_of_a_full_run_on_cifar10_gives_its_share_of_the_papers_schedule(fitted, tmp_path):
    cfg = load_config(fitted.run / "config.yaml", ["data.name=cifar10"])
    results = run_results(cfg, num_classes=10, params=1, macs=1, macs_input_size=32, step=100, images_seen=25_600,
                          epochs=0.5, world_size=1, device_type="cpu", device_name="CPU", precision="fp32",
                          wall_time_s=1.0, device_seconds=1.0, evaluations=[])
    config = {"architecture": "cifar_attention56", "num_classes": 10, "model_args": {"num_classes": 10}}
    card = export.model_card(cfg, results, "the run's results.json has none", Path("step_00000100.pt"), config)
    assert "**Partial run.**" not in card and "**Not the paper's data.**" not in card
    assert "**Short of the paper's schedule.** It saw 25,600 training images, 0.25% of the paper's schedule" in card
    assert "**Not evaluated.**" in card


def test_export_errors_are_one_line_and_leave_nothing_behind(fitted, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "missing"), str(out)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'}: no such checkpoint file\n"
    (tmp_path / "empty_run").mkdir()
    assert main(["export", str(tmp_path / "empty_run"), str(out)]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(fitted.run), str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out} exists and is not empty; choose a new folder or delete it first\n"
    assert os.listdir(out) == ["keep.txt"]
    shutil.rmtree(out)
    # A write failing after the weights are written: no OUT_DIR and no temporary folder are left.

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", full_disk)  # the model card, written after the weights
        assert main(["export", str(fitted.run), str(out)]) == 2
    assert capsys.readouterr().err == f"error: cannot write {out}: No space left on device\n"
    assert os.listdir(tmp_path) == ["empty_run"]
    # --push-to-hub without huggingface_hub: the export is written, the upload is one error line.
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert main(["export", str(fitted.run), str(out), "--push-to-hub", "me/ran56"]) == 2
    assert capsys.readouterr().err == (f"error: --push-to-hub needs huggingface_hub: pip install huggingface_hub "
                                       f"(the export in {out} is complete)\n")
    assert sorted(os.listdir(out)) == FILES


def test_an_export_reads_back_the_weights_and_the_runs_config(fitted, tmp_path):
    assert main(["export", str(fitted.run), str(tmp_path / "out")]) == 0
    path, loaded, run_dir = weights.find_weights(tmp_path / "out")
    assert path == tmp_path / "out" / "model.safetensors" and run_dir is None
    state = fitted.model.state_dict()
    assert loaded.step == 7 and loaded.num_classes == 10 and loaded.model.keys() == state.keys()
    assert all(torch.equal(loaded.model[k], state[k]) for k in state)
    assert loaded.config == (fitted.run / "config.yaml").read_text()
    assert safetensors.torch.load_file(tmp_path / "out" / "model.safetensors").keys() == state.keys()
    (tmp_path / "timm_only").mkdir()  # a folder timm's save_for_hf wrote: no ran_bench block
    (tmp_path / "timm_only" / "config.json").write_text(json.dumps({"architecture": "resnet50"}))
    with pytest.raises(weights.ExportError, match="no ran_bench block"):
        weights.find_weights(tmp_path / "timm_only")


def _baseline_checkpoint(name: str):
    """A 10-class checkpoint of a Table 7 baseline at 64 px, its BatchNorm statistics not the defaults."""
    cfg = load_config(None, [f"model.name={name}", "data.name=demo", "data.root=/nonexistent", "data.train_size=64",
                             "data.test_sizes=[64]"])
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return cfg, model, make_checkpoint(7, model=model.state_dict(), num_classes=10, config=to_yaml(cfg))


def test_timms_own_resnet152_loads_the_torchvision_resnet152_export(tmp_path):
    # timm registers resnet152 itself (timm's ResNet); ran-bench's is torchvision's, with the same
    # parameter names and the same computation, so timm's loads the export exactly.
    cfg, model, ckpt = _baseline_checkpoint("resnet152")
    config = export.save_timm_folder(tmp_path, model, cfg, ckpt, Path("step_00000007.pt"))
    assert config["architecture"] == "resnet152"
    loaded = timm.create_model("resnet152", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(
        file=str(tmp_path / "model.safetensors"), num_classes=10))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert type(loaded).__module__.startswith("timm.") and torch.equal(loaded.eval()(x), model(x))


def test_resnet200_exports_as_the_timm_architecture_that_builds_it(tmp_path):
    # timm's own resnet200 is post-activation; ran-bench's pre-activation one is timm's ResNetV2,
    # which config.json names with its arguments, and the card says so.
    cfg, model, ckpt = _baseline_checkpoint("resnet200")
    config = export.save_timm_folder(tmp_path, model, cfg, ckpt, Path("step_00000007.pt"))
    assert config["architecture"] == "resnetv2_50" and config["model_args"]["layers"] == [3, 24, 36, 3]
    export.check_timm_loads(tmp_path, model, config)  # timm.create_model("local-dir:...") gives the same outputs
    results = run_results(cfg, num_classes=10, params=1, macs=1, macs_input_size=64, step=7, images_seen=7,
                          epochs=0.1, world_size=1, device_type="cpu", device_name="CPU", precision="fp32",
                          wall_time_s=1.0, device_seconds=1.0, evaluations=[])
    card = export.model_card(cfg, results, "none", Path("step_00000007.pt"), config)
    assert "timm's own `resnet200` is a post-activation ResNet-200 that these weights do not fit" in card
    assert 'timm.create_model("resnetv2_50", pretrained=True, num_classes=10, layers=[3, 24, 36, 3]' in card
    # Named resnet200, timm builds its own network: the check that every export passes refuses it.
    (tmp_path / "config.json").write_text(json.dumps({**config, "architecture": "resnet200", "model_args": {}}))
    with pytest.raises(export.ExportError, match="timm cannot load this export of resnet200 as the trained model"):
        export.check_timm_loads(tmp_path, model, config)
