"""The weights a command is pointed at, and what their outputs are called.

`find_weights` reads a run directory (its newest good checkpoint), a checkpoint file, or a folder
written by `ran-bench export` (timm's layout: `config.json` with a `ran_bench` block holding the
run's config, and `model.safetensors`); `build_model` rebuilds the trained model from any of them.
Output names: a run's class folders, and ImageNet's human-readable names (torchvision's) for
classes that are ImageNet-1K wnids.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
from timm.data import ImageNetInfo
from torchvision.models import ResNet50_Weights

from ran_bench.checkpoint import Checkpoint, find_checkpoint
from ran_bench.config import Config
from ran_bench.data import find_classes
from ran_bench.errors import UserError
from ran_bench.models import create_model

EXPORT_FORMAT = "ran-bench-export"
EXPORT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"

log = logging.getLogger("ran_bench.weights")


class ExportError(ValueError, UserError):
    """An export folder that cannot be written or read: the message names the folder or file."""


@dataclass
class ExportedModel:
    """An export folder read back, with the fields eval and predict read from a Checkpoint."""

    path: Path
    config: str  # the run's resolved YAML config
    num_classes: int
    step: int
    model: dict[str, torch.Tensor]  # the state dict
    label_names: list[str] | None


def is_export(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def load_export(path: str | os.PathLike) -> ExportedModel:
    """Read a folder written by `ran-bench export`; ExportError names what is missing or wrong."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path / CONFIG_FILE}: cannot be read as JSON ({e})") from None
    block = config.get("ran_bench") if isinstance(config, dict) else None
    if not isinstance(block, dict) or block.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path / CONFIG_FILE}: no ran_bench block; not a folder written by `ran-bench export`, "
                          "which is what eval and predict need to rebuild the model")
    if block.get("version") != EXPORT_VERSION:
        raise ExportError(f"{path / CONFIG_FILE}: export format version {block.get('version')!r}, this ran-bench "
                          f"reads version {EXPORT_VERSION}")
    try:
        weights = safetensors.torch.load_file(path / WEIGHTS_FILE)
    except Exception as e:  # noqa: BLE001 - a missing, truncated or foreign file raises several types
        raise ExportError(f"{path / WEIGHTS_FILE}: cannot be read as safetensors ({type(e).__name__}: {e})") from None
    return ExportedModel(path=path, config=block["config"], num_classes=int(config["num_classes"]),
                         step=int(block["step"]), model=weights, label_names=config.get("label_names"))


def find_weights(path: str | os.PathLike, warn: Callable[[str], None] = log.warning
                 ) -> tuple[Path, Checkpoint | ExportedModel, Path | None]:
    """The weights a command is pointed at: an export folder, or (as `find_checkpoint`) a run
    directory or a checkpoint file. Returns (the weights file, its checkpoint or export, the run
    directory or None)."""
    if is_export(path):
        exported = load_export(path)
        return exported.path / WEIGHTS_FILE, exported, None
    return find_checkpoint(path, warn=warn)


def build_model(cfg: Config, num_classes: int, state: dict, where: Path) -> nn.Module:
    """The run's model (`model.name` and `model.options` of `cfg`) with `state` loaded, in eval mode."""
    model = create_model(cfg.model.name, num_classes=num_classes, **cfg.model.options)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ExportError(f"{where}: its weights do not fit {cfg.model.name} ({str(e).splitlines()[0]})") from None
    return model.eval()


# Class names


@cache
def imagenet_names() -> dict[str, str]:
    """ImageNet-1K wnid -> torchvision's human-readable name. Both lists are in class-index order,
    which is the sorted order of the wnids (the folder order every loader uses)."""
    wnids = list(ImageNetInfo().label_names())
    return dict(zip(wnids, ResNet50_Weights.IMAGENET1K_V1.meta["categories"], strict=True))


def class_names(cfg: Config, num_classes: int) -> tuple[list[str] | None, str]:
    """(the label of each output, where the labels came from): the class folder names of the run's
    data root when it is reachable here, else the ImageNet-1K wnids for a 1000-class ImageNet run
    (its class folders are the wnids), else None."""
    root = cfg.data.root
    if root and Path(root, "train").is_dir():
        try:
            names = find_classes(root)
        except UserError:
            names = []
        if len(names) == num_classes:
            return names, f"the class folders of {Path(root, 'train')}"
    name = cfg.data.name.lower().replace("-", "").replace("_", "")
    if num_classes == 1000 and name.startswith("imagenet"):
        return list(imagenet_names()), "the ImageNet-1K wnids (the run's class folders)"
    return None, f"none ({root}/train with {num_classes} class folders is not reachable here)"


def describe_classes(labels: list[str] | None) -> list[str] | None:
    """ImageNet's human-readable name of each label when every label is an ImageNet-1K wnid, else None."""
    names = imagenet_names()
    if not labels or not all(label in names for label in labels):
        return None
    return [names[label] for label in labels]
