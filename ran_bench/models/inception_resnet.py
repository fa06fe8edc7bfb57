"""Inception-ResNet-v1 for ImageNet, and the Inception-ResNet residual units it is built from.

Szegedy, Ioffe, Vanhoucke, Alemi, "Inception-v4, Inception-ResNet and the Impact of Residual
Connections on Learning", AAAI 2017 (arXiv:1602.07261). timm ships Inception-ResNet-v2 (wrapped in
`baselines.py`) but no ImageNet Inception-ResNet-v1 (facenet-pytorch's is a face-embedding model),
so v1 is written here from the paper:

    stem (Fig. 14) -> 5 x Inception-ResNet-A (Fig. 10) -> Reduction-A (Fig. 7; k, l, m, n =
    192, 192, 256, 384) -> 10 x Inception-ResNet-B (Fig. 11) -> Reduction-B (Fig. 12) ->
    5 x Inception-ResNet-C (Fig. 13) -> global average pool -> dropout (keep 0.8) -> FC.

Every convolution is conv-BN-ReLU except the linear 1x1 that expands the concatenated branches
back to the unit's width (the paper puts BatchNorm "on top of the traditional layers, but not on
top of the summations"). Residuals are scaled before the addition (the paper scales by 0.1-0.3;
the values 0.17 / 0.10 / 0.20 for A / B / C are those of the authors' TF-slim Inception-ResNet,
also used by timm's v2).

The units take `in_chs`, `out_chs`, `stride` and `branch_chs`, so AttentionInception-56
(`attention_inception.py`) reuses them with the widths of the attention network's stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import ConvNormAct

from ran_bench.models._registry import register_model

__all__ = [
    "InceptionResNetUnit",
    "InceptionResNetA",
    "InceptionResNetB",
    "InceptionResNetC",
    "InceptionResNetV1",
    "inception_resnet_v1",
]


class InceptionResNetUnit(nn.Module):
    """The residual wiring of all Inception-ResNet units.

    out = ReLU(shortcut(x) + scale * expand(concat(branch(x) for each branch))), where `expand` is a
    linear 1x1 convolution (with bias, no BatchNorm). The shortcut is the identity, or a 1x1
    convolution with BatchNorm (stride `stride`) when the unit changes width or resolution.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        branches: Sequence[nn.Module],
        branches_chs: int,
        stride: int = 1,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.branches = nn.ModuleList(branches)
        self.expand = nn.Conv2d(branches_chs, out_chs, kernel_size=1, bias=True)
        if stride != 1 or in_chs != out_chs:
            self.shortcut: nn.Module = ConvNormAct(in_chs, out_chs, 1, stride=stride, apply_act=False)
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.expand(torch.cat([branch(x) for branch in self.branches], dim=1))
        return self.act(self.shortcut(x) + self.scale * residual)


class InceptionResNetA(InceptionResNetUnit):
    """Inception-ResNet-A (paper Fig. 10; the 35x35 grid): 1x1 | 1x1-3x3 | 1x1-3x3-3x3.

    Inception-ResNet-v1 uses 256 channels and 32 per branch. With `stride` 2 the stride sits on
    the 1x1 of the first branch and on the first 3x3 of the others.
    """

    def __init__(
        self, in_chs: int = 256, out_chs: int | None = None, stride: int = 1, branch_chs: int = 32, scale: float = 0.17
    ) -> None:
        w = branch_chs
        branches = [
            ConvNormAct(in_chs, w, 1, stride=stride),
            nn.Sequential(ConvNormAct(in_chs, w, 1), ConvNormAct(w, w, 3, stride=stride)),
            nn.Sequential(ConvNormAct(in_chs, w, 1), ConvNormAct(w, w, 3, stride=stride), ConvNormAct(w, w, 3)),
        ]
        super().__init__(in_chs, out_chs or in_chs, branches, 3 * w, stride=stride, scale=scale)


class InceptionResNetB(InceptionResNetUnit):
    """Inception-ResNet-B (paper Fig. 11; the 17x17 grid): 1x1 | 1x1-1x7-7x1.

    Inception-ResNet-v1 uses 896 channels and 128 per branch. With `stride` 2 the 1x7 carries the
    horizontal and the 7x1 the vertical stride, so the factorised pair acts as one strided 7x7.
    """

    def __init__(
        self, in_chs: int = 896, out_chs: int | None = None, stride: int = 1, branch_chs: int = 128, scale: float = 0.10
    ) -> None:
        w = branch_chs
        branches = [
            ConvNormAct(in_chs, w, 1, stride=stride),
            nn.Sequential(
                ConvNormAct(in_chs, w, 1),
                ConvNormAct(w, w, (1, 7), stride=(1, stride)),
                ConvNormAct(w, w, (7, 1), stride=(stride, 1)),
            ),
        ]
        super().__init__(in_chs, out_chs or in_chs, branches, 2 * w, stride=stride, scale=scale)


