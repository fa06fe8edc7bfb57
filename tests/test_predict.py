"""`ran-bench predict`: the top-5 classes of images, named by ImageNet's names or the class folders,
through eval's validation transform, from a run, a checkpoint or an export."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from test_export import make_data, make_run

import tiny_model  # noqa: F401 - registers test_tiny_net
from conftest import make_checkpoint
from ran_bench.checkpoint import save_checkpoint
from ran_bench.cli import main
from ran_bench.config import load_config, to_yaml
from ran_bench.data import build_loader
from ran_bench.data.demo import make_demo
from ran_bench.models import create_model
from ran_bench.weights import describe_classes, imagenet_names

IMAGENET_TOP5 = ["tench (n01440764)", "goldfish (n01443537)", "great white shark (n01484850)",
                 "tiger shark (n01491361)", "hammerhead (n01494475)"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A CIFAR Attention-56 run on the demo shapes whose weights name every validation image's
    class (test_export.make_run), and its export."""
    base = tmp_path_factory.mktemp("predict")
    data_root = make_data(base / "data")
    make_run(base / "run", data_root)
    assert main(["export", str(base / "run"), str(base / "export")]) == 0
    return SimpleNamespace(run=base / "run", export=base / "export", data=data_root)


def _blocks(text: str) -> list[list[str]]:
    """The printed top-k of each image: [header, line, line, ...] per image."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("  "):
            blocks[-1].append(line.split(None, 1)[1])
        else:
            blocks.append([line])
    return blocks


def test_predict_names_the_class_folders_from_a_run_a_checkpoint_or_an_export(fitted, capsys):
    images = [fitted.data / "val" / "circle" / "val_circle_00000.JPEG",
              fitted.data / "val" / "triangle" / "val_triangle_00001.JPEG"]
    outputs = []
    for source in (fitted.run, fitted.run / "checkpoints" / "step_00000007.pt", fitted.export):
        capsys.readouterr()
        assert main(["predict", str(source), *map(str, images)]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]
    blocks = _blocks(outputs[0])
    assert [b[0] for b in blocks] == [f"{p}: cifar_attention56 step 7, 32x32 crop" for p in images]
    assert [b[1] for b in blocks] == ["circle", "triangle"] and all(len(b) == 6 for b in blocks)
    for line in outputs[0].splitlines():
        if line.startswith("  "):
            probability = float(line.split()[0])
            assert 0.0 <= probability <= 1.0


def test_predict_json_gives_probabilities_in_order(fitted, capsys):
    image = fitted.data / "val" / "ring" / "val_ring_00000.JPEG"
    assert main(["predict", "--json", "--top", "3", str(fitted.export), str(image)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["image"] == str(image) and record["model"] == "cifar_attention56" and record["step"] == 7
    assert [c["label"] for c in record["top"]][0] == "ring" and len(record["top"]) == 3
    probabilities = [c["probability"] for c in record["top"]]
    assert probabilities == sorted(probabilities, reverse=True) and probabilities[0] > 0.99


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory):
    """A 1000-class tiny net trained "on ImageNet" (its data root is not here) whose classifier
    prefers classes 0 to 4 in that order, whatever the image."""
    run = tmp_path_factory.mktemp("imagenet") / "run"
    cfg = load_config(None, ["model.name=test_tiny_net", "data.name=imagenet", "data.root=/nonexistent/imagenet",
                             "data.train_size=32", "data.test_sizes=[32]"])
    model = create_model("test_tiny_net", num_classes=1000)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[:5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    save_checkpoint(run / "checkpoints", make_checkpoint(3, model=model.state_dict(), num_classes=1000,
                                                         config=to_yaml(cfg)), keep_last=1)
    return run, torch.softmax(model.fc.bias, 0)[:5].tolist()


def test_imagenet_wnids_map_to_torchvisions_names_in_class_index_order():
    # torchvision lists the names by class index, which is the sorted order of the wnids
    names = imagenet_names()
    assert list(names) == sorted(names) and len(set(names.values())) == 1000
    known = {"n01440764": "tench", "n02085620": "Chihuahua", "n02123045": "tabby", "n15075141": "toilet tissue"}
    assert {wnid: names[wnid] for wnid in known} == known
    assert [list(names).index(wnid) for wnid in known] == [0, 151, 281, 999]
    # any ImageNet subset is named too; other labels are not
    assert describe_classes(["n02123045", "n01440764"]) == ["tabby", "tench"]
    assert describe_classes(["n02123045", "cat"]) is None


def test_imagenet_classes_get_their_human_readable_names(imagenet_run, tmp_path, capsys):
    run, probabilities = imagenet_run
    image = tmp_path / "grey.png"
    Image.new("RGB", (50, 40), (120, 120, 120)).save(image)
    expected = [f"{p:.4f}  {name}" for p, name in zip(probabilities, IMAGENET_TOP5)]
    assert main(["predict", str(run), str(image)]) == 0
    assert [line.strip() for line in capsys.readouterr().out.splitlines()[1:]] == expected
    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["label_names"][:2] == ["n01440764", "n01443537"] and len(config["label_names"]) == 1000
    assert config["label_descriptions"]["n01440764"] == "tench"
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "export"), str(image)]) == 0
    assert [line.strip() for line in capsys.readouterr().out.splitlines()[1:]] == expected


def test_predict_uses_evals_validation_transform(tmp_path, capsys):
    # Non-square images of 40-72 px, the ImageNet recipe at 32: shorter side to 37, centre crop.
    root = tmp_path / "data"
    make_demo(root, num_classes=3, train_per_class=1, val_per_class=2, min_side=40, max_side=72)
    cfg = load_config(None, ["model.name=test_tiny_net", "data.name=demo", f"data.root={root}", "data.train_size=32",
                             "data.test_sizes=[32]"])
    torch.manual_seed(3)
    model = create_model("test_tiny_net", num_classes=3).eval()
    save_checkpoint(tmp_path / "run" / "checkpoints", make_checkpoint(1, model=model.state_dict(), num_classes=3,
                                                                      config=to_yaml(cfg)), keep_last=1)
    loader = build_loader(root, "val", size=32, batch_size=6, backend="torchvision", num_threads=0)
    images, _ = next(iter(loader))
    with torch.no_grad():
        expected = torch.softmax(model(images), -1)
    files = sorted((root / "val").glob("*/*.JPEG"))  # the loader's order
    assert main(["predict", "--json", "--top", "3", str(tmp_path / "run"), *map(str, files)]) == 0
    for line, probs in zip(capsys.readouterr().out.splitlines(), expected):
        predicted = torch.zeros(3)
        for c in json.loads(line)["top"]:
            predicted[c["index"]] = c["probability"]
        assert torch.allclose(predicted, probs, atol=1e-5)


def test_a_non_image_file_is_one_error_line(fitted, tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    good = fitted.data / "val" / "ring" / "val_ring_00000.JPEG"
    assert main(["predict", str(fitted.export), str(good), str(text)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # every file is checked before anything is predicted
    assert captured.err.startswith(f"error: {text}: not an image (") and captured.err.count("\n") == 1
    assert captured.err.endswith("; predict reads image files (JPEG, PNG, ...)\n")
    assert main(["predict", str(fitted.export), str(tmp_path / "missing.jpg")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.jpg'}: no such file\n"
    assert main(["predict", str(tmp_path / "no_run"), str(good)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'no_run'}: no such checkpoint file\n"
