"""Residual Attention Networks (Wang et al., CVPR 2017): Attention-56/92, AttentionNeXt-56/92 and
the CIFAR Attention-56 ... Attention-452.

The structure follows the authors' released Caffe definitions (see ../shared/reference/paper.md):

- An attention module is p residual units, then a trunk of t units and a soft mask branch side by
  side (the mask branch starts from the output of the p units), their merge, then r units.
- The mask branch is bottom-up top-down. Going down, each level is a 3x3/2 max pool and one unit
  (two at the deepest level). Going up, the map is resized bilinearly to the size of the matching
  down-path map, the skip unit's output (one unit applied to that down-path map) is added once,
  and one unit follows. The last resize goes to the trunk output's size. Every resize takes the
  size of the map it meets, so any input size the network's stride allows works.
- The number of levels depends on the stage: 3 at stage 1 (56x56 on ImageNet, 2 skips), 2 at
  stage 2 (28x28, 1 skip), 1 at stage 3 (14x14, none): each stage's mask bottoms out at 7x7.
- The mask head is BN-ReLU-1x1 conv, BN-ReLU-1x1 conv (channels unchanged) and the child module
  `mask_activation` (a sigmoid for mixed attention), whose output is the mask M(x). With
  post-activation units (AttentionNeXt), whose outputs already pass a ReLU, the released
  definition starts the head with the 1x1 conv directly (`preact_units=False`).
- The output is (1 + M(x)) * T(x) (attention residual learning, ARL).

None of the defects of the commonly copied PyTorch port are reproduced here: no hard-coded
upsampling sizes, no fixed 7x7 average pool, no extra addition of the down-path map beside the
skip unit, no addition of the trunk output into the last upsampled mask, no BatchNorm after the
projection shortcut.

Options used by the paper's ablations (constructor arguments of `AttentionModule` and of the
networks, so `create_model("cifar_attention56", attention="channel")` works):

- `attention`: "mixed" (f1, sigmoid per channel and position), "channel" (f2, L2 normalisation
  over channels at each position) or "spatial" (f3, each channel standardised over positions,
  then a sigmoid);
- `residual_attention`: True for ARL, (1 + M) * T; False for naive attention learning, M * T;
- `mask`: "encoder_decoder" (bottom-up top-down) or "local_conv" (the same units in the same
  order with the poolings and resizes removed, so the mask is computed at the trunk's resolution).

CIFAR (32x32): the paper gives no layer table. These networks follow pre-activation ResNet-164:
a 3x3 conv stem of 16 channels, stages of 64/128/256 channels (inner widths 16/32/64) at 32x32,
16x16 and 8x8, each one unit then m attention modules, then three more units at 8x8 with 256
channels, so the trunk depth is 36m + 20 as on ImageNet (m = 1, 2, 3, 4, 6 for 56 ... 236). The
masks keep the ImageNet stages' depths, 3/2/1 poolings with 2/1/0 skips: as on ImageNet, every
stage's mask bottoms out at one common size, 4x4 here (32 -> 4, 16 -> 4, 8 -> 4). Stopping at the
smallest trunk map instead (8x8, as 7x7 is on ImageNet) would leave stage 3 with no down-sampling
at all, so no encoder-decoder to compare with local convolutions (Table 4). Attention-452 takes
p, t, r = 2, 4, 3 with m = 6 as given for it; note that with those values the 36m + 20 rule does
not hold (its trunk has 9m(p + t + r) + 20 = 506 weighted layers), and it has 7.99 M parameters
against Table 6's 8.6 M.

Reuse with other residual units: every network here is a `ResidualAttentionNet` built from a list
of `StageSpec`s, a stem module and a `unit` factory `unit(in_channels, out_channels, stride) ->
nn.Module` (a residual unit whose output has `out_channels` channels and is `stride` times
smaller). AttentionInception-56 plugs in Inception-ResNet units that way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ran_bench.models._registry import register_model
from ran_bench.models.preact_resnet import PreActBottleneck, init_weights

__all__ = [
    "attention56",
    "attention92",
    "attentionnext56",
    "attentionnext92",
    "cifar_attention56",
    "cifar_attention92",
    "cifar_attention128",
    "cifar_attention164",
    "cifar_attention236",
    "cifar_attention452",
    "ATTENTION_TYPES",
    "MASK_TYPES",
    "AttentionModule",
    "ChannelL2Norm",
    "MaskBranch",
    "ResNeXtBottleneck",
    "ResidualAttentionNet",
    "SpatialNormSigmoid",
    "StageSpec",
    "UnitFactory",
    "imagenet_stages",
    "imagenet_stem",
]

UnitFactory = Callable[[int, int, int], nn.Module]
"""`unit(in_channels, out_channels, stride)` -> a residual unit."""

ATTENTION_TYPES = ("mixed", "channel", "spatial")
MASK_TYPES = ("encoder_decoder", "local_conv")


# --------------------------------------------------------------------------------------------
# Mask activations f1, f2, f3 (paper Section 3.3, Table 1)


class ChannelL2Norm(nn.Module):
    """Channel attention f2: x_{i,c} / ||x_i||, the L2 norm taken over channels at each position."""

    def __init__(self, eps: float = 1e-12):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=1, eps=self.eps)


class SpatialNormSigmoid(nn.Module):
    """Spatial attention f3: sigmoid((x_{i,c} - mean_c) / std_c), each channel of each image
    standardised over its positions (population variance, `eps` added as in BatchNorm)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        return torch.sigmoid((x - mean) * torch.rsqrt(var + self.eps))


