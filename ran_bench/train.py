"""`ran-bench train --config FILE [--run-dir DIR] [key=value ...]`: the training loop.

The same command runs in one process, under `accelerate launch -m ran_bench train ...` and under
`torchrun ... -m ran_bench train ...`: Accelerate places the model, wraps it in DDP and keeps the
configured global batch by gradient accumulation. `main` reads like torchvision's reference
train.py: set up, resume from the run directory's newest good checkpoint, step until the schedule
(or `schedule.max_steps`) ends, logging, evaluating and checkpointing on the way, then evaluate and
write results.json. What set-up builds travels in a `Job`, where the run stands in a `Progress`.

Preemption: SIGTERM or SIGUSR1 (what SLURM sends before a time limit or a preemption) sets a
flag (`ran_bench.preemption`); the ranks sum their flags after every optimizer step (`StopVote`),
so all of them stop after the same step, at most one step after the signal; then they write a
checkpoint and exit with REQUEUE_EXIT_CODE. Starting the same command again resumes.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, set_seed

from ran_bench import metrics, trackers
from ran_bench.bench.rates import schedule_cost_line
from ran_bench.bench.record import device_description
from ran_bench.checkpoint import Checkpoint, load_checkpoint, load_latest, set_rng_state
from ran_bench.config import (
    Config,
    ConfigError,
    check_resume,
    config_from_yaml,
    gradient_accumulation_steps,
    load_config,
    to_yaml,
)
from ran_bench.data import build_loader, corrupt_labels, find_classes, list_samples
from ran_bench.errors import InputError, UserError
from ran_bench.fileio import atomic_write, write_json_atomic
from ran_bench.loop import Job, Progress, run_evaluation, signalled_anywhere, train_loop, write_results
from ran_bench.models import count_macs, count_params, create_model, model_info
from ran_bench.preemption import REQUEUE_EXIT_CODE, stop_request
from ran_bench.recipe import build_criterion, build_optimizer, build_scheduler
from ran_bench.results import ResultsError, load_results
from ran_bench.runlog import RunLog
from ran_bench.runtime import accelerate_precision, resolve_backend, resolve_precision

log = logging.getLogger("ran_bench.train")


def main(args: argparse.Namespace) -> int:
    """Train; 0 when the run reached its stop step, REQUEUE_EXIT_CODE after a signal. Bad input
    raises a UserError, which the command line prints as one line with exit status 2; train.log
    of an existing run directory says it too."""
    run_log = RunLog()
    try:
        return _train(args, run_log)
    except UserError as e:
        run_log.failed(e, run_dir_of(args))
        raise


def _train(args: argparse.Namespace, run_log: RunLog) -> int:
    stop = stop_request()  # `ran-bench train` installed its handlers before importing torch
    t_begin = time.perf_counter()
    cfg, run_dir = config_and_run_dir(args)
    accelerator = build_accelerator(cfg, run_dir)
    run_log.start(accelerator.process_index, accelerator.is_main_process)
    job = set_up(cfg, run_dir, accelerator)
    if job.main_process:  # set-up passed: from here on the run directory is written
        run_log.open(run_dir)
        save_label_noise(job)
    progress = resume(job, t_begin)
    if progress is None:
        shutdown(job)
        return 0
    start_records(job, progress)
    if signalled_anywhere(accelerator, stop):  # during set-up: nothing trained since the newest checkpoint
        log.warning("stopped by a signal before training started; exiting with %d so the launcher requeues "
                    "the run (nothing new to checkpoint)", REQUEUE_EXIT_CODE)
        shutdown(job)
        return REQUEUE_EXIT_CODE
    if progress.eval_due:  # the evaluation of the step the previous segment was stopped at by a signal
        run_evaluation(job, progress)

    if train_loop(job, progress, stop, run_log):
        log.warning("stopped by signal %s after step %d; checkpoint written, exiting with %d so the launcher "
                    "requeues the run", signal.Signals(stop.signum).name if stop.signum else "(on another rank)",
                    progress.step, REQUEUE_EXIT_CODE)
        shutdown(job)
        return REQUEUE_EXIT_CODE

    evaluations = run_evaluation(job, progress)
    write_results(job, progress, evaluations)
    shutdown(job)
    return 0


# -- set-up -----------------------------------------------------------------------------------


def config_and_run_dir(args: argparse.Namespace) -> tuple[Config, Path]:
    """The config and run directory the arguments name; bad ones raise a UserError (exit status 2)."""
    run_dir = run_dir_of(args)
    if run_dir is None:
        raise InputError("give --config FILE (a new run) or --run-dir DIR (resume a run)")
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--run-dir {run_dir} is a file, not a directory; give a new directory or a run "
                         "directory to resume")
    config_path = args.config
    if config_path is None:
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise InputError(f"{config_path} does not exist, so {run_dir} is not a run to resume; give --config "
                             "FILE to start a run")
    cfg = load_config(config_path, args.overrides)
    model_info(cfg.model.name)  # an unknown model fails here, naming the known ones
    return cfg, run_dir


def run_dir_of(args: argparse.Namespace) -> Path | None:
    """--run-dir, or runs/<config file name>; None when neither is given."""
    if args.run_dir:
        return Path(args.run_dir)
    return Path("runs") / Path(args.config).stem if args.config else None


def build_accelerator(cfg: Config, run_dir: Path) -> Accelerator:
    """Accelerate for this process: DDP over the launched processes, the run's precision and the
    gradient accumulation that keeps the global batch."""
    trackers.check_installed(cfg.log.trackers)  # before torch.distributed starts and set-up builds anything
    # cpu=True without CUDA: Accelerate then runs several CPU processes as MULTI_CPU (gloo) instead
    # of treating each as an independent single process.
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)  # initialises torch.distributed under torchrun / accelerate launch
    precision = resolve_precision(cfg.precision.name, state.device.type)
    if state.device.type == "cuda":
        # A run's input sizes are fixed, so cuDNN's autotuner pays off after the first batches; the
        # benchmarks (`ran-bench bench`) time with it on, and the trainer must run what they measure.
        torch.backends.cudnn.benchmark = True
    accelerator = Accelerator(
        cpu=cpu, gradient_accumulation_steps=gradient_accumulation_steps(cfg, state.num_processes),
        mixed_precision=accelerate_precision(precision), log_with=list(cfg.log.trackers) or None,
        project_config=trackers.project_config(run_dir))
    trackers.check_accepted(accelerator, cfg.log.trackers)
    return accelerator


def set_up(cfg: Config, run_dir: Path, accelerator: Accelerator) -> Job:
    """This rank's data, and the model, optimizer, schedule and loss, identical on every rank."""
    device, world_size = accelerator.device, accelerator.num_processes
    precision = resolve_precision(cfg.precision.name, device.type)
    log.info("run directory %s; %d process(es) on %s; global batch %d = %d x %d per device x %d accumulation; "
             "precision %s", run_dir, world_size, device, cfg.optim.global_batch_size, world_size,
             cfg.optim.per_device_batch_size, accelerator.gradient_accumulation_steps, precision)
    if accelerator.is_main_process:  # a figure only where the bench results.csv has a row of this device
        cost = schedule_cost_line(cfg.model.name, cfg.data.train_size, precision, device_description(device),
                                  cfg.stop_step * cfg.optim.global_batch_size, world_size)
        if cost is not None:
            log.info(cost)
    num_classes = cfg.data.num_classes if cfg.data.num_classes is not None else len(find_classes(cfg.data.root))
    labels, label_noise = noisy_labels(cfg, num_classes)
    loader_args = dict(backend=resolve_backend(cfg.data.backend.name, device), rank=accelerator.process_index,
                       world_size=world_size, num_threads=cfg.data.num_threads, seed=cfg.seed,
                       channels_last=cfg.model.channels_last, device=device, num_classes=num_classes)
    train_loader = build_loader(cfg.data.root, "train", size=cfg.data.train_size,
                                batch_size=cfg.optim.per_device_batch_size, labels=labels,
                                augmentation=cfg.data.augmentation, **loader_args)
    if len(train_loader) == 0:
        raise ConfigError(f"data.root {cfg.data.root}: the training split has fewer images per process than "
                          f"optim.per_device_batch_size ({cfg.optim.per_device_batch_size})")

    set_seed(cfg.seed)  # the same initial weights on every rank
    model = create_model(cfg.model.name, num_classes=num_classes, **cfg.model.options)
    macs_size = model_info(cfg.model.name).input_size
    params, macs = count_params(model), count_macs(model, macs_size)
    if cfg.model.sync_bn and world_size > 1:
        if device.type != "cuda":
            raise ConfigError("model.sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernels)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    raw_model = model
    set_seed(cfg.seed, device_specific=True)  # per-rank seeds for everything random from here on
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    if cfg.model.compile.value != "false":  # DDP wraps the compiled module; raw_model stays eager (plain keys)
        model = torch.compile(model, mode=cfg.model.compile.value)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Job(cfg=cfg, run_dir=run_dir, accelerator=accelerator, precision=precision, model=model,
               raw_model=raw_model, optimizer=optimizer, scheduler=scheduler, criterion=build_criterion(cfg),
               train_loader=train_loader, loader_args=loader_args, num_classes=num_classes, params=params,
               macs=macs, macs_size=macs_size, label_noise=label_noise,
               epoch_images=len(train_loader) * cfg.optim.per_device_batch_size * world_size)


def noisy_labels(cfg: Config, num_classes: int) -> tuple[list[int] | None, dict | None]:
    """Training labels with `data.label_noise` of them changed (the same on every rank, from the
    seed), and the record of the changes for label_noise.json; (None, None) without noise."""
    if cfg.data.label_noise <= 0:
        return None, None
    if cfg.data.root is None:
        raise ConfigError("data.label_noise needs a data set with labels (data.root)")
    _, clean, _ = list_samples(cfg.data.root, "train")
    noisy = corrupt_labels(clean, cfg.data.label_noise, num_classes, seed=cfg.seed)
    changed = [[i, a, b] for i, (a, b) in enumerate(zip(clean, noisy)) if a != b]
    return noisy, {"fraction": cfg.data.label_noise, "seed": cfg.seed, "num_samples": len(clean),
                   "num_changed": len(changed), "changes_index_from_to": changed,
                   "files": "sample index i is the i-th file of ran_bench.data.list_samples(root, 'train')"}


def save_label_noise(job: Job) -> None:
    if job.label_noise is None:
        return
    write_json_atomic(job.run_dir / "label_noise.json", job.label_noise)
    log.info("label noise: %d of %d training labels changed (seed %d), see label_noise.json",
             job.label_noise["num_changed"], job.label_noise["num_samples"], job.label_noise["seed"])


# -- where the run stands ---------------------------------------------------------------------


def resume(job: Job, t_begin: float) -> Progress | None:
    """The run's progress: from the newest good checkpoint (rank 0 chooses, so every rank loads
    the same file), or from the start; None when the run is complete already."""
    progress = Progress(loss_sum=torch.zeros((), device=job.device), t_begin=t_begin)
    found = _newest_checkpoint(job)
    if found is None:
        return progress
    path, ckpt = found
    saved_cfg = config_from_yaml(ckpt.config, f"{path} (embedded config)")
    check_resume(saved_cfg, job.cfg, path)
    if ckpt.num_classes != job.num_classes:
        raise ConfigError(f"{path} has {ckpt.num_classes} classes, this run's data has {job.num_classes} "
                          f"(data.root {job.cfg.data.root}, data.num_classes {job.cfg.data.num_classes}); resume "
                          f"with the run's data, or train with this data in a new run directory (--run-dir)")
    if ckpt.step >= job.cfg.stop_step and _finished_record(job.run_dir, ckpt.step):
        # Nothing left to do; re-evaluating would overwrite the record's measured throughput.
        log.info("already complete: %s (step %d of %d)", job.run_dir / "results.json", ckpt.step, job.cfg.stop_step)
        return None
    job.raw_model.load_state_dict(ckpt.model)
    job.optimizer.load_state_dict(ckpt.optimizer)
    job.scheduler.load_state_dict(ckpt.scheduler)
    if job.accelerator.scaler is not None and ckpt.scaler is not None:
        job.accelerator.scaler.load_state_dict(ckpt.scaler)
    progress.step, progress.epoch, progress.images_seen = ckpt.step, ckpt.epoch, ckpt.images_seen
    progress.elapsed_before, progress.device_seconds_before = ckpt.elapsed_s, ckpt.device_seconds
    progress.train_images_before, progress.train_seconds_before = ckpt.train_images, ckpt.train_seconds
    progress.skipped_before, progress.eval_due = set(ckpt.skipped_files), ckpt.eval_due
    same_split = saved_cfg.optim.per_device_batch_size == job.cfg.optim.per_device_batch_size
    if ckpt.world_size == job.world_size and same_split:
        mine = ckpt.ranks[job.accelerator.process_index]
        set_rng_state(mine["rng"])
        job.train_loader.load_state_dict(mine["data"])
        progress.loss_sum = mine["window"]["loss_sum"].to(job.device)
        progress.micro_batches = mine["window"]["micro_batches"]
    else:
        log.warning("checkpoint %s was written by %d processes x %d images per device, this run has %d x %d: "
                    "the weights, optimizer and schedule resume, epoch %d restarts from its first batch and "
                    "random streams are reseeded, so the run is not bitwise the one it would have been", path,
                    ckpt.world_size, saved_cfg.optim.per_device_batch_size, job.world_size,
                    job.cfg.optim.per_device_batch_size, progress.epoch)
    log.info("resumed from %s at step %d (epoch %d)", path, progress.step, progress.epoch)
    return progress


def _newest_checkpoint(job: Job) -> tuple[str, Checkpoint] | None:
    found, ckpt = [None], None
    if job.main_process:
        latest = load_latest(job.run_dir / "checkpoints", warn=log.warning)
        if latest is not None:
            found, ckpt = [str(latest[0])], latest[1]
    path = broadcast_object_list(found)[0] if job.world_size > 1 else found[0]
    if path is None:
        return None
    return path, ckpt if ckpt is not None else load_checkpoint(path)


def _finished_record(run_dir: Path, step: int) -> bool:
    """True when RUN_DIR/results.json is the record of training up to `step`."""
    try:
        return load_results(run_dir / "results.json").steps == step
    except ResultsError:
        return False  # missing or unreadable: the final evaluation writes it again


def start_records(job: Job, progress: Progress) -> None:
    """config.yaml as this launch resolved it, metrics.jsonl cut back to the step resumed from,
    and the trackers."""
    if job.main_process:
        _write_config(job.run_dir, job.cfg)
        metrics.truncate(job.run_dir, progress.step)
        trackers.start(job.accelerator, job.cfg, job.run_dir)


def _write_config(run_dir: Path, cfg: Config) -> None:
    path = run_dir / "config.yaml"
    text = to_yaml(cfg)
    if path.is_file() and path.read_text() != text:
        log.warning("%s differs from this run's resolved config; it is replaced (the old one is config.yaml.prev)",
                    path)
        path.replace(run_dir / "config.yaml.prev")
    with atomic_write(path) as f:
        f.write(text)


# -- checkpoints, evaluations, results --------------------------------------------------------


def shutdown(job: Job) -> None:
    job.accelerator.wait_for_everyone()
    job.accelerator.end_training()  # ends the trackers' runs, then torch.distributed (so after the barrier)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
