"""The `ran-bench` command line.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and
`main(args) -> int`. Only the chosen subcommand's module is imported, so `ran-bench --help`
and light commands stay fast and do not pay for DALI or Accelerate.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ran_bench.errors import UserError
from ran_bench.preemption import stop_request

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "profile": ("ran_bench.profile", "parameters and multiply-adds of every model, beside the paper's"),
    "data": ("ran_bench.data.cli", "prepare, verify, generate and convert (CIFAR) datasets in the ImageNet layout"),
    "train": ("ran_bench.train", "train a model from a YAML config (single process, accelerate or torchrun)"),
    "eval": ("ran_bench.evaluate", "single-crop top-1/top-5 error of a run or checkpoint"),
    "report": ("ran_bench.report", "markdown report of runs beside the paper's tables"),
    "visualize": ("ran_bench.visualize", "soft attention masks of each stage over an image"),
    "submit": ("ran_bench.submit", "submit a training run to SLURM with submitit"),
    "bench": ("ran_bench.bench", "throughput, MFU, scaling and overhead benchmarks"),
}


def _parser() -> argparse.ArgumentParser:
    from ran_bench import __version__

    parser = argparse.ArgumentParser(
        prog="ran-bench",
        description="Residual Attention Network reproduction and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"ran-bench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        # Top-level help, --version, or an unknown command: argparse prints the right message.
        _parser().parse_args(argv)
        return 2
    name, rest = argv[0], argv[1:]
    if name == "train":
        stop_request()  # before the seconds of importing torch: a scheduler's SIGTERM then is not lost
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"ran-bench {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    try:
        # Intermixed: `eval RUN --size 320 data.root=X` mixes options and key=value overrides.
        args = parser.parse_intermixed_args(rest)
    except TypeError:
        # argparse cannot intermix for commands with sub-commands (`ran-bench data make-demo ...`).
        args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except UserError as e:  # bad input: one line naming the problem and the fix, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