def _mask_activation(attention: str) -> nn.Module:
    return {"mixed": nn.Sigmoid, "channel": ChannelL2Norm, "spatial": SpatialNormSigmoid}[attention]()


def _check_options(attention: str, residual_attention: bool, mask: str) -> None:
    """Clear errors for the ablation options, naming the allowed values and what they mean."""
    if attention not in ATTENTION_TYPES:
        raise ValueError(f"attention={attention!r} is not one of {', '.join(map(repr, ATTENTION_TYPES))} "
                         "(mixed = sigmoid f1, channel = L2 norm over channels f2, "
                         "spatial = standardise each channel then sigmoid f3)")
    if not isinstance(residual_attention, bool):
        raise TypeError(f"residual_attention must be True (ARL, (1 + M) * T) or False (NAL, M * T), "
                        f"got {residual_attention!r}")
    if mask not in MASK_TYPES:
        raise ValueError(f"mask={mask!r} is not one of {', '.join(map(repr, MASK_TYPES))} "
                         "(encoder_decoder = bottom-up top-down mask, local_conv = same units without down/up "
                         "sampling)")


# --------------------------------------------------------------------------------------------
# The attention module


class MaskBranch(nn.Module):
    """Bottom-up top-down soft mask branch (without its head) of `depth` levels.

    Down: level i = max-pool 3x3/2 then one unit (two at the deepest level). Up, from the deepest
    level: resize to the size of the level-i map, add skip_i(level-i map), one unit. Finally resize
    to `size`. With `local=True` the poolings and resizes are left out (Table 4's local
    convolutions): the same units at the input's resolution.
    """

    def __init__(self, channels: int, unit: UnitFactory, depth: int, local: bool = False):
        super().__init__()
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"mask depth must be an integer >= 1 (number of poolings), got {depth!r}")
        self.depth = depth
        self.local = local
        # padding=1 gives ceil(n / 2), the sizes of the Caffe definitions' ceil-mode pooling (56 -> 28 -> 14 -> 7).
        self.pool = nn.Identity() if local else nn.MaxPool2d(3, stride=2, padding=1)
        self.down = nn.ModuleList(
            nn.Sequential(*(unit(channels, channels, 1) for _ in range(2 if i == depth - 1 else 1)))
            for i in range(depth)
        )
        self.skips = nn.ModuleList(unit(channels, channels, 1) for _ in range(depth - 1))
        self.up = nn.ModuleList(unit(channels, channels, 1) for _ in range(depth - 1))

    def _resize(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.local or tuple(x.shape[-2:]) == tuple(size):
            return x
        # Corner-aligned bilinear interpolation, as the Caffe Interp layer of the released definitions.
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        features = []
        for down in self.down:
            x = down(self.pool(x))
            features.append(x)
        # Up path: level depth-2 ... 0; skips[i] and up[i] belong to level i.
        for i in reversed(range(self.depth - 1)):
            skip = features[i]
            x = self._resize(x, skip.shape[-2:]) + self.skips[i](skip)
            x = self.up[i](x)
        return self._resize(x, size)


class AttentionModule(nn.Module):
    """One attention module: p units, then trunk (t units) and soft mask side by side, merge, r units.

    Output of the merge: (1 + M) * T with `residual_attention=True` (ARL), M * T otherwise (NAL),
    with M = `self.mask_activation(mask_head(mask_branch(x)))`. `preact_units` says whether `unit`
    is a pre-activation unit (see `ResidualAttentionNet`).
    """

    def __init__(
        self,
        channels: int,
        unit: UnitFactory,
        mask_depth: int,
        *,
        p: int = 1,
        t: int = 2,
        r: int = 1,
        attention: str = "mixed",
        residual_attention: bool = True,
        mask: str = "encoder_decoder",
        preact_units: bool = True,
    ):
        super().__init__()
        _check_options(attention, residual_attention, mask)
        for key, value, least in (("p", p, 0), ("t", t, 1), ("r", r, 0)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"attention module {key} must be an integer >= {least}, got {value!r}")
        self.residual_attention = residual_attention
        self.pre = nn.Sequential(*(unit(channels, channels, 1) for _ in range(p)))
        self.trunk = nn.Sequential(*(unit(channels, channels, 1) for _ in range(t)))
        self.mask_branch = MaskBranch(channels, unit, mask_depth, local=mask == "local_conv")
        # Pre-activation units leave their outputs un-normalised, so the head starts with BN-ReLU.
        head_preact = [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)] if preact_units else []
        self.mask_head = nn.Sequential(
            *head_preact,
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
        )
        self.mask_activation = _mask_activation(attention)
        self.post = nn.Sequential(*(unit(channels, channels, 1) for _ in range(r)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        trunk = self.trunk(x)
        mask = self.mask_activation(self.mask_head(self.mask_branch(x, trunk.shape[-2:])))
        x = (1 + mask) * trunk if self.residual_attention else mask * trunk
        return self.post(x)


# --------------------------------------------------------------------------------------------
# Units and stems


class ResNeXtBottleneck(nn.Module):
    """Post-activation ResNeXt unit (conv-BN-ReLU order) as in ResNeXt-50/101 (32x4d).

    1x1 to `width` (default out/2: 128/256/512/1024 for 256/512/1024/2048 outputs), grouped 3x3 with
    the stride and `cardinality` groups, 1x1 to `out_channels` with BN; projection shortcut is a
    strided 1x1 conv with BN; ReLU after the addition.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, cardinality: int = 32,
                 width: int | None = None):
        super().__init__()
        width = width or out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def imagenet_stem(in_chans: int = 3, width: int = 64) -> nn.Sequential:
    """7x7/2 conv (no bias), BN, ReLU, 3x3/2 max pool: 224 -> 56."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


# --------------------------------------------------------------------------------------------
# The network


@dataclass(frozen=True)
class StageSpec:
    """One stage: `units` residual units (the first with `stride`), then `modules` attention modules
    whose masks pool `mask_depth` times."""

    channels: int
    stride: int = 1
    units: int = 1
    modules: int = 1
    mask_depth: int = 1


class ResidualAttentionNet(nn.Module):
    """Stem, stages of residual units and attention modules, classifier (global average pool, FC).

    `preact_units=True` (pre-activation units, whose outputs are un-normalised) adds BN-ReLU at the
    start of each mask head and before the pooling, as the released Attention-56/92 definitions do;
    with post-activation units (`False`, AttentionNeXt) both are left out, as the released
    AttentionNeXt definition does.
    """

    def __init__(
        self,
        stages: Sequence[StageSpec],
        unit: UnitFactory,
        stem: nn.Module,
        stem_channels: int,
        *,
        num_classes: int = 1000,
        preact_units: bool = True,
        p: int = 1,
        t: int = 2,
        r: int = 1,
        attention: str = "mixed",
        residual_attention: bool = True,
        mask: str = "encoder_decoder",
    ):
        super().__init__()
        _check_options(attention, residual_attention, mask)
        self.stem = stem
        blocks: list[nn.Module] = []
        in_ch = stem_channels
        for stage in stages:
            for i in range(stage.units):
                blocks.append(unit(in_ch, stage.channels, stage.stride if i == 0 else 1))
                in_ch = stage.channels
            for _ in range(stage.modules):
                blocks.append(AttentionModule(in_ch, unit, stage.mask_depth, p=p, t=t, r=r, attention=attention,
                                              residual_attention=residual_attention, mask=mask,
                                              preact_units=preact_units))
        self.features = nn.Sequential(*blocks)
        self.norm = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True)) if preact_units else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.features(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.forward_features(x)), 1)
        return self.fc(x)


