"""What the modes time: the model, the batches, and one training step of the trainer, of a bare
PyTorch loop and of timm's benchmark recipe."""

from __future__ import annotations

import copy
import itertools
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import timm.optim
import torch
import torch.nn as nn

from ran_bench.bench import BenchError
from ran_bench.config import Config
from ran_bench.data import list_samples
from ran_bench.models import count_macs, count_params, create_model
from ran_bench.recipe import build_criterion, build_optimizer, train_step
from ran_bench.runtime import autocast

Batch = tuple[torch.Tensor, torch.Tensor]


def build_model(name: str, size: int, device: torch.device, *, channels_last: bool) -> tuple[nn.Module, int, int]:
    """The registered model on `device` (channels_last if asked), its parameters and its
    multiply-adds at `size` (counted before any compilation)."""
    model = create_model(name).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, count_params(model), count_macs(model, size)


def make_batches(n: int, *, batch_size: int, size: int, num_classes: int, device: torch.device,
                 channels_last: bool, seed: int = 0) -> list[Batch]:
    """`n` different random (images, labels) batches made once on `device`: the same inputs for
    every loop the overhead check compares."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        images = torch.randn(batch_size, 3, size, size, generator=g).to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(num_classes, (batch_size,), generator=g).to(device)
        batches.append((images, labels))
    return batches


def endless(loader) -> Iterator[Batch]:
    """Batches of `loader` across epochs (set_epoch before each pass, as the trainer does)."""
    if len(loader) == 0:
        raise BenchError(f"the loader has no full batch per process ({loader.num_samples} samples, batch "
                         f"{loader.batch_size}); lower --batch-size or use a larger --data-root")
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def describe_images(root: str | os.PathLike, name: str | None = None) -> str:
    """`ROOT (N JPEGs, K kB mean)` for the training images a row read (`name` instead of a
    temporary ROOT): a path alone says nothing once the machine that ran the benchmark is gone."""
    files, _, _ = list_samples(str(root), "train")
    kb = statistics.mean(Path(f).stat().st_size for f in files) / 1024
    return f"{name or root} ({len(files)} JPEGs, {kb:.0f} kB mean)"


def trainer_parts(model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The trainer's loss and optimizer for `model`, built by the trainer's own builders from the
    default recipe (`ran_bench.config.OptimConfig`: Nesterov SGD, momentum 0.9, weight
    decay 1e-4, learning rate 0.1 per 256 images; cross-entropy)."""
    cfg = Config()
    return build_criterion(cfg), build_optimizer(cfg, model)


def trainer_step_fn(accelerator, model: nn.Module, optimizer, criterion,
                    batches: Iterator) -> Callable[[], torch.Tensor]:
    """One call = one real training step of the trainer (`ran_bench.recipe.train_step`) on the next batch."""

    def step() -> torch.Tensor:
        images, labels = next(batches)
        return train_step(accelerator, model, optimizer, criterion, images, labels)

    return step


def _backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler | None) -> None:
    """Backward pass and optimizer step, through the gradient scaler for fp16."""
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def bare_step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                 batches: Iterator, *, device: torch.device, precision: str) -> Callable[[], torch.Tensor]:
    """One call = forward (under the same autocast), loss, backward, optimizer step, zero_grad in
    plain PyTorch: the floor the trainer's step is compared with."""
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step() -> torch.Tensor:
        images, labels = next(batches)
        with autocast(device, precision):
            loss = criterion(model(images), labels)
        _backward_and_step(loss, optimizer, scaler)
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _class_path(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__name__}"


def timm_counterpart(name: str, ours: nn.Module, *, num_classes: int) -> tuple[nn.Module | None, str]:
    """`timm.create_model(name)` when it is the benchmarked network (same class, same parameter
    count), with its class path; otherwise None and why. Our models reach timm through the registry
    mirror, but for names timm owns (resnet152, resnet200, ...) timm builds its own model, and a
    step-time ratio between two different networks says nothing about the trainer's overhead."""
    if not timm.is_model(name):
        return None, "not run: not in timm's registry"
    model = timm.create_model(name, num_classes=num_classes)
    if type(model) is not type(ours) or count_params(model) != count_params(ours):
        return None, (f"not run: timm builds {_class_path(model)} ({count_params(model):,} parameters) "
                      f"for {name!r}, not the benchmarked {_class_path(ours)} ({count_params(ours):,} parameters)")
    return model, _class_path(model)


def timm_step_fn(model: nn.Module, batches: Iterator, *, device: torch.device, precision: str,
                 channels_last: bool, compile: bool) -> Callable[[], torch.Tensor]:
    """The training step of timm's `benchmark.py` (TrainBenchmarkRunner), which ships in timm's
    repository but not in its wheel, on `model` (from `timm_counterpart`):
    `timm.optim.create_optimizer_v2` with opt="sgd", lr=1e-4, cross-entropy, then zero_grad,
    forward and loss under autocast, backward, optimizer step. Inputs are our pre-made batches
    instead of one `torch.randn` batch."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = timm.optim.create_optimizer_v2(model, opt="sgd", lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if compile:
        model = torch.compile(model)

    def step() -> torch.Tensor:
        images, labels = next(batches)
        optimizer.zero_grad()
        with autocast(device, precision):
            loss = loss_fn(model(images), labels)
        _backward_and_step(loss, optimizer, scaler)
        return loss.detach()

    return step


@dataclass
class OverheadArms:
    """The trainer's step and a bare PyTorch loop on two copies of one model (same weights, same
    optimizer settings, same loss) that cycle through the same pre-made batches."""

    trainer_model: nn.Module
    bare_model: nn.Module
    trainer_step: Callable[[], torch.Tensor]
    bare_step: Callable[[], torch.Tensor]


def overhead_arms(accelerator, model: nn.Module, batches: Sequence[Batch], *,
                  precision: str, compile: bool) -> OverheadArms:
    """Set up the overhead comparison from `model` as it is now (it is copied, not trained)."""
    trainer_model, bare_model = copy.deepcopy(model), copy.deepcopy(model)
    criterion_t, optimizer_t = trainer_parts(trainer_model)
    criterion_b, optimizer_b = trainer_parts(bare_model)
    run_t = torch.compile(trainer_model) if compile else trainer_model
    run_b = torch.compile(bare_model) if compile else bare_model
    run_t, optimizer_t = accelerator.prepare(run_t, optimizer_t)
    return OverheadArms(
        trainer_model=trainer_model,
        bare_model=bare_model,
        trainer_step=trainer_step_fn(accelerator, run_t, optimizer_t, criterion_t, itertools.cycle(batches)),
        bare_step=bare_step_fn(run_b, optimizer_b, criterion_b, itertools.cycle(batches), device=accelerator.device,
                               precision=precision),
    )
