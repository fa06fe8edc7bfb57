"""The measuring modes of `ran-bench bench`: train, infer, data and scaling, each returning its
record(s). The flags are resolved first (`ran_bench.bench.options.resolve_options`)."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator

from ran_bench.bench import BenchError
from ran_bench.bench.flops import (
    FLOP_CONVENTION,
    achieved_tflops,
    flops_per_image,
    model_flops_utilization,
    resolve_peak,
    roofline_fraction,
    training_roofline,
)
from ran_bench.bench.options import command_line, figure_args, process_counts
from ran_bench.bench.profiling import format_profile, profile_steps
from ran_bench.bench.record import BenchRecord, fill_environment, record_name
from ran_bench.bench.steps import (
    build_model,
    describe_images,
    endless,
    make_batches,
    overhead_arms,
    timm_counterpart,
    timm_step_fn,
    trainer_parts,
    trainer_step_fn,
)
from ran_bench.bench.timing import Timing, loader_verdict, peak_memory, reset_peak_memory, time_steps
from ran_bench.data import build_loader, default_num_threads, find_classes
from ran_bench.data.demo import make_demo
from ran_bench.models import model_info
from ran_bench.roofline import Roofline
from ran_bench.runtime import accelerate_precision, autocast, device_name, free_port


def _measure(step: Callable[[], Any], args: argparse.Namespace, device: torch.device) -> Timing:
    """`step` timed as the flags say: --warmup, then --repeats regions of --steps calls."""
    return Timing(time_steps(step, device=device, steps=args.steps, warmup=args.warmup, repeats=args.repeats),
                  args.batch_size)


def _local_device() -> torch.device:
    """This process's GPU (LOCAL_RANK under a launcher), made current; the CPU without one."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def _base_record(args: argparse.Namespace, *, mode: str, precision: str, world_size: int,
                 timing: Timing, backend: str, device: torch.device) -> BenchRecord:
    mem, kind = peak_memory(device)
    return BenchRecord(
        mode=mode, model=args.model or "", size=args.size, batch_size=args.batch_size, world_size=world_size,
        precision=precision, channels_last=args.channels_last, compile=args.compile, backend=backend,
        steps=args.steps, warmup=args.warmup, repeats=args.repeats, step_time_s=timing.step_time_s,
        step_time_median_s=timing.median_s, images_per_s=timing.images_per_s,
        images_per_s_min=timing.images_per_s_min, images_per_s_max=timing.images_per_s_max,
        images_per_s_total=timing.images_per_s * world_size, peak_memory_mib=mem, peak_memory_kind=kind,
        params=None, macs=None, flops_per_image=None, tflops=None, peak_tflops=None, peak_source="",
        mfu=None, flop_convention=FLOP_CONVENTION)


def _add_flops(record: BenchRecord, *, params: int, macs: int, device: torch.device, given_peak: float | None) -> None:
    record.params, record.macs = params, macs
    record.flops_per_image = flops_per_image(macs, record.mode)
    record.tflops = achieved_tflops(macs, record.mode, record.images_per_s)
    record.peak_tflops, record.peak_source = resolve_peak(device, record.precision, given_peak)
    record.mfu = model_flops_utilization(record.tflops, record.peak_tflops)


def _add_roofline(record: BenchRecord, device: torch.device) -> Roofline | None:
    """The unfused roofline of the measured training step on this device, where the device has
    data-sheet limits in ran_bench.roofline.DEVICES (blank with the reason elsewhere)."""
    limit, record.roofline_source = training_roofline(
        record.model, record.size, record.batch_size, device_type=device.type,
        device_name=device_name(device) if device.type == "cuda" else "", precision=record.precision)
    record.roofline_images_per_s = None if limit is None else limit.images_per_s
    record.roofline_fraction = roofline_fraction(record.images_per_s, limit)
    return limit


