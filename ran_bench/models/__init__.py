"""The model zoo: Residual Attention Networks and the baselines the paper compares with.

Every model is built by name with `create_model(name, num_classes=..., **overrides)`; importing
this package registers them all with ran_bench's registry and with timm's.
"""

from ran_bench.models._registry import ModelInfo, create_model, list_models, model_info, register_model

# Model families; importing each registers its builders.
from ran_bench.models import preact_resnet, residual_attention  # noqa: E402,F401  (RAN family, CIFAR ResNet-164)
from ran_bench.models import attention_inception, baselines, inception_resnet  # noqa: E402,F401  (Table 7 baselines, AttentionInception-56)
