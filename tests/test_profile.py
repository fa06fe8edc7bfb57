"""`ran-bench profile` and the counting convention (multiply-adds of convolutions and the classifier)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import torch.nn as nn
import torchvision

from ran_bench.cli import main as cli_main
from ran_bench.profile import count_macs, count_params, profile_model


def test_count_macs_counts_convolutions_and_classifier_only() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # 8x8 output: 8 * 8 * 8 * (3 * 3 * 3) = 13,824
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # not counted
        nn.Linear(8, 10),  # 8 * 10 = 80
    )
    assert count_macs(model, 8) == 13_824 + 80
    assert count_params(model) == 8 * 27 + 2 * 8 + 8 * 10 + 10  # BatchNorm: weight and bias per channel
    assert model.training  # the caller's mode is restored


def test_count_macs_matches_published_resnet50() -> None:
    """torchvision documents ResNet-50 at 4.09 G multiply-adds ("GFLOPS" in its table) and 25.6 M parameters."""
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    assert count_macs(model, 224) == pytest.approx(4.09e9, rel=0.005)
    assert count_params(model) == 25_557_032


@pytest.fixture(scope="module")
def profile_json() -> dict:
    """`ran-bench profile --json` for one ImageNet and two CIFAR models, run once."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["profile", "--models", "attention56,cifar_attention92,cifar_resnet164", "--json"]) == 0
    return json.loads(out.getvalue())


def test_json_has_paper_and_released_figures(profile_json: dict) -> None:
    assert "FLOPs / 2" in profile_json["mac_convention"] and "multiply-adds" in profile_json["mac_convention"]
    rows = {r["model"]: r for r in profile_json["models"]}
    a56 = rows["attention56"]
    assert a56["input_size"] == 224
    assert a56["paper_params"] == 31_900_000 and a56["paper_macs"] == 6_300_000_000  # Table 7
    assert a56["released_params"] == 31_810_728 and a56["released_macs"] == 6_271_000_000  # released definition
    assert abs(a56["params_vs_released"]) < 0.005 and abs(a56["macs_vs_released"]) < 0.005
    assert a56["params_vs_paper"] == pytest.approx((a56["params"] - 31_900_000) / 31_900_000)
    assert rows["cifar_attention92"]["input_size"] == 32
    assert rows["cifar_attention92"]["paper_params"] == 1_900_000  # Table 6
    assert rows["cifar_resnet164"]["paper_params"] == 1_700_000  # Table 6
    assert rows["cifar_attention92"]["released_params"] is None and rows["cifar_attention92"]["paper_macs"] is None


def test_table_and_markdown(tmp_path, capsys) -> None:
    output = tmp_path / "reports" / "model_zoo.md"
    assert cli_main(["profile", "--models", "attention56,cifar_resnet164", "--output", str(output)]) == 0
    text = capsys.readouterr().out
    for expected in ("attention56", "31.81", "31.90", "31.811", "6.271", "6.3", "Table 7",
                     "cifar_resnet164", "1.70", "Table 6", "multiply-adds", "FLOPs / 2"):
        assert expected in text, expected
    markdown = output.read_text()
    assert markdown.startswith("# Model zoo")
    assert "| model | dataset | input | params (M) |" in markdown
    assert "| attention56 | imagenet | 224 | 31.81 | 31.90 |" in markdown
    assert "FLOPs / 2" in markdown


def test_size_320_scales_macs_and_drops_224_figures(profile_json: dict) -> None:
    at_224 = next(r for r in profile_json["models"] if r["model"] == "attention56")
    at_320 = profile_model("attention56", size=320)
    assert at_320["input_size"] == 320 and at_320["params"] == at_224["params"]
    # Every map is (320/224)^2 larger: 160/80/40/20/10 against 112/56/28/14/7.
    assert at_320["macs"] / at_224["macs"] == pytest.approx((320 / 224) ** 2, rel=0.002)
    assert at_320["paper_macs"] is None and at_320["released_macs"] is None  # those are counted at 224


def test_unknown_model_is_a_clear_error(capsys) -> None:
    assert cli_main(["profile", "--models", "attention57"]) == 2
    err = capsys.readouterr().err
    assert "unknown model(s) attention57" in err and "attention56" in err
