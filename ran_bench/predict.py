"""`ran-bench predict CHECKPOINT_OR_EXPORT IMAGE...`: the top-5 classes of each image with their
probabilities, the plain and scriptable form of the class `visualize` names in its title.

The model is rebuilt like `ran-bench eval` builds it, from a run directory (its newest checkpoint),
a checkpoint file or an export folder (`ran-bench export`); each image goes through the loaders'
validation transform (`ran_bench.data.torchvision_loader.val_crop`, then `normalize`) at the
run's first test size, on the CPU in fp32. Classes are named by ImageNet's human-readable names
(torchvision's, with the wnid) when they are ImageNet-1K wnids, by their class folder names
otherwise (an export's label_names, or the folders of a checkpoint run's data root when it is
reachable here), else "class N".
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from torchvision.transforms import functional as TF

from ran_bench.config import Config, config_from_yaml
from ran_bench.data.torchvision_loader import normalize, val_crop
from ran_bench.errors import UserError
from ran_bench.weights import ExportedModel, build_model, class_names, describe_classes, find_weights


class PredictError(ValueError, UserError):
    """An input to `ran-bench predict` that is not an image file; the message names it."""


@dataclass
class Predictor:
    """A model rebuilt from its weights, with what the output needs to say where it came from."""

    model: nn.Module
    cfg: Config
    labels: list[str] | None  # the label of each output (wnids or class folder names), if known
    names: list[str]  # what to print for each output
    weights: Path
    step: int


def display_names(labels: list[str] | None, num_classes: int) -> list[str]:
    """ImageNet's names with the wnid for ImageNet-1K wnids, else the labels as they are, else "class N"."""
    if labels is None or len(labels) != num_classes:
        return [f"class {i}" for i in range(num_classes)]
    described = describe_classes(labels)
    return [f"{name} ({wnid})" for name, wnid in zip(described, labels)] if described else list(labels)


def load_predictor(path: str | Path) -> Predictor:
    """The model of a run directory, checkpoint file or export folder, in eval mode, with its class names."""
    weights, source, _ = find_weights(path, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    cfg = config_from_yaml(source.config, f"{weights} (embedded config)")
    model = build_model(cfg, source.num_classes, source.model, weights)
    if isinstance(source, ExportedModel):
        labels = source.label_names
    else:
        labels, _ = class_names(cfg, source.num_classes)
    return Predictor(model, cfg, labels, display_names(labels, source.num_classes), weights, source.step)


def check_image(path: Path) -> None:
    """PredictError naming `path` unless it is a file PIL decodes."""
    if not path.is_file():
        raise PredictError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise PredictError(f"{path}: not an image ({e}); predict reads image files (JPEG, PNG, ...)") from None


@torch.no_grad()
def top_classes(predictor: Predictor, image: Path, size: int, k: int = 5) -> list[tuple[int, float]]:
    """(class index, probability) of the `k` most probable classes of `image`, most probable first."""
    with Image.open(image) as im:
        crop = val_crop(im.convert("RGB"), size, predictor.cfg.data.augmentation)
    probs = predictor.model(normalize(TF.pil_to_tensor(crop)).unsqueeze(0)).float().softmax(-1)[0]
    values, indices = probs.topk(min(k, probs.numel()))
    return [(int(i), float(p)) for i, p in zip(indices, values)]


def main(args: argparse.Namespace) -> int:
    images = [Path(p) for p in args.images]
    for image in images:  # every file before the model loads: a typo fails at once
        check_image(image)
    if args.top < 1:
        raise PredictError(f"--top must be at least 1, got {args.top}")
    if args.size is not None and args.size < 1:
        raise PredictError(f"--size must be at least 1, got {args.size}")
    predictor = load_predictor(args.path)
    size = args.size or predictor.cfg.data.test_sizes[0]
    for image in images:
        top = top_classes(predictor, image, size, args.top)
        if args.json:
            print(json.dumps({"image": str(image), "model": predictor.cfg.model.name, "step": predictor.step,
                              "weights": str(predictor.weights), "size": size,
                              "top": [{"index": i, "label": predictor.labels[i] if predictor.labels else None,
                                       "name": predictor.names[i], "probability": p} for i, p in top]}))
            continue
        print(f"{image}: {predictor.cfg.model.name} step {predictor.step}, {size}x{size} crop")
        for i, p in top:
            print(f"  {p:.4f}  {predictor.names[i]}")
    return 0
