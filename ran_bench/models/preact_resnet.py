"""Pre-activation residual units and the CIFAR pre-activation ResNet-164.

The unit follows "Identity Mappings in Deep Residual Networks" (He et al., 2016) exactly as the
Residual Attention Network's released Caffe definitions use it:

- BatchNorm-ReLU before each of the three convolutions (1x1, 3x3, 1x1), no convolution bias;
- the stride sits on the 3x3 convolution;
- a projection shortcut (when the width or the resolution changes) is a 1x1 convolution with the
  stride, applied to the *pre-activated* input and with no BatchNorm of its own;
- an identity shortcut adds the raw (not pre-activated) input.

A network built from these units therefore ends with a BatchNorm-ReLU before its pooling.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ran_bench.models._registry import register_model

__all__ = ["PreActBottleneck", "PreActResNet", "cifar_resnet164", "init_weights"]


def init_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan-out), BatchNorm at weight 1 / bias 0, as in torchvision's ResNets."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck unit `unit(in_channels, out_channels, stride)`.

    The inner (bottleneck) width is `out_channels // 4` unless given.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, width: int | None = None):
        super().__init__()
        width = width or out_channels // 4
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        needs_projection = stride != 1 or in_channels != out_channels
        # Projection of the pre-activated input, unnormalised, as in the released definitions.
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation bottleneck ResNet for CIFAR (32x32): a 3x3 stem and three stages.

    `depth = 9n + 2` gives n units per stage with inner widths 16/32/64 and outputs 64/128/256
    (ResNet-164: n = 18, 1.7 M parameters in the Residual Attention paper's Table 6).
    """

    def __init__(self, depth: int = 164, num_classes: int = 10, in_chans: int = 3, stem_width: int = 16):
        super().__init__()
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(f"PreActResNet depth must be 9n + 2 with n >= 1 (e.g. 164), got {depth}")
        n = (depth - 2) // 9
        self.stem = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        in_ch = stem_width
        for i, out_ch in enumerate((4 * stem_width, 8 * stem_width, 16 * stem_width)):
            for j in range(n):
                layers.append(PreActBottleneck(in_ch, out_ch, stride=2 if i > 0 and j == 0 else 1))
                in_ch = out_ch
        self.layers = nn.Sequential(*layers)
        self.norm = nn.BatchNorm2d(in_ch)  # the last units are pre-activation: normalise before pooling
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(self.layers(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model(input_size=32, dataset="cifar")
def cifar_resnet164(num_classes: int = 10, **kwargs) -> PreActResNet:
    """Pre-activation ResNet-164 for CIFAR, the paper's Table 5 and 6 baseline (1.7 M parameters)."""
    return PreActResNet(depth=164, num_classes=num_classes, **kwargs)
