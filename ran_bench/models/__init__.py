"""The model zoo: Residual Attention Networks and the baselines the paper compares with.

Every model is built by name with `create_model(name, num_classes=..., **overrides)`; importing
this package registers them all with ran_bench's registry and with timm's.
"""

from ran_bench.models._registry import ModelInfo, create_model, list_models, model_info, register_model
from ran_bench.models.counting import MAC_CONVENTION, count_macs, count_params

# The model families: importing each registers its builders, in this order (the order of
# `list_models()` and of the model zoo's table): the RAN family and CIFAR ResNet-164, then
# AttentionInception-56 and the Table 7 baselines.
# isort: off
from ran_bench.models import preact_resnet, residual_attention
from ran_bench.models import attention_inception, baselines, inception_resnet
# isort: on

__all__ = ["MAC_CONVENTION", "ModelInfo", "count_macs", "count_params", "create_model", "list_models", "model_info",
           "register_model", "attention_inception", "baselines", "inception_resnet", "preact_resnet",
           "residual_attention"]
