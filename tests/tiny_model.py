"""A tiny test-only model for the trainer tests, and an entry point that registers it.

`python tests/tiny_model.py train ...` and `torchrun ... tests/tiny_model.py train ...` run the
`ran-bench` command line with `test_tiny_net` registered, so trainer tests take seconds.
"""

from __future__ import annotations

import sys

import torch.nn as nn

from ran_bench.models import register_model


class TinyNet(nn.Module):
    """Two convolutions and a classifier; `norm="group"` has no BatchNorm, so its result does not
    depend on how a global batch is split over processes."""

    def __init__(self, num_classes: int = 10, norm: str = "batch"):
        super().__init__()

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(4, c)

        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), norm_layer(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), norm_layer(16), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


@register_model(input_size=32, dataset="cifar")
def test_tiny_net(num_classes: int = 10, **overrides) -> TinyNet:
    return TinyNet(num_classes=num_classes, **overrides)


if __name__ == "__main__":
    from ran_bench.cli import main

    sys.exit(main())
