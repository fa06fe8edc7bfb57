"""ran-bench: reproduce and benchmark the Residual Attention Network on ImageNet-1K."""

__version__ = "0.1.0"

# Importing the package registers every model with ran_bench's and timm's registries, so that
# `timm.create_model("attention92")` works once `ran_bench` is imported.
from ran_bench import models  # noqa: E402,F401
