"""The training recipe as code: the optimizer, the loss, the learning-rate schedule and one step.

The trainer, the benchmarks and the roofline count all build these from here, so what they time
and count is what a run trains with.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ran_bench.config import Config, lr_at


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.SGD:
    """The recipe's optimizer: SGD at the base learning rate of the run's global batch, in the
    implementation `sgd_implementation` picks for the device of the model's parameters."""
    device = next(model.parameters()).device
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov,
                           weight_decay=cfg.optim.weight_decay, **sgd_implementation(device))


def sgd_implementation(device: torch.device) -> dict[str, bool]:
    """SGD's keyword for `device`: fused on CUDA (one kernel updates every parameter, reading each
    weight, gradient and momentum once; torch >= 2.4 has it), foreach elsewhere (CPU, meta), the
    same update as torch's per-tensor loop."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def build_criterion(cfg: Config) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate of `lr_at`, stepped once per optimizer step by the loop (not prepared by
    Accelerate, which would step it once per process)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(cfg, step) / cfg.lr)


def train_step(accelerator, model: nn.Module, optimizer, criterion: nn.Module, images: torch.Tensor,
               labels: torch.Tensor) -> torch.Tensor:
    """One micro-batch: forward under autocast, loss, backward, optimizer step, zero_grad.

    Inside the caller's `accelerator.accumulate(model)` the prepared optimizer only steps (and
    DDP only all-reduces gradients) on the last micro-batch of an optimizer step. Returns the
    detached loss of this micro-batch.
    """
    with accelerator.autocast():
        loss = criterion(model(images), labels)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
