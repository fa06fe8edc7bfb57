"""Model registry: builder functions registered by name, mirrored into timm's registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn
from timm.models import _registry as timm_registry

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
        _register_with_timm(name, builder)
        return builder

    return wrap


def _register_with_timm(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make `timm.create_model(name)` build our model (timm passes pretrained=..., pretrained_cfg...)."""
    if name in timm_registry._model_entrypoints:
        # timm already has a model of that name (for example resnet152); keep timm's, ours stays
        # reachable through ran_bench.models.create_model.
        return

    def timm_entrypoint(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"{name}: no pretrained weights exist (the authors released none)")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return builder(**kwargs)

    timm_entrypoint.__name__ = name
    timm_entrypoint.__module__ = builder.__module__
    timm_registry.register_model(timm_entrypoint)


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