# --------------------------------------------------------------------------------------------
# Builders

# ImageNet (Table 2): stages at 56/28/14 with 1 unit then m attention modules, then 3 units at 7x7.
_IMAGENET_WIDTHS = (256, 512, 1024, 2048)


def imagenet_stages(modules: tuple[int, int, int]) -> list[StageSpec]:
    return [
        StageSpec(_IMAGENET_WIDTHS[0], stride=1, units=1, modules=modules[0], mask_depth=3),
        StageSpec(_IMAGENET_WIDTHS[1], stride=2, units=1, modules=modules[1], mask_depth=2),
        StageSpec(_IMAGENET_WIDTHS[2], stride=2, units=1, modules=modules[2], mask_depth=1),
        StageSpec(_IMAGENET_WIDTHS[3], stride=2, units=3, modules=0),
    ]


def _attention_net(modules: tuple[int, int, int], num_classes: int, in_chans: int = 3,
                   **kwargs) -> ResidualAttentionNet:
    return ResidualAttentionNet(imagenet_stages(modules), PreActBottleneck, imagenet_stem(in_chans), 64,
                                num_classes=num_classes, **kwargs)


def _attentionnext_net(modules: tuple[int, int, int], num_classes: int, in_chans: int = 3,
                       **kwargs) -> ResidualAttentionNet:
    return ResidualAttentionNet(imagenet_stages(modules), ResNeXtBottleneck, imagenet_stem(in_chans), 64,
                                num_classes=num_classes, preact_units=False, **kwargs)


