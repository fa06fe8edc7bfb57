"""`python -m ran_bench ...`, the form `accelerate launch -m ran_bench train ...` and torchrun use."""

import sys

from ran_bench.cli import main

sys.exit(main())
