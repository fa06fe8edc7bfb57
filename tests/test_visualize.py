"""`ran-bench visualize`: one mask panel per attention module, from a trainer checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_checkpoint
from ran_bench import visualize
from ran_bench.checkpoint import save_checkpoint
from ran_bench.cli import main
from ran_bench.config import load_config, to_yaml
from ran_bench.models import create_model

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    """A 60x45 picture: a bright disc on a dark striped background (not square, to exercise the crop)."""
    y, x = np.mgrid[0:45, 0:60]
    img = np.stack([(x * 4) % 256, (y * 5) % 256, np.full_like(x, 40)], -1).astype(np.uint8)
    img[(x - 35) ** 2 + (y - 20) ** 2 < 120] = (250, 240, 30)
    path = tmp_path_factory.mktemp("img") / "disc.png"
    Image.fromarray(img).save(path)
    return path


def test_attention92_gives_one_mask_per_module_grouped_by_stage(image_file, tmp_path):
    torch.manual_seed(0)
    model = create_model("attention92")
    crop, image = visualize.preprocess(image_file, 64)
    assert crop.shape == (64, 64, 3) and image.shape == (1, 3, 64, 64)
    masks = visualize.attention_masks(model, image)
    # Attention-92 has 1, 2 and 3 attention modules in stages 1, 2 and 3 (the paper's Table 2).
    assert [(m.stage, m.index) for m in masks] == [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)]
    assert [tuple(m.mask.shape) for m in masks] == [(256, 16, 16), (512, 8, 8), (512, 8, 8),
                                                   (1024, 4, 4), (1024, 4, 4), (1024, 4, 4)]
    for m in masks:  # mixed attention: a sigmoid per channel and position
        assert 0.0 <= float(m.mask.min()) and float(m.mask.max()) <= 1.0
    assert all(not mod._forward_hooks for mod in model.modules())  # hooks removed
    titles = visualize.plot_masks(crop, masks, tmp_path / "m.png")
    assert titles == ["stage 1, module 1 (16x16)", "stage 2, module 1 (8x8)", "stage 2, module 2 (8x8)",
                      "stage 3, module 1 (4x4)", "stage 3, module 2 (4x4)", "stage 3, module 3 (4x4)"]
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG


def test_model_without_attention_modules_is_refused():
    model = create_model("cifar_resnet164")
    with pytest.raises(visualize.VisualizeError, match="no attention modules"):
        visualize.attention_masks(model, torch.zeros(1, 3, 32, 32))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as the trainer leaves it: config.yaml and a checkpoint of a CIFAR Attention-56
    with spatial attention and random weights."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(None, ["model.name=cifar_attention56", "model.options.attention=spatial",
                             "data.name=cifar10", "data.num_classes=10", "data.train_size=32", "data.test_sizes=[32]"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(1)
    model = create_model("cifar_attention56", num_classes=10, attention="spatial")
    # Make BatchNorm statistics non-trivial so a model not loaded from the checkpoint differs.
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    ckpt = make_checkpoint(7, model=model.state_dict(), num_classes=10, config=to_yaml(cfg))
    save_checkpoint(run / "checkpoints", ckpt, keep_last=2)
    return run, model.eval()


def test_load_model_restores_the_checkpoint(run_dir, image_file):
    run, trained = run_dir
    for source in (run, run / "checkpoints" / "step_00000007.pt"):
        model, cfg, path = visualize.load_model(source)
        assert path.name == "step_00000007.pt" and cfg.model.name == "cifar_attention56"
        _, image = visualize.preprocess(image_file, 32)
        loaded = visualize.attention_masks(model, image)
        expected = visualize.attention_masks(trained, image)
        assert len(loaded) == 3
        for a, b in zip(loaded, expected):
            assert torch.equal(a.mask, b.mask)
        # spatial attention: a sigmoid of standardised channels, in [0, 1] too
        assert all(0.0 <= float(m.mask.min()) and float(m.mask.max()) <= 1.0 for m in loaded)


def test_cli_writes_a_png(run_dir, image_file, tmp_path, capsys):
    run, _ = run_dir
    out = tmp_path / "figs" / "masks.png"
    assert main(["visualize", "--checkpoint", str(run), "--image", str(image_file), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    assert "3 attention masks in 3 stages" in capsys.readouterr().out
    # The input and one panel per module (3) in one row of 3 x 3.5 inch panels at 100 dpi.
    assert Image.open(out).size == (1200, 350)


def test_a_checkpoint_outside_its_run_directory_is_drawn_with_its_embedded_config(run_dir, image_file, tmp_path,
                                                                                 capsys):
    run, _ = run_dir
    lone = tmp_path / "lone.pt"  # no config.yaml, no results.json, no data folder to count classes in
    lone.write_bytes((run / "checkpoints" / "step_00000007.pt").read_bytes())
    out = str(tmp_path / "m.png")
    assert main(["visualize", "--checkpoint", str(lone), "--image", str(image_file), "-o", out]) == 0
    assert "3 attention masks in 3 stages" in capsys.readouterr().out


def test_cli_errors_name_the_problem(run_dir, tmp_path, image_file, capsys):
    run, _ = run_dir
    bad_image = tmp_path / "broken.jpg"
    bad_image.write_bytes(b"not an image")
    assert main(["visualize", "--checkpoint", str(run), "--image", str(bad_image), "-o", str(tmp_path / "o.png")]) == 2
    assert f"--image {bad_image}: cannot read the image" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["visualize", "--checkpoint", str(empty), "--image", str(image_file)]) == 2
    err = capsys.readouterr().err
    assert f"{empty / 'checkpoints'} has no checkpoint; is {empty} a ran-bench run directory?" in err
    other = tmp_path / "other.yaml"
    other.write_text((run / "config.yaml").read_text().replace("cifar_attention56", "cifar_attention92"))
    assert main(["visualize", "--checkpoint", str(run), "--config", str(other), "--image", str(image_file)]) == 2
    assert "its weights do not fit cifar_attention92" in capsys.readouterr().err


def test_cifar_runs_see_the_native_32x32_image(tmp_path):
    # The paper tests CIFAR on the 32x32 images as they are; the ImageNet transform would enlarge
    # them to 37 px and cut 2-3 px off every border.
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "c.png")
    crop, _ = visualize.preprocess(tmp_path / "c.png", 32, "cifar")
    assert np.array_equal(crop, pixels)
    crop, _ = visualize.preprocess(tmp_path / "c.png", 32)
    assert not np.array_equal(crop, pixels)