def run_train(args: argparse.Namespace) -> BenchRecord:
    """The trainer's step: model-only rate, optionally end-to-end rate and overhead ratios."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    accelerator = Accelerator(mixed_precision=accelerate_precision(args.precision), cpu=device_type == "cpu")
    world = accelerator.num_processes
    if args.expect_world_size and world != args.expect_world_size:
        raise BenchError(
            f"expected {args.expect_world_size} processes but Accelerate sees {world}: the launcher "
            "started independent processes (`accelerate launch --multi_gpu` does that on a machine "
            "without GPUs); launch with torchrun --nproc_per_node N")
    if args.overhead and world > 1:
        raise BenchError("--overhead compares single-process loops; run it without a launcher")
    if args.profile and world > 1:
        raise BenchError("--profile traces one process; run it without a launcher")
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, params, macs = build_model(args.model, args.size, device, channels_last=args.channels_last)
    num_classes = model_info(args.model).default_num_classes
    initial = copy.deepcopy(model) if args.overhead else None
    criterion, optimizer = trainer_parts(model)
    run_model = torch.compile(model) if args.compile else model
    run_model, optimizer = accelerator.prepare(run_model, optimizer)

    def loader(root, backend):
        return build_loader(root, "train", size=args.size, batch_size=args.batch_size, backend=backend,
                            rank=accelerator.process_index, world_size=world, num_threads=args.num_threads,
                            channels_last=args.channels_last, device=device, num_classes=num_classes)

    reset_peak_memory(device)
    model_step = trainer_step_fn(accelerator, run_model, optimizer, criterion, endless(loader(None, "synthetic")))
    timing = _measure(model_step, args, device)
    record = _base_record(args, mode="train", precision=args.precision, world_size=world, timing=timing,
                          backend="synthetic", device=device)
    _add_flops(record, params=params, macs=macs, device=device, given_peak=args.peak_tflops)
    limit = _add_roofline(record, device)

    if args.data_root:
        classes = len(find_classes(args.data_root, "train"))
        if classes > num_classes:
            raise BenchError(f"--data-root {args.data_root} has {classes} classes but {args.model} has "
                             f"{num_classes} outputs; use a data root with at most {num_classes} classes")
        real = loader(args.data_root, args.backend)
        e2e = _measure(trainer_step_fn(accelerator, run_model, optimizer, criterion, endless(real)), args, device)
        record.data_root = describe_images(args.data_root)
        record.end_to_end_backend = real.backend
        record.end_to_end_images_per_s = e2e.images_per_s
        record.end_to_end_fraction, record.limiter = loader_verdict(timing.images_per_s, e2e.images_per_s)
    if initial is not None:
        _measure_overhead(record, args, accelerator, initial, num_classes)
    fill_environment(record, device, command_line(args, world))
    if args.profile:  # after every timed region: the profiler's overhead is in none of them
        trace = Path(args.out_dir) / f"{record_name(record)}.pt.trace.json"
        print(format_profile(profile_steps(model_step, device=device, trace_path=trace), limit))
    return record


def _measure_overhead(record: BenchRecord, args: argparse.Namespace, accelerator: Accelerator,
                      initial: nn.Module, num_classes: int) -> None:
    """Step-time ratios of the trainer's step over a bare loop and over timm's recipe, from copies
    of the model's initial weights on the same pre-made batches."""
    device = accelerator.device
    batches = make_batches(4, batch_size=args.batch_size, size=args.size, num_classes=num_classes, device=device,
                           channels_last=args.channels_last)
    arms = overhead_arms(accelerator, initial, batches, precision=args.precision, compile=args.compile)
    trainer = _measure(arms.trainer_step, args, device)
    bare = _measure(arms.bare_step, args, device)
    del arms
    record.overhead_trainer_images_per_s = trainer.images_per_s
    record.bare_images_per_s = bare.images_per_s
    record.trainer_over_bare = trainer.median_s / bare.median_s
    timm_model, record.timm_model = timm_counterpart(args.model, initial, num_classes=num_classes)
    if timm_model is not None:
        timm_step = timm_step_fn(timm_model, itertools.cycle(batches), device=device, precision=args.precision,
                                 channels_last=args.channels_last, compile=args.compile)
        timm_timing = _measure(timm_step, args, device)
        record.timm_images_per_s = timm_timing.images_per_s
        record.trainer_over_timm = trainer.median_s / timm_timing.median_s


