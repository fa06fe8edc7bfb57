"""Counting a model: learnable parameters, and multiply-adds the way the paper counts them."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

MAC_CONVENTION = (
    "multiply-adds (MACs) of one forward pass of one image = FLOPs / 2 counted by "
    "torch.utils.flop_counter: convolutions and matrix products (classifier) only, as in the paper"
)


def count_params(model: nn.Module) -> int:
    """Number of learnable parameters (BatchNorm counts 2 per channel: weight and bias)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, input_size: int | tuple[int, ...]) -> int:
    """Multiply-adds of one forward pass of one image of side `input_size` (or shape (C, H, W)).

    The model is run once in eval mode under `FlopCounterMode`; its train/eval mode is restored.
    """
    shape = (3, input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.zeros(1, *shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