@register_model(input_size=224, dataset="imagenet")
def attention56(num_classes: int = 1000, **kwargs) -> ResidualAttentionNet:
    """Attention-56 (one attention module per stage), pre-activation bottleneck units."""
    return _attention_net((1, 1, 1), num_classes, **kwargs)


@register_model(input_size=224, dataset="imagenet")
def attention92(num_classes: int = 1000, **kwargs) -> ResidualAttentionNet:
    """Attention-92 (1, 2, 3 attention modules in stages 1, 2, 3), pre-activation bottleneck units."""
    return _attention_net((1, 2, 3), num_classes, **kwargs)


@register_model(input_size=224, dataset="imagenet")
def attentionnext56(num_classes: int = 1000, **kwargs) -> ResidualAttentionNet:
    """AttentionNeXt-56: Attention-56's layout with post-activation ResNeXt (32 groups) units."""
    return _attentionnext_net((1, 1, 1), num_classes, **kwargs)


@register_model(input_size=224, dataset="imagenet")
def attentionnext92(num_classes: int = 1000, **kwargs) -> ResidualAttentionNet:
    """AttentionNeXt-92: Attention-92's layout with post-activation ResNeXt (32 groups) units."""
    return _attentionnext_net((1, 2, 3), num_classes, **kwargs)


# CIFAR (Table 6): see the module docstring for the choices where the paper is silent.
_CIFAR_WIDTHS = (64, 128, 256)


def _cifar_attention_net(m: int, num_classes: int, in_chans: int = 3, p: int = 1, t: int = 2, r: int = 1,
                         **kwargs) -> ResidualAttentionNet:
    stages = [
        StageSpec(_CIFAR_WIDTHS[0], stride=1, units=1, modules=m, mask_depth=3),
        StageSpec(_CIFAR_WIDTHS[1], stride=2, units=1, modules=m, mask_depth=2),
        StageSpec(_CIFAR_WIDTHS[2], stride=2, units=1, modules=m, mask_depth=1),
        StageSpec(_CIFAR_WIDTHS[2], stride=1, units=3, modules=0),
    ]
    stem = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
    return ResidualAttentionNet(stages, PreActBottleneck, stem, 16, num_classes=num_classes, p=p, t=t, r=r, **kwargs)


@register_model(input_size=32, dataset="cifar")
def cifar_attention56(num_classes: int = 10, **kwargs) -> ResidualAttentionNet:
    """CIFAR Attention-56: 1 attention module per stage, p, t, r = 1, 2, 1."""
    return _cifar_attention_net(1, num_classes, **kwargs)


@register_model(input_size=32, dataset="cifar")
def cifar_attention92(num_classes: int = 10, **kwargs) -> ResidualAttentionNet:
    """CIFAR Attention-92: 2 attention modules per stage, p, t, r = 1, 2, 1 (Table 6: 1.9 M parameters)."""
    return _cifar_attention_net(2, num_classes, **kwargs)


@register_model(input_size=32, dataset="cifar")
def cifar_attention128(num_classes: int = 10, **kwargs) -> ResidualAttentionNet:
    """CIFAR Attention-128: 3 attention modules per stage, p, t, r = 1, 2, 1."""
    return _cifar_attention_net(3, num_classes, **kwargs)


@register_model(input_size=32, dataset="cifar")
def cifar_attention164(num_classes: int = 10, **kwargs) -> ResidualAttentionNet:
    """CIFAR Attention-164: 4 attention modules per stage, p, t, r = 1, 2, 1."""
    return _cifar_attention_net(4, num_classes, **kwargs)


@register_model(input_size=32, dataset="cifar")
def cifar_attention236(num_classes: int = 10, **kwargs) -> ResidualAttentionNet:
    """CIFAR Attention-236: 6 attention modules per stage, p, t, r = 1, 2, 1 (Table 6: 5.1 M parameters)."""
    return _cifar_attention_net(6, num_classes, **kwargs)


@register_model(input_size=32, dataset="cifar")
def cifar_attention452(num_classes: int = 10, **kwargs) -> ResidualAttentionNet:
    """CIFAR Attention-452: 6 attention modules per stage with p, t, r = 2, 4, 3 (Table 6: 8.6 M parameters)."""
    return _cifar_attention_net(6, num_classes, **{"p": 2, "t": 4, "r": 3, **kwargs})