def run_infer(args: argparse.Namespace) -> BenchRecord:
    """Forward passes in eval mode under inference_mode and the precision's autocast."""
    device = _local_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, params, macs = build_model(args.model, args.size, device, channels_last=args.channels_last)
    model.eval()
    run_model = torch.compile(model) if args.compile else model
    batches = endless(build_loader(None, "train", size=args.size, batch_size=args.batch_size, backend="synthetic",
                                   channels_last=args.channels_last, device=device,
                                   num_classes=model_info(args.model).default_num_classes))

    def step() -> torch.Tensor:
        images, _ = next(batches)
        with torch.inference_mode(), autocast(device, args.precision):
            return run_model(images)

    reset_peak_memory(device)
    timing = _measure(step, args, device)
    record = _base_record(args, mode="infer", precision=args.precision, world_size=1, timing=timing,
                          backend="synthetic", device=device)
    _add_flops(record, params=params, macs=macs, device=device, given_peak=args.peak_tflops)
    return fill_environment(record, device, command_line(args, 1))


def run_data(args: argparse.Namespace) -> BenchRecord:
    """The input pipeline alone: the training loader of --backend (DALI falls back to torchvision
    when it is not installed, as in training) on --data-root, or on generated ImageNet-sized JPEGs
    (400 images, 333-500 px sides); --warmup untimed batches, then --repeats timed regions of
    --steps batches. A fixed number of batches, not whole epochs: on ImageNet an epoch is hours."""
    device = _local_device()
    threads = default_num_threads() if args.num_threads is None else args.num_threads
    with tempfile.TemporaryDirectory(prefix="ran_bench_data_") as tmp:
        root, name = args.data_root, None
        if root is None:
            root, name = Path(tmp) / "data", "generated"
            make_demo(root, seed=0, train_per_class=40, val_per_class=20, min_side=333, max_side=500, quality=90)
        loader = build_loader(str(root), "train", size=args.size, batch_size=args.batch_size, backend=args.backend,
                              num_threads=threads, device=device)
        batches = endless(loader)
        reset_peak_memory(device)
        timing = _measure(lambda: next(batches), args, device)
        images = describe_images(root, name=name)
    record = _base_record(args, mode="data", precision="fp32", world_size=1, timing=timing,
                          backend=loader.backend, device=device)
    record.data_root = images
    record.num_threads = threads
    record.channels_last = False  # the loaders' NCHW output is what was measured
    record.peak_source = "no FLOPs: input pipeline only"
    return fill_environment(record, device, command_line(args, 1))


def run_scaling(args: argparse.Namespace) -> list[BenchRecord]:
    """`bench train` under torchrun with each process count of --procs; per-process rate and
    scaling efficiency = per-process rate / per-process rate of the smallest count."""
    records = []
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")  # one core per process, like one device per process
    with tempfile.TemporaryDirectory(prefix="ran_bench_scaling_") as tmp:
        for n in process_counts(args):
            out = Path(tmp) / f"np{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                   "--master_port", str(free_port()), "-m", "ran_bench", "bench", "train",
                   *figure_args(args), "--expect-world-size", str(n), "--json", str(out), "--no-record"]
            print(f"[scaling] {n} process(es): {shlex.join(cmd)}", flush=True)
            proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
            if proc.returncode != 0 or not out.exists():
                raise BenchError(f"the {n}-process run exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}")
            rec = BenchRecord(**json.loads(out.read_text()))
            if rec.world_size != n:
                raise BenchError(f"asked torchrun for {n} processes but the benchmark ran with {rec.world_size}")
            records.append(rec)
    base = records[0].images_per_s
    command = command_line(args, 1)
    for rec in records:
        rec.mode = "scaling"
        rec.scaling_efficiency = rec.images_per_s / base
        rec.command = command
    return records
