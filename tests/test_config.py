"""Configs: the paper's recipe, the scaling rules, and errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ran_bench.config import ConfigError, check_resume, gradient_accumulation_steps, load_config, lr_at, validate
from ran_bench.errors import InputError
from ran_bench.paper import load_table
from ran_bench.runtime import accelerate_precision, resolve_precision

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("row", load_table("table7_imagenet"), ids=lambda r: r["model"])
def test_table7_configs_reproduce_the_papers_recipe(row):
    cfg = load_config(CONFIGS / f"{row['model']}.yaml")
    assert cfg.model.name == row["model"]
    assert row["test_size"] in cfg.data.test_sizes  # the size the table reports
    assert cfg.data.train_size == (299 if row["test_size"] == 299 else 224)
    o, s = cfg.optim, cfg.schedule
    assert (o.lr_per_256, o.momentum, o.nesterov, o.weight_decay) == (0.1, 0.9, True, 1e-4)
    assert (cfg.lr, cfg.total_steps, cfg.milestones) == (0.1, 530_000, [200_000, 400_000, 500_000])
    assert (s.kind.name, s.warmup_steps, o.label_smoothing, o.global_batch_size) == ("step", 0, 0.0, 256)


def test_lr_scales_linearly_and_milestones_rescale_with_the_global_batch():
    cfg = load_config(CONFIGS / "attention92.yaml", ["optim.global_batch_size=1024"])
    assert cfg.lr == pytest.approx(0.4)  # 0.1 per 256 images
    assert cfg.total_steps == 132_500  # 530k iterations at 256 = the same images at 1024
    assert cfg.milestones == [50_000, 100_000, 125_000]
    assert lr_at(cfg, 0) == pytest.approx(0.4)
    assert lr_at(cfg, 49_999) == pytest.approx(0.4)
    assert lr_at(cfg, 50_000) == pytest.approx(0.04)
    assert lr_at(cfg, 125_000) == pytest.approx(0.0004)


def test_warmup_and_cosine_options():
    cfg = load_config(CONFIGS / "attention56.yaml", ["optim.global_batch_size=512", "schedule.kind=cosine",
                                                     "schedule.warmup_steps=10000"])
    assert cfg.warmup_steps == 5000
    assert lr_at(cfg, 0) == pytest.approx(0.2 / 5000)
    assert lr_at(cfg, 4999) == pytest.approx(0.2)
    assert lr_at(cfg, cfg.total_steps // 2 + 2500) == pytest.approx(0.1, rel=1e-3)  # half-way down the cosine
    assert lr_at(cfg, cfg.total_steps) == pytest.approx(0.0, abs=1e-12)


def test_gradient_accumulation_keeps_the_global_batch():
    cfg = load_config(CONFIGS / "attention92.yaml", ["data.root=/data/imagenet"])  # 256 = 8 GPUs x 32
    assert gradient_accumulation_steps(cfg, 8) == 1
    assert gradient_accumulation_steps(cfg, 4) == 2
    assert gradient_accumulation_steps(cfg, 1) == 8
    with pytest.raises(ConfigError, match=r"global_batch_size \(256\) must be a multiple of world size \(3\) x "
                                          r"optim.per_device_batch_size \(32\)"):
        gradient_accumulation_steps(cfg, 3)


def test_unknown_key_names_the_file_the_key_path_and_the_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {name: attention56}\noptim: {lr: 0.05}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert str(path) in message and "'optim.lr'" in message
    assert "lr_per_256" in message and "global_batch_size" in message  # the valid keys of optim


def test_wrong_type_names_the_key_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {name: attention56}\noptim: {global_batch_size: lots}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'optim.global_batch_size': Value 'lots'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"key 'data.test_sizes\[1\]'"):
        load_config(CONFIGS / "attention92.yaml", ["data.test_sizes=[224,big]"])


def test_invalid_choice_lists_the_valid_values():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "attention92.yaml", ["data.backend=pillow"])
    assert "'data.backend'" in str(e.value) and "dali, torchvision, synthetic, auto" in str(e.value)
    with pytest.raises(ConfigError, match=r"'precision'.*auto, fp32, bf16, fp16"):
        load_config(CONFIGS / "attention92.yaml", ["precision=fp8"])


def test_overrides_and_cross_field_errors():
    cfg = load_config(CONFIGS / "attention92.yaml", ["data.root=/data/imagenet", "optim.lr_per_256=0.05"])
    assert (cfg.data.root, cfg.lr) == ("/data/imagenet", 0.05)
    with pytest.raises(ConfigError, match=r"override 'optim.lr_per_256' is not key=value"):
        load_config(CONFIGS / "attention92.yaml", ["optim.lr_per_256"])
    with pytest.raises(ConfigError, match=r"global_batch_size \(256\) must be a multiple of "
                                          r"optim.per_device_batch_size \(48\)"):
        load_config(CONFIGS / "attention92.yaml", ["optim.per_device_batch_size=48"])
    with pytest.raises(ConfigError, match=r"data.root is not set"):
        validate(load_config(CONFIGS / "attention92.yaml"), world_size=8)
    with pytest.raises(ConfigError, match="model.name"):
        load_config(None)  # no model chosen


def test_augmentation_choice_is_checked():
    assert load_config(CONFIGS / "attention56.yaml").data.augmentation == "imagenet"
    assert load_config(CONFIGS / "attention56.yaml", ["data.augmentation=cifar"]).data.augmentation == "cifar"
    with pytest.raises(ConfigError, match=r"data.augmentation: unknown value 'mnist'; choose one of imagenet, cifar"):
        load_config(CONFIGS / "attention56.yaml", ["data.augmentation=mnist"])


def test_resume_refuses_a_changed_recipe_and_names_each_key():
    saved = load_config(CONFIGS / "attention92.yaml")
    with pytest.raises(ConfigError) as e:
        check_resume(saved, load_config(CONFIGS / "attention92.yaml", [
            "optim.global_batch_size=512", "optim.lr_per_256=0.2", "schedule.milestones=[1,2,3]"]), "ckpt.pt")
    message = str(e.value)
    assert message.startswith("ckpt.pt was trained with a different recipe")
    assert "optim.global_batch_size: 256 in the checkpoint, 512 now" in message
    assert "optim.lr_per_256: 0.1 in the checkpoint, 0.2 now" in message
    assert "schedule.milestones: [200000, 400000, 500000] in the checkpoint, [1, 2, 3] now" in message
    assert "new run directory (--run-dir)" in message
    for override in ("model.name=attention56", "model.options={drop_rate: 0.1}", "optim.weight_decay=0.0005",
                     "schedule.kind=cosine", "data.augmentation=cifar", "seed=1"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            check_resume(saved, load_config(CONFIGS / "attention92.yaml", [override]), "ckpt.pt")


def test_resume_allows_what_does_not_change_the_recipe():
    saved = load_config(CONFIGS / "attention92.yaml", ["schedule.max_steps=1000"])
    # Continuing a partial run, a moved data set, fewer images per GPU (more accumulation), other
    # evaluation and logging settings.
    check_resume(saved, load_config(CONFIGS / "attention92.yaml", [
        "schedule.max_steps=null", "data.root=/elsewhere", "optim.per_device_batch_size=16", "eval.every_steps=10",
        "log.every_steps=5", "precision=fp32", "checkpoint.keep_last=1"]), "ckpt.pt")


def test_fp16_needs_cuda_and_auto_uses_bf16_only_on_bf16_hardware(monkeypatch):
    with pytest.raises(InputError, match=r"precision=fp16 needs a CUDA GPU \(autocast with a gradient scaler; on cpu"):
        resolve_precision(load_config(CONFIGS / "attention56.yaml", ["precision=fp16"]).precision.name, "cpu")
    auto = load_config(CONFIGS / "attention56.yaml").precision.name
    assert resolve_precision(auto, "cpu") == "fp32"
    calls = []

    def bf16_hardware(answer):
        def is_bf16_supported(including_emulation=True):
            calls.append(including_emulation)
            return answer or including_emulation  # V100/T4: emulated only
        return is_bf16_supported

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_hardware(True))
    assert resolve_precision(auto, "cuda") == "bf16"  # A100, H100
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_hardware(False))
    assert resolve_precision(auto, "cuda") == "fp16"  # V100, T4
    assert calls == [False, False]
    assert resolve_precision("fp16", "cuda") == "fp16"
    assert [accelerate_precision(p) for p in ("fp32", "bf16", "fp16")] == ["no", "bf16", "fp16"]


OK_YAML = "model: {name: attention56}\n"


@pytest.mark.parametrize("files, argv, message", [
    ({"c.yaml": OK_YAML + "foo: 1\n"}, ["--config", "c.yaml"], r"c\.yaml: key 'foo': Key 'foo' not in 'Config'"),
    ({"c.yaml": OK_YAML}, ["--config", "c.yaml", "optim.global_batch_size=abc"],
     r"c\.yaml \(or the overrides .*\): key 'optim\.global_batch_size': Value 'abc' of type 'str' could not be "
     r"converted to Integer"),
    ({"c.yaml": OK_YAML}, ["--config", "c.yaml", "optim.global_batch_size=0"],
     r"c\.yaml: optim\.global_batch_size must be >= 1, got 0"),
    ({"c.yaml": "model: [\n"}, ["--config", "c.yaml"], r"c\.yaml: not valid YAML \(.*expected the node content"),
    ({"c.yaml": ""}, ["--config", "c.yaml"], r"c\.yaml: required keys not set: model\.name"),
    ({"c.yaml": "model: !!python/object/apply:os.system ['touch pwned']\n"}, ["--config", "c.yaml"],
     r"c\.yaml: not valid YAML \(could not determine a constructor for the tag .*python/object/apply:os\.system"),
    ({"c.yaml": OK_YAML + "model: {name: attention92}\n"}, ["--config", "c.yaml"],
     r"c\.yaml: not valid YAML \(.*found duplicate key model"),
    ({"c.yaml": "model: {name: attention93}\n"}, ["--config", "c.yaml"],
     r"unknown model 'attention93'; known models: .*attention92"),
    ({"c.yaml": OK_YAML}, ["--config", "c.yaml", "optim.lr_per_256"],
     r"override 'optim\.lr_per_256' is not key=value"),
    ({}, [], r"give --config FILE \(a new run\) or --run-dir DIR \(resume a run\)"),
    ({"old/x": ""}, ["--run-dir", "old"], r"old/config\.yaml does not exist, so old is not a run to resume"),
    ({"c.yaml": OK_YAML, "taken": ""}, ["--config", "c.yaml", "--run-dir", "taken"],
     r"--run-dir taken is a file, not a directory"),
], ids=["unknown-key", "not-an-int", "zero-batch", "unparsable", "empty", "python-tag", "duplicate-key",
        "unknown-model", "no-equals", "no-config", "no-config-yaml", "run-dir-is-a-file"])
def test_every_bad_input_of_train_is_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys, files, argv, message):
    """Through the command line's entry point: status 2 (bad input, as the README and `eval` say),
    one `error:` line, and nothing written (no run directory, nothing in a folder that is not a
    run). The process-level exit status of the same path: the test below."""
    import re

    from ran_bench.cli import main as cli

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert cli(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert re.match(f"error: {message}", err) and err.count("\n") == 1, err
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.slow  # a real `python -m ran_bench train`: seconds of importing torch and the models
def test_a_bad_config_ends_the_train_process_with_status_2(tmp_path):
    import subprocess
    import sys

    (tmp_path / "c.yaml").write_text(OK_YAML + "foo: 1\n")
    proc = subprocess.run([sys.executable, "-m", "ran_bench", "train", "--config", "c.yaml"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: c.yaml: key 'foo'") and proc.stderr.count("\n") == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
