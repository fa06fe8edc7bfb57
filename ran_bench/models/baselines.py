"""The ImageNet baselines of the paper's Table 7, built from torchvision and timm.

Only Inception-ResNet-v1 has no maintained implementation; it lives in `inception_resnet.py`.
Registered input sizes are the Table 7 test sizes; the paper counts FLOPs at 224 for every row.

timm has models of the same names (resnet152, resnet200, resnext101_32x4d, inception_resnet_v2);
`timm.create_model(name)` keeps building timm's own, `ran_bench.models.create_model(name)` these.
They are the same networks except `resnet200`: timm's is post-activation, ours pre-activation.
"""

from __future__ import annotations

import timm
import torchvision
from timm.layers import BatchNormAct2d, create_conv2d
from timm.models.resnetv2 import ResNetV2

from ran_bench.models._registry import register_model

__all__ = ["resnet152", "resnet200", "resnext101_32x4d", "inception_resnet_v2"]


@register_model(input_size=224, dataset="imagenet")
def resnet152(num_classes: int = 1000, **kwargs) -> torchvision.models.ResNet:
    """ResNet-152 (He et al. 2016), torchvision's: 60.2 M parameters.

    torchvision puts the stride of a down-sampling bottleneck on its 3x3 conv (the "v1.5" that the
    released attention definitions also use); the original Caffe model strides the first 1x1,
    which has the same parameters and slightly fewer multiply-adds (11.3 G in Table 7).
    """
    return torchvision.models.resnet152(num_classes=num_classes, **kwargs)


@register_model(input_size=320, dataset="imagenet")
def resnet200(num_classes: int = 1000, **kwargs) -> ResNetV2:
    """Pre-activation ResNet-200 ("Identity Mappings in Deep Residual Networks", He et al. 2016).

    timm's ResNetV2 with BatchNorm, plain convolutions and (3, 24, 36, 3) pre-activation bottleneck
    units: BN-ReLU before each conv, stride on the 3x3, projection shortcuts (1x1 conv, no BN)
    taken from the pre-activated input, a final BN-ReLU before global pooling; 64.7 M parameters.
    The authors' Torch code applies BN-ReLU in the stem, before the max-pool, and skips the first
    unit's pre-activation; timm's stem is conv-maxpool and the first unit pre-activates after the
    max-pool: the same parameters, only the order of max-pool and BN-ReLU differs.
    """
    return ResNetV2(
        layers=[3, 24, 36, 3],
        conv_layer=create_conv2d,
        norm_layer=BatchNormAct2d,
        num_classes=num_classes,
        **kwargs,
    )


@register_model(input_size=224, dataset="imagenet")
def resnext101_32x4d(num_classes: int = 1000, **kwargs) -> timm.models.ResNet:
    """ResNeXt-101 (32x4d) (Xie et al. 2017), timm's: 44.2 M parameters (Table 7 prints 44.5)."""
    return timm.create_model("resnext101_32x4d", num_classes=num_classes, **kwargs)


@register_model(input_size=299, dataset="imagenet")
def inception_resnet_v2(num_classes: int = 1000, **kwargs) -> timm.models.InceptionResnetV2:
    """Inception-ResNet-v2 (Szegedy et al. 2016), timm's: 55.8 M parameters, tested at 299."""
    return timm.create_model("inception_resnet_v2", num_classes=num_classes, **kwargs)
