"""ran-bench: reproduce and benchmark the Residual Attention Network on ImageNet-1K.

Importing the package is light (the command line starts without torch); importing
`ran_bench.models` registers every model with ran-bench's and timm's registries, so that
`timm.create_model("attention92")` works after `import ran_bench.models`.
"""

import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
    # `ran_bench.models` without importing it first, as when the package imported it eagerly.
    if name == "models":
        return importlib.import_module("ran_bench.models")
    raise AttributeError(f"module 'ran_bench' has no attribute {name!r}")
