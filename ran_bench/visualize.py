"""`ran-bench visualize`: the soft attention masks of each stage over an image (the paper's Fig. 1).

Every attention module computes its mask M(x) in a child named `mask_activation` (the sigmoid of
mixed attention, the channel L2 normalisation, or the spatial normalise-then-sigmoid), so a
forward hook on each of those children collects every mask of one forward pass. Each mask is
averaged over its channels, resized to the input crop and drawn as a heatmap over it, one panel
per attention module, titled by stage (modules whose masks have the same resolution form a stage).

The model comes from a training checkpoint (`RUN/checkpoints/step_*.pt`, or a run directory for
its newest one) and the config embedded in it, which names the model and its options; the image is
preprocessed like the validation transform (shorter side to size/0.875, centre crop, ImageNet
mean/std).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from ran_bench.checkpoint import find_checkpoint
from ran_bench.config import Config, config_from_yaml, load_config
from ran_bench.data import find_classes
from ran_bench.data.torchvision_loader import normalize, val_crop
from ran_bench.errors import UserError
from ran_bench.models import create_model


class VisualizeError(ValueError, UserError):
    """Bad input to `ran-bench visualize`; the message names the file or flag."""


@dataclass
class Mask:
    """One attention module's mask for one image: `name` is the module's path in the model."""

    name: str
    mask: torch.Tensor  # (C, h, w), as computed by the module
    stage: int = 0
    index: int = 0  # position of the module within its stage, from 1

    @property
    def title(self) -> str:
        h, w = self.mask.shape[-2:]
        return f"stage {self.stage}, module {self.index} ({h}x{w})"


@torch.no_grad()
def attention_masks(model: nn.Module, image: torch.Tensor) -> list[Mask]:
    """The mask of every attention module for one normalised image (1, 3, H, W), in forward order.

    Stages are numbered by the masks' resolutions in the order they occur, so the numbering
    needs nothing from the model but the `mask_activation` children of the contract.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, 3, H, W), got {tuple(image.shape)}")
    masks: list[Mask] = []
    handles = [
        module.mask_activation.register_forward_hook(
            lambda _m, _inputs, output, name=name: masks.append(Mask(name, output[0].detach().float().cpu())))
        for name, module in model.named_modules()
        if isinstance(getattr(module, "mask_activation", None), nn.Module)
    ]
    if not handles:
        raise VisualizeError(f"{type(model).__name__} has no attention modules (no child named "
                             "mask_activation); visualize works on the Residual Attention Networks")
    was_training = model.training
    model.eval()
    try:
        model(image)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    resolutions: list[tuple[int, int]] = []
    index = 0
    for m in masks:
        size = tuple(m.mask.shape[-2:])
        if not resolutions or resolutions[-1] != size:
            resolutions.append(size)
            index = 0
        index += 1
        m.stage, m.index = len(resolutions), index
    return masks


def preprocess(path: str | Path, size: int, augmentation: str = "imagenet") -> tuple[np.ndarray, torch.Tensor]:
    """The validation transform of `path` for the run's `data.augmentation` (the CIFAR recipe tests
    without the 0.875 enlargement): (the crop as uint8 HxWx3, the normalised 1x3xHxW tensor)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise VisualizeError(f"--image {path}: cannot read the image ({e})") from None
    crop = TF.pil_to_tensor(val_crop(img, size, augmentation))
    return crop.permute(1, 2, 0).numpy(), normalize(crop).unsqueeze(0)


def plot_masks(crop: np.ndarray, masks: list[Mask], path: str | Path, title: str = "") -> list[str]:
    """Draw the input crop and one heatmap panel per mask over it; returns the panel titles.

    Each mask is averaged over channels and resized bilinearly to the crop. The colours span each
    panel's own range (written in its title), so the spatial pattern is visible whatever the level.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(masks) + 1
    cols = min(4, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.5 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(crop)
    axes.flat[0].set_title("input (val crop)", fontsize=9)
    titles = []
    for ax, m in zip(axes.flat[1:], masks):
        heat = F.interpolate(m.mask.mean(0)[None, None], size=crop.shape[:2], mode="bilinear",
                             align_corners=False)[0, 0].numpy()
        low, high = float(heat.min()), float(heat.max())
        ax.imshow(crop)
        ax.imshow(heat, cmap="jet", alpha=0.5, vmin=low, vmax=high if high > low else low + 1e-6)
        ax.set_title(f"{m.title}\nmean mask {low:.2f}-{high:.2f}", fontsize=8)
        titles.append(m.title)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return titles


def load_model(checkpoint: str | Path, config: str | Path | None = None) -> tuple[nn.Module, Config, Path]:
    """The model of a training checkpoint (a checkpoint file, or a run directory for its newest
    readable one), built from the config embedded in it (or `config`) with the saved weights.
    Returns (model in eval mode, the run's Config, the checkpoint file)."""
    path, ckpt, _ = find_checkpoint(checkpoint)
    cfg = load_config(config) if config is not None else config_from_yaml(ckpt.config, f"{path} (embedded config)")
    model = create_model(cfg.model.name, num_classes=ckpt.num_classes, **cfg.model.options)
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise VisualizeError(f"{path}: its weights do not fit {cfg.model.name} as {config} builds it "
                             f"({str(e).splitlines()[0]}); is --config the checkpoint's run config?") from None
    return model.eval(), cfg, path


def _class_names(cfg: Config) -> list[str]:
    """Class folder names of the run's data set (sorted, as the loaders index them), if reachable."""
    if cfg.data.root and Path(cfg.data.root, "train").is_dir():
        return find_classes(cfg.data.root)
    return []


def main(args: argparse.Namespace) -> int:
    model, cfg, checkpoint = load_model(args.checkpoint, args.config)
    size = args.size or cfg.data.test_sizes[0]
    crop, image = preprocess(args.image, size, cfg.data.augmentation)
    masks = attention_masks(model, image)
    with torch.no_grad():
        probs = model(image).softmax(-1)[0]
    top = int(probs.argmax())
    names = _class_names(cfg)
    label = names[top] if len(names) == len(probs) else f"class {top}"
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot_masks(crop, masks, output, f"{cfg.model.name} ({checkpoint.name}), {Path(args.image).name} at "
                                    f"{size}x{size}: predicted {label} (p={float(probs[top]):.2f})")
    print(f"wrote {output}: {len(masks)} attention masks in {len({m.stage for m in masks})} stages")
    return 0