class InceptionResNetC(InceptionResNetUnit):
    """Inception-ResNet-C (paper Fig. 13; the 8x8 grid): 1x1 | 1x1-1x3-3x1.

    Inception-ResNet-v1 uses 1792 channels and 192 per branch; `stride` is placed as in
    `InceptionResNetB`.
    """

    def __init__(
        self, in_chs: int = 1792, out_chs: int | None = None, stride: int = 1, branch_chs: int = 192,
        scale: float = 0.20,
    ) -> None:
        w = branch_chs
        branches = [
            ConvNormAct(in_chs, w, 1, stride=stride),
            nn.Sequential(
                ConvNormAct(in_chs, w, 1),
                ConvNormAct(w, w, (1, 3), stride=(1, stride)),
                ConvNormAct(w, w, (3, 1), stride=(stride, 1)),
            ),
        ]
        super().__init__(in_chs, out_chs or in_chs, branches, 2 * w, stride=stride, scale=scale)


class _Concat(nn.Module):
    """Runs parallel branches on the same input and concatenates them along channels."""

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


def stem_v1(in_chans: int = 3) -> nn.Sequential:
    """The Inception-ResNet-v1 stem (paper Fig. 14): 299x299x3 -> 35x35x256, "V" = no padding."""
    return nn.Sequential(
        ConvNormAct(in_chans, 32, 3, stride=2, padding=0),
        ConvNormAct(32, 32, 3, padding=0),
        ConvNormAct(32, 64, 3),
        nn.MaxPool2d(3, stride=2),
        ConvNormAct(64, 80, 1),
        ConvNormAct(80, 192, 3, padding=0),
        ConvNormAct(192, 256, 3, stride=2, padding=0),
    )


def reduction_a(in_chs: int = 256, k: int = 192, l: int = 192, m: int = 256, n: int = 384) -> _Concat:  # noqa: E741 (the paper names them k, l, m, n)
    """Reduction-A (paper Fig. 7; Table 1 gives k, l, m, n for each network): 35x35 -> 17x17."""
    return _Concat(
        nn.MaxPool2d(3, stride=2),
        ConvNormAct(in_chs, n, 3, stride=2, padding=0),
        nn.Sequential(ConvNormAct(in_chs, k, 1), ConvNormAct(k, l, 3), ConvNormAct(l, m, 3, stride=2, padding=0)),
    )


def reduction_b_v1(in_chs: int = 896) -> _Concat:
    """Inception-ResNet-v1's Reduction-B (paper Fig. 12): 17x17x896 -> 8x8x1792."""
    return _Concat(
        nn.MaxPool2d(3, stride=2),
        nn.Sequential(ConvNormAct(in_chs, 256, 1), ConvNormAct(256, 384, 3, stride=2, padding=0)),
        nn.Sequential(ConvNormAct(in_chs, 256, 1), ConvNormAct(256, 256, 3, stride=2, padding=0)),
        nn.Sequential(
            ConvNormAct(in_chs, 256, 1), ConvNormAct(256, 256, 3), ConvNormAct(256, 256, 3, stride=2, padding=0)
        ),
    )


class InceptionResNetV1(nn.Module):
    """Inception-ResNet-v1 (ImageNet): 5 A units, Reduction-A, 10 B units, Reduction-B, 5 C units.

    Global average pooling makes the parameter count independent of the input size; the paper's
    input is 299x299 (8x8 before pooling).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.2) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 1792
        self.stem = stem_v1(in_chans)
        self.blocks_a = nn.Sequential(*[InceptionResNetA(256, branch_chs=32, scale=0.17) for _ in range(5)])
        self.reduction_a = reduction_a(256, k=192, l=192, m=256, n=384)
        self.blocks_b = nn.Sequential(*[InceptionResNetB(896, branch_chs=128, scale=0.10) for _ in range(10)])
        self.reduction_b = reduction_b_v1(896)
        self.blocks_c = nn.Sequential(*[InceptionResNetC(1792, branch_chs=192, scale=0.20) for _ in range(5)])
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head_drop = nn.Dropout(drop_rate)  # the paper's dropout keeps 0.8 of the activations
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.reduction_a(self.blocks_a(x))
        x = self.reduction_b(self.blocks_b(x))
        return self.blocks_c(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head_drop(self.global_pool(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(input_size=299, dataset="imagenet")
def inception_resnet_v1(num_classes: int = 1000, **kwargs) -> InceptionResNetV1:
    """Inception-ResNet-v1 (Szegedy et al. 2016), the Table 7 baseline of AttentionInception-56."""
    return InceptionResNetV1(num_classes=num_classes, **kwargs)
