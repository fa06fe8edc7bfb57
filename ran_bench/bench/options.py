"""The flags of `ran-bench bench` after their defaults are resolved, and the command line that
repeats a measurement (written into every record)."""

from __future__ import annotations

import argparse
import os
import shlex

import torch

from ran_bench.bench import BenchError
from ran_bench.models import model_info
from ran_bench.runtime import resolve_precision


def default_size(args: argparse.Namespace) -> int:
    """--size, else the model's input size, else 224 (the data mode without a model)."""
    if args.size is not None:
        return args.size
    if args.model:
        return model_info(args.model).input_size
    return 224


def resolve_options(args: argparse.Namespace) -> None:
    """Check the flags of a measuring mode and fill in the defaults of --size and --precision
    (bf16 on CUDA, fp32 on CPU), so that every record and command line spells them out."""
    if args.profile and args.mode != "train":
        raise BenchError(f"--profile traces the training step: use it with bench train, not bench {args.mode}")
    if args.mode in ("train", "infer", "scaling") and not args.model:
        raise BenchError(f"bench {args.mode} needs --model NAME (see `ran-bench profile` for the names)")
    if args.model:
        model_info(args.model)  # unknown names fail here, with the list of known ones
    args.size = default_size(args)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    args.precision = resolve_precision(args.precision or ("bf16" if device_type == "cuda" else "fp32"),
                                       device_type, option="--precision")
    if args.batch_size < 1:
        raise BenchError(f"--batch-size must be >= 1, got {args.batch_size}")


def process_counts(args: argparse.Namespace) -> list[int]:
    """The process counts of a scaling run: --procs, else 1, 2, 4, 8 up to the GPU count (1, 2 on CPU)."""
    if args.procs:
        try:
            procs = [int(p) for p in args.procs.split(",")]
        except ValueError:
            raise BenchError(f"--procs must be comma-separated process counts like 1,2,4; got {args.procs!r}") from None
    elif torch.cuda.is_available():
        procs = [n for n in (1, 2, 4, 8) if n <= torch.cuda.device_count()]
    else:
        procs = [1, 2]
    if not procs or min(procs) < 1:
        raise BenchError(f"--procs must be positive process counts; got {args.procs!r}")
    if torch.cuda.is_available() and max(procs) > torch.cuda.device_count():
        raise BenchError(f"--procs {max(procs)} is more than the {torch.cuda.device_count()} GPUs here "
                         "(one process per GPU)")
    return procs


def figure_args(args: argparse.Namespace) -> list[str]:
    """The options that decide the figures, spelt out in full (resolved defaults included)."""
    if args.mode == "data":
        out = ["--backend", args.backend, "--batch-size", str(args.batch_size), "--size", str(args.size)]
        if args.data_root:
            out += ["--data-root", str(args.data_root)]
        if args.num_threads is not None:
            out += ["--num-threads", str(args.num_threads)]
        return out + ["--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    out = []
    if args.model:
        out += ["--model", args.model]
    out += ["--batch-size", str(args.batch_size), "--size", str(args.size), "--precision", args.precision]
    if args.channels_last:
        out.append("--channels-last")
    if args.compile:
        out.append("--compile")
    if args.data_root:
        out += ["--backend", args.backend, "--data-root", str(args.data_root)]
    if args.num_threads is not None:
        out += ["--num-threads", str(args.num_threads)]
    out += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.peak_tflops is not None:
        out += ["--peak-tflops", f"{args.peak_tflops:g}"]
    if args.overhead:
        out.append("--overhead")
    if args.mode == "scaling":
        out += ["--procs", ",".join(map(str, process_counts(args)))]
    return out


def command_line(args: argparse.Namespace, world_size: int) -> str:
    """The command that repeats this measurement (launcher and thread count included)."""
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    if world_size > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        nodes = f" --nnodes {world_size // local}" if world_size > local else ""
        launcher = f"torchrun --nproc_per_node {local}{nodes} -m ran_bench"
    else:
        launcher = "ran-bench"
    return f"{env}{launcher} bench {args.mode} {shlex.join(figure_args(args))}"
