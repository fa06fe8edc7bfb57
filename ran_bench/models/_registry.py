"""Model registry: builder functions registered by name, mirrored into timm's registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn
from timm.models import _registry as timm_registry
from timm.models import load_pretrained, resolve_pretrained_cfg

from ran_bench.errors import UserError


class UnknownModelError(UserError, KeyError):
    """A model name that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of ran-bench needs to know about a registered model."""

    name: str
    builder: Callable[..., nn.Module]
    input_size: int  # the paper's train/test input side (224, 299 or 32)
    dataset: str  # "imagenet" or "cifar"
    default_num_classes: int


_MODELS: dict[str, ModelInfo] = {}


def register_model(*, input_size: int = 224, dataset: str = "imagenet"):
    """Decorator registering `builder(num_classes=..., **overrides)` under its function name."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        default_classes = 1000 if dataset == "imagenet" else 10
        _MODELS[name] = ModelInfo(name, builder, input_size, dataset, default_classes)
        _register_with_timm(_MODELS[name])
        return builder

    return wrap


def _register_with_timm(info: ModelInfo) -> None:
    """Make `timm.create_model(name)` build our model, and `pretrained=True` load the weights timm's
    pretrained config points to: `pretrained_cfg_overlay=dict(file=...)`, or the folder of
    `timm.create_model("local-dir:EXPORT_DIR")` (see `ran-bench export`)."""
    name, builder = info.name, info.builder
    if name in timm_registry._model_entrypoints:
        # timm already has a model of that name (for example resnet152); keep timm's, ours stays
        # reachable through ran_bench.models.create_model.
        return

    def timm_entrypoint(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
        # timm passes these to every entrypoint; our builders take only their constructor options.
        for key in ("cache_dir", "pretrained_model_args"):
            kwargs.pop(key, None)
        if not pretrained:
            return builder(**kwargs)
        return _load_pretrained(info, pretrained_cfg, pretrained_cfg_overlay, kwargs)

    timm_entrypoint.__name__ = name
    timm_entrypoint.__module__ = builder.__module__
    timm_registry.register_model(timm_entrypoint)


def _load_pretrained(info: ModelInfo, pretrained_cfg, overlay: dict | None, kwargs: dict) -> nn.Module:
    """Our model with the weights of a timm pretrained config that locates some (the authors
    released none, so only an export's exist); num_classes defaults to the config's."""
    # The recipes' validation transform: bilinear; CIFAR tests the native image, ImageNet crops 0.875.
    default = {"architecture": info.name, "num_classes": info.default_num_classes, "interpolation": "bilinear",
               "input_size": (3, info.input_size, info.input_size),
               "crop_pct": 1.0 if info.dataset == "cifar" else 0.875}
    cfg = resolve_pretrained_cfg(info.name, pretrained_cfg or default, overlay).to_dict()
    if not any(cfg.get(key) for key in ("file", "state_dict", "url", "hf_hub_id")):
        raise ValueError(f"{info.name}: no pretrained weights exist (the authors released none); load an export of "
                         "`ran-bench export` with pretrained_cfg_overlay=dict(file='EXPORT_DIR/model.safetensors')")
    kwargs.setdefault("num_classes", cfg["num_classes"])
    model = info.builder(**kwargs)
    model.pretrained_cfg = model.default_cfg = cfg
    load_pretrained(model, cfg, num_classes=kwargs["num_classes"])
    return model


def create_model(name: str, num_classes: int | None = None, **overrides) -> nn.Module:
    """Build a registered model by name; `overrides` go to its constructor."""
    info = model_info(name)
    if num_classes is None:
        num_classes = info.default_num_classes
    return info.builder(num_classes=num_classes, **overrides)


def model_info(name: str) -> ModelInfo:
    """The registry entry of `name`, with a clear error listing the known names."""
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(sorted(_MODELS))}") from None


def list_models(dataset: str | None = None) -> list[str]:
    """Registered model names (optionally only 'imagenet' or 'cifar'), in registration order."""
    return [n for n, i in _MODELS.items() if dataset is None or i.dataset == dataset]
