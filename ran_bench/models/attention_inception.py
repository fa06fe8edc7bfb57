"""AttentionInception-56: Attention-56's stacked-attention layout built from Inception-ResNet units.

The paper builds it from Attention-56 with Inception units in place of the residual units
(Table 7: 31.9 M parameters, 6.3 G multiply-adds, tested at 299) but gives no definition, and the
authors released none. Everything beyond "Inception-ResNet units in Attention-56's layout" is
chosen here:

- Layout: exactly Attention-56's (`residual_attention.ResidualAttentionNet`, Table 2): the 7x7/2
  stem and max pool, one unit then one attention module (p, t, r = 1, 2, 1, masks pooling 3/2/1
  times) at each of the 256/512/1024-wide stages, three units at 2048, global average pool, FC.
  The attention options (`attention`, `residual_attention`, `mask`, `p`, `t`, `r`) work as there.
- Units: the Inception-ResNet unit that Inception-ResNet uses at the matching grid size, so the
  network stays "Inception" at every scale: A (1x1 | 1x1-3x3 | 1x1-3x3-3x3) at the 56x56 and 28x28
  stages, B (1x1 | 1x1-1x7-7x1) at 14x14, C (1x1 | 1x1-1x3-3x1) at 7x7. Each unit's output width
  is the stage width (256/512/1024/2048), so every unit, including those inside the masks, is a
  drop-in replacement of the bottleneck unit it stands for.
- Branch widths: the concatenated branches are 3/8 of the unit's width in every unit: A has three
  branches of width/8 (32 at 256 channels: Inception-ResNet-v1's own A unit), B and C two of
  3 * width/16 (192 at 1024, 384 at 2048). This one rule lands on the paper's parameter count
  (31.87 M against 31.9 M) with 6.65 G multiply-adds at 224 (the paper prints 6.3 G, the same
  figures as Attention-56's; B branches of 160 instead of 192 would give 6.32 G but 29.9 M).
- Down-sampling units (the first unit of stages 2-4) put the stride on each branch's first
  spatial convolution (the 1x7 and 7x1, or 1x3 and 3x1, carry one axis each) and on the 1x1
  branch, with a strided 1x1 projection shortcut with BatchNorm, as in the post-activation
  ResNeXt units of AttentionNeXt.
- Units are post-activation (conv-BN-ReLU, ReLU after the addition, residual scaled by 0.17 / 0.10
  / 0.20 for A / B / C as in Inception-ResNet), so the network is built like AttentionNeXt
  (`preact_units=False`): the unit outputs are already normalised and rectified, so the mask head
  starts with its first 1x1 conv and no BN-ReLU precedes the pooling.

Every resize is to the size of the map it meets and the pooling is global, so 224, 299 and 320
inputs all work with the same parameters.
"""

from __future__ import annotations

import torch.nn as nn

from ran_bench.models._registry import register_model
from ran_bench.models.inception_resnet import InceptionResNetA, InceptionResNetB, InceptionResNetC
from ran_bench.models.residual_attention import ResidualAttentionNet, imagenet_stages, imagenet_stem

__all__ = ["attention_inception56", "inception_attention_unit"]


def inception_attention_unit(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The Inception-ResNet unit for a stage of width `out_channels` (the unit factory of the net).

    A at 256 and 512 channels (56x56, 28x28), B at 1024 (14x14), C at 2048 (7x7); the concatenated
    branches are 3/8 of `out_channels` wide.
    """
    if out_channels in (256, 512):
        return InceptionResNetA(in_channels, out_channels, stride, branch_chs=out_channels // 8)
    if out_channels == 1024:
        return InceptionResNetB(in_channels, out_channels, stride, branch_chs=3 * out_channels // 16)
    if out_channels == 2048:
        return InceptionResNetC(in_channels, out_channels, stride, branch_chs=3 * out_channels // 16)
    raise ValueError(
        f"AttentionInception units exist for the stage widths 256, 512, 1024 and 2048, not {out_channels}"
    )


@register_model(input_size=299, dataset="imagenet")
def attention_inception56(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResidualAttentionNet:
    """AttentionInception-56: Attention-56 with Inception-ResNet units (see the module docstring)."""
    return ResidualAttentionNet(
        imagenet_stages((1, 1, 1)),
        inception_attention_unit,
        imagenet_stem(in_chans),
        64,
        num_classes=num_classes,
        preact_units=False,
        **kwargs,
    )
