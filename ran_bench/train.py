"""`ran-bench train --config FILE [--run-dir DIR] [key=value ...]`: the training loop.

The same command runs in one process, under `accelerate launch -m ran_bench train ...` and under
`torchrun ... -m ran_bench train ...`: Accelerate places the model, wraps it in DDP and keeps the
configured global batch by gradient accumulation. The loop is linear, like torchvision's
reference train.py: build everything, resume from the run directory's newest good checkpoint,
then step until the schedule (or `schedule.max_steps`) ends, logging, evaluating and
checkpointing on the way.

Preemption: SIGTERM or SIGUSR1 (what SLURM sends before a time limit or a preemption) sets a
flag; the ranks sum their flags after every optimizer step (an all-reduce, copied to the host
without blocking and read one step later, so that it never stalls the GPU), so all of them stop after the same step, at most one step after the
signal; then they write a checkpoint and exit with REQUEUE_EXIT_CODE. Starting the same command
again resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ran_bench.errors import InputError, StorageError, UserError
from ran_bench.fileio import append_text, atomic_write, device_name, git_commit, storage_errors
from ran_bench.config import Backend, Config, ConfigError, check_resume, config_from_yaml, \
    gradient_accumulation_steps, load_config, lr_at, mixed_precision, to_yaml
from ran_bench.preemption import REQUEUE_EXIT_CODE, stop_request


log = logging.getLogger("ran_bench.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config, e.g. configs/attention92.yaml (default when resuming: "
                                         "RUN_DIR/config.yaml)")
    parser.add_argument("--run-dir", help="run directory (default: runs/<config file name>); a directory "
                                          "with checkpoints is resumed")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optim.global_batch_size=512 data.root=/data/imagenet")


def train_step(accelerator, model: nn.Module, optimizer, criterion: nn.Module, images: torch.Tensor,
               labels: torch.Tensor) -> torch.Tensor:
    """One micro-batch: forward under autocast, loss, backward, optimizer step, zero_grad.

    Inside the caller's `accelerator.accumulate(model)` the prepared optimizer only steps (and
    DDP only all-reduces gradients) on the last micro-batch of an optimizer step. Returns the
    detached loss of this micro-batch.
    """
    with accelerator.autocast():
        loss = criterion(model(images), labels)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.SGD:
    """The recipe's optimizer: SGD at the base learning rate of the run's global batch."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.optim.momentum,
                           nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay)


def build_criterion(cfg: Config) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)


def main(args: argparse.Namespace) -> int:
    """Train; 0 when the run reached its stop step, REQUEUE_EXIT_CODE after a signal. Bad input
    raises a UserError, which the command line prints as one line with exit status 2; train.log
    of an existing run directory says it too."""
    run_log = _RunLog()
    try:
        return _train(args, run_log)
    except UserError as e:
        run_log.failed(e, _run_dir(args))
        raise


def _train(args: argparse.Namespace, run_log: _RunLog) -> int:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import broadcast_object_list, gather_object, set_seed

    from ran_bench.checkpoint import load_latest, rng_state, save_checkpoint, set_rng_state
    from ran_bench.data import build_loader
    from ran_bench.evaluate import evaluate, sync_buffers
    from ran_bench.models import create_model

    stop = stop_request()  # `ran-bench train` installed its handlers before importing torch
    t_begin = time.perf_counter()
    cfg, run_dir = _config_and_run_dir(args)
    # cpu=True without CUDA: Accelerate then runs several CPU processes as MULTI_CPU (gloo) instead
    # of treating each as an independent single process.
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)  # initialises torch.distributed under torchrun / accelerate launch
    accumulation = gradient_accumulation_steps(cfg, state.num_processes)
    precision = mixed_precision(cfg, state.device.type)
    if state.device.type == "cuda":
        # A run's input sizes are fixed, so cuDNN's autotuner pays off after the first batches; the
        # benchmarks (`ran-bench bench`) time with it on, and the trainer must run what they measure.
        torch.backends.cudnn.benchmark = True
    if cfg.log.tensorboard:
        _require_tensorboard()
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=accumulation, mixed_precision=precision,
                              log_with="tensorboard" if cfg.log.tensorboard else None, project_dir=str(run_dir))
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main_process = accelerator.is_main_process
    run_log.start(rank, main_process)
    log.info("run directory %s; %d process(es) on %s; global batch %d = %d x %d per device x %d accumulation; "
             "precision %s", run_dir, world_size, device, cfg.optim.global_batch_size, world_size,
             cfg.optim.per_device_batch_size, accumulation, _precision_name(precision))

    # Data: class count, optional label noise, this rank's training shard.
    num_classes = _num_classes(cfg)
    labels, label_noise = _noisy_labels(cfg, num_classes)
    backend = _backend(cfg, device)
    loader_args = dict(backend=backend, rank=rank, world_size=world_size, num_threads=cfg.data.num_threads,
                       seed=cfg.seed, channels_last=cfg.model.channels_last, device=device, num_classes=num_classes)
    train_loader = build_loader(cfg.data.root, "train", size=cfg.data.train_size,
                                batch_size=cfg.optim.per_device_batch_size, labels=labels,
                                augmentation=cfg.data.augmentation, **loader_args)
    if len(train_loader) == 0:
        raise ConfigError(f"data.root {cfg.data.root}: the training split has fewer images per process than "
                          f"optim.per_device_batch_size ({cfg.optim.per_device_batch_size})")
    epoch_images = len(train_loader) * cfg.optim.per_device_batch_size * world_size
    val_loaders: dict[int, Any] = {}

    def val_loader(size: int):
        if size not in val_loaders:
            val_loaders[size] = build_loader(cfg.data.root, "val", size=size, batch_size=cfg.eval.batch_size,
                                             augmentation=cfg.data.augmentation, **loader_args)
        return val_loaders[size]

    # Model, identical on every rank (same seed), then per-rank seeds for everything random after.
    set_seed(cfg.seed)
    model = create_model(cfg.model.name, num_classes=num_classes, **cfg.model.options)
    params, macs, macs_size = _count(cfg, model)
    if cfg.model.sync_bn and world_size > 1:
        if device.type != "cuda":
            raise ConfigError("model.sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernels)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    raw_model = model  # the module whose state_dict is checkpointed and evaluated
    set_seed(cfg.seed, device_specific=True)
    optimizer = build_optimizer(cfg, model)
    # Stepped by the loop once per optimizer step; not prepared, since Accelerate would step it
    # once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(cfg, step) / cfg.lr)
    if cfg.model.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    criterion = build_criterion(cfg)
    if main_process:  # set-up passed: from here on the run directory is written
        run_log.open(run_dir)
        if label_noise is not None:
            _save_label_noise(run_dir, label_noise)

    # Resume from the newest good checkpoint (rank 0 chooses, so every rank loads the same file).
    step, epoch, images_seen, elapsed_before, eval_due = 0, 0, 0, 0.0, False
    # Totals over the earlier segments of the run (one segment per launch), kept in checkpoints.
    train_images_before, train_seconds_before, device_seconds_before = 0, 0.0, 0.0
    skipped_before: set[str] = set()  # unreadable training files replaced so far, all ranks
    window = {"loss_sum": torch.zeros((), device=device), "micro_batches": 0}
    ckpt_dir = run_dir / "checkpoints"
    found, ckpt = [None], None
    if main_process:
        latest = load_latest(ckpt_dir, warn=log.warning)
        if latest is not None:
            found, ckpt = [str(latest[0])], latest[1]
    found = broadcast_object_list(found)[0] if world_size > 1 else found[0]
    if found is not None:
        from ran_bench.checkpoint import load_checkpoint

        ckpt = ckpt if ckpt is not None else load_checkpoint(found)
        saved_cfg = config_from_yaml(ckpt["config"], f"{found} (embedded config)")
        check_resume(saved_cfg, cfg, found)
        if ckpt["num_classes"] != num_classes:
            raise ConfigError(f"{found} has {ckpt['num_classes']} classes, this run's data has {num_classes} "
                              f"(data.root {cfg.data.root}, data.num_classes {cfg.data.num_classes}); resume with the "
                              f"run's data, or train with this data in a new run directory (--run-dir)")
        step = ckpt["step"]
        if step >= cfg.stop_step and _finished_record(run_dir, step):
            # Nothing left to do; re-evaluating would overwrite the record's measured throughput.
            log.info("already complete: %s (step %d of %d)", run_dir / "results.json", step, cfg.stop_step)
            _shutdown(accelerator, cfg)
            return 0
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if accelerator.scaler is not None and ckpt["scaler"] is not None:
            accelerator.scaler.load_state_dict(ckpt["scaler"])
        epoch, images_seen = ckpt["epoch"], ckpt["images_seen"]
        elapsed_before = ckpt["elapsed_s"]
        train_images_before, train_seconds_before = ckpt["train_images"], ckpt["train_seconds"]
        device_seconds_before = ckpt["device_seconds"]
        skipped_before = set(ckpt["skipped_files"])
        same_split = saved_cfg.optim.per_device_batch_size == cfg.optim.per_device_batch_size
        if ckpt["world_size"] == world_size and same_split:
            mine = ckpt["ranks"][rank]
            set_rng_state(mine["rng"])
            train_loader.load_state_dict(mine["data"])
            window = {"loss_sum": mine["window"]["loss_sum"].to(device),
                      "micro_batches": mine["window"]["micro_batches"]}
        else:
            log.warning("checkpoint %s was written by %d processes x %d images per device, this run has %d x %d: "
                        "the weights, optimizer and schedule resume, epoch %d restarts from its first batch and "
                        "random streams are reseeded, so the run is not bitwise the one it would have been", found,
                        ckpt["world_size"], saved_cfg.optim.per_device_batch_size, world_size,
                        cfg.optim.per_device_batch_size, epoch)
        log.info("resumed from %s at step %d (epoch %d)", found, step, epoch)
        eval_due = ckpt.get("eval_due", False)
        del ckpt
    if main_process:
        _write_config(run_dir, cfg)
        _truncate_metrics(run_dir / "metrics.jsonl", step)

    if cfg.log.tensorboard:
        accelerator.init_trackers("tensorboard", config=_flat_hparams(cfg))

    def checkpoint(eval_due: bool = False) -> None:
        rank_state = {"rng": rng_state(), "data": train_loader.state_dict(), "bad_files": list(train_loader.bad_files),
                      "window": {"loss_sum": window["loss_sum"].detach().cpu().clone(),
                                 "micro_batches": window["micro_batches"]}}
        ranks = gather_object([rank_state]) if world_size > 1 else [rank_state]
        if main_process:
            ranks = [_to_cpu(r) for r in ranks]
            segment = time.perf_counter() - t_begin
            path = save_checkpoint(ckpt_dir, step, {
                "step": step, "epoch": epoch, "epochs": images_seen / epoch_images, "images_seen": images_seen,
                "world_size": world_size, "num_classes": num_classes, "params": params, "macs": macs,
                "macs_input_size": macs_size,
                # What results.json reports about training, whichever machine writes it (see Results).
                "device_type": device.type, "device_name": device_name(device),
                "precision": _precision_name(precision),
                "elapsed_s": elapsed_before + segment, "device_seconds": device_seconds_before + world_size * segment,
                "train_images": train_images_before + (step - start_step) * cfg.optim.global_batch_size,
                "train_seconds": train_seconds_before + trained,
                "skipped_files": sorted(skipped_before.union(*(r["bad_files"] for r in ranks))),
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "ranks": ranks, "config": to_yaml(cfg), "eval_due": eval_due,
            }, keep_last=cfg.checkpoint.keep_last)
            log.info("checkpoint %s", path)
        accelerator.wait_for_everyone()

    def run_evaluation(sizes) -> list[dict]:
        sync_buffers(raw_model)  # BatchNorm statistics of rank 0 everywhere, as in the checkpoint
        out = []
        for size in sizes:
            # Built once per size and outside the timer; a DALI pipeline is still built when a pass
            # begins, so the timed pass includes that (and torchvision's worker start-up).
            loader = val_loader(size)
            t0 = time.perf_counter()
            result = evaluate(accelerator, raw_model, loader, num_classes)
            result.update(size=size, step=step, seconds=time.perf_counter() - t0)
            log.info("step %d, eval at %d px: top-1 err %.2f%%, top-5 err %.2f%% over %d images",
                     step, size, result["top1_err"], result["top5_err"], result["num_samples"])
            _append_metrics(run_dir, main_process, {"kind": "eval", "step": step, "size": size,
                                                    "top1_err": result["top1_err"], "top5_err": result["top5_err"],
                                                    "num_samples": result["num_samples"]})
            if cfg.log.tensorboard:
                accelerator.log({f"eval/top1_err_{size}": result["top1_err"],
                                 f"eval/top5_err_{size}": result["top5_err"]}, step=step)
            out.append(result)
        return out

    if _signalled_anywhere(accelerator, stop):  # during set-up: nothing trained since the newest checkpoint
        log.warning("stopped by a signal before training started; exiting with %d so the launcher requeues "
                    "the run (nothing new to checkpoint)", REQUEUE_EXIT_CODE)
        _shutdown(accelerator, cfg)
        return REQUEUE_EXIT_CODE
    if eval_due:  # the evaluation of the step the previous segment was stopped at by a signal
        run_evaluation(cfg.data.test_sizes)

    # The loop.
    stop_step = cfg.stop_step
    log.info("training %s from step %d to %d of %d (lr %.4g = %.4g per 256 images x %d / 256, %s schedule)",
             cfg.model.name, step, stop_step, cfg.total_steps, cfg.lr, cfg.optim.lr_per_256,
             cfg.optim.global_batch_size, cfg.schedule.kind.name)
    model.train()
    bar = run_log.progress_bar(total=stop_step, initial=step, disable=not main_process, unit="step",
                               dynamic_ncols=True, smoothing=0.1)
    # trained: this segment's seconds in training steps, evaluation and checkpoints excluded; it
    # grows by the time from t_mark to each pause for one of those.
    start_step, trained, t_mark = step, 0.0, time.perf_counter()
    t_window, images_window, data_wait = time.perf_counter(), 0, 0.0
    # Each rank's vote to stop, preallocated on the device: filling it queues a kernel, while
    # torch.tensor(value, device=...) would copy from the host and synchronise every step. The sum
    # over ranks is copied to pinned host memory without blocking and read one step later, after
    # waiting on an event recorded behind that copy: the CPU never waits for the step it has just
    # queued (votes.item() would, as it waits for everything queued on the stream).
    on_cuda = device.type == "cuda"
    vote = torch.zeros((), device=device)
    votes_host = torch.zeros((), pin_memory=on_cuda)
    votes_ready = torch.cuda.Event() if on_cuda else None
    signalled = False
    while step < stop_step and not signalled:
        train_loader.set_epoch(epoch)
        batches = iter(train_loader)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            data_wait += time.perf_counter() - t0
            if batch is None:  # end of the epoch
                epoch += 1
                break
            images, targets = batch
            with accelerator.accumulate(model):
                loss = train_step(accelerator, model, optimizer, criterion, images, targets)
            window["loss_sum"] += loss.float()
            window["micro_batches"] += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            scheduler.step()
            images_seen += cfg.optim.global_batch_size
            images_window += cfg.optim.global_batch_size
            bar.update(1)

            if step % cfg.log.every_steps == 0 or step == stop_step:
                total = accelerator.reduce(window["loss_sum"].clone(), "sum") if world_size > 1 else window["loss_sum"]
                loss_mean = total.item() / (window["micro_batches"] * world_size)
                now = time.perf_counter()
                record = {"kind": "train", "step": step, "epoch": images_seen / epoch_images, "loss": loss_mean,
                          "lr": lr, "images_per_s": images_window / (now - t_window),
                          "data_wait_s": data_wait, "time": elapsed_before + now - t_begin}
                _append_metrics(run_dir, main_process, record)
                if cfg.log.tensorboard:
                    accelerator.log({"train/loss": loss_mean, "train/lr": record["lr"],
                                     "train/images_per_s": record["images_per_s"]}, step=step)
                bar.set_postfix(loss=f"{loss_mean:.3f}", lr=f"{record['lr']:.3g}",
                                img_s=f"{record['images_per_s']:.0f}", refresh=False)
                window["loss_sum"].zero_()
                window["micro_batches"] = 0
                t_window, images_window, data_wait = now, 0, 0.0

            # Stop when any rank was signalled before the previous step ended (see `vote` above).
            if votes_ready is not None:
                votes_ready.synchronize()  # the previous step's copy, not the step just queued
            signalled = votes_host.item() > 0
            vote.fill_(float(stop.signum is not None))
            votes = accelerator.reduce(vote, "sum") if world_size > 1 else vote
            votes_host.copy_(votes, non_blocking=on_cuda)
            if votes_ready is not None:
                votes_ready.record()
            finished = step >= stop_step
            eval_due = bool(cfg.eval.every_steps) and step % cfg.eval.every_steps == 0 and not finished
            if eval_due and not signalled:  # when signalled, the resumed run evaluates first
                _synchronize(device)  # the steps queued so far count as training time
                t0 = time.perf_counter()
                trained += t0 - t_mark
                run_evaluation(cfg.data.test_sizes)
                model.train()
                t_mark = time.perf_counter()
                t_window += t_mark - t0  # evaluation time is not training throughput
            if step % cfg.checkpoint.every_steps == 0 or finished or signalled:
                _synchronize(device)
                t0 = time.perf_counter()
                trained += t0 - t_mark
                checkpoint(eval_due=eval_due and signalled)
                t_mark = time.perf_counter()
                t_window += t_mark - t0
            if finished or signalled:  # both wrote a checkpoint just now: `trained` is complete
                break
    bar.close()
    if signalled:
        log.warning("stopped by signal %s after step %d; checkpoint written, exiting with %d so the launcher "
                    "requeues the run", signal.Signals(stop.signum).name if stop.signum
                    else "(on another rank)", step, REQUEUE_EXIT_CODE)
        _shutdown(accelerator, cfg)
        return REQUEUE_EXIT_CODE

    # Final evaluation and results.json.
    evaluations = run_evaluation(cfg.data.test_sizes)
    bad_files = gather_object(list(train_loader.bad_files)) if world_size > 1 else list(train_loader.bad_files)
    if main_process:
        segment = time.perf_counter() - t_begin
        wall = elapsed_before + segment
        train_images = train_images_before + (step - start_step) * cfg.optim.global_batch_size
        train_seconds = train_seconds_before + trained
        first = evaluations[0]
        results = build_results(
            cfg, num_classes=num_classes, params=params, macs=macs, macs_input_size=macs_size, step=step,
            images_seen=images_seen, epochs=images_seen / epoch_images, world_size=world_size,
            device_type=device.type, device_name=device_name(device), precision=_precision_name(precision),
            wall_time_s=wall, device_seconds=device_seconds_before + world_size * segment,
            evaluations=[_evaluation(e, device, _precision_name(precision)) for e in evaluations],
            train_images_per_s=train_images / train_seconds if train_seconds > 0 else None,
            infer_images_per_s=first["num_samples"] / first["seconds"] if first["seconds"] > 0 else None,
            skipped_images=len(skipped_before.union(bad_files)))
        results.save(run_dir / "results.json")
        log.info("results: %s (%s, %d steps, %.0f s)", run_dir / "results.json",
                 "partial" if results.partial else "complete", step, wall)
    _shutdown(accelerator, cfg)
    return 0


def build_results(cfg: Config, *, num_classes: int, params: int, macs: int, macs_input_size: int, step: int,
                  images_seen: int, epochs: float, world_size: int, device_type: str, device_name: str,
                  precision: str, wall_time_s: float, device_seconds: float, evaluations: list,
                  train_images_per_s: float | None = None, infer_images_per_s: float | None = None,
                  skipped_images: int = 0):
    """The `Results` record of a run (also used by `ran-bench eval` for a run without one): the
    training fields describe the training run, whichever machine calls this; `evaluations` are
    `Evaluation`s, each naming where it ran."""
    from ran_bench import __version__
    from ran_bench.results import Results

    return Results(
        model=cfg.model.name, dataset=cfg.data.name, data_root=str(cfg.data.root), num_classes=num_classes,
        params=params, macs=macs, macs_input_size=macs_input_size, train_size=cfg.data.train_size,
        augmentation=cfg.data.augmentation, evaluations=list(evaluations), steps=step, total_steps=cfg.total_steps,
        images_seen=images_seen, epochs=epochs, global_batch_size=cfg.optim.global_batch_size,
        world_size=world_size, device_type=device_type, device_name=device_name, precision=precision,
        wall_time_s=wall_time_s, gpu_hours=device_seconds / 3600 if device_type == "cuda" else 0.0,
        git_commit=git_commit(), label_noise=cfg.data.label_noise, train_images_per_s=train_images_per_s,
        infer_images_per_s=infer_images_per_s, skipped_images=skipped_images, ran_bench_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on `device` (a no-op on CPU), so a clock read after it counts them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _evaluation(result: dict, device: torch.device, precision: str):
    """An `evaluate` result as the `Evaluation` of results.json, with the device it ran on."""
    from ran_bench.results import Evaluation

    return Evaluation(size=result["size"], top1_err=result["top1_err"], top5_err=result["top5_err"],
                      num_samples=result["num_samples"], step=result["step"],
                      skipped_images=result["skipped_images"], device_type=device.type,
                      device_name=device_name(device), precision=precision)


def _finished_record(run_dir: Path, step: int) -> bool:
    """True when RUN_DIR/results.json is the record of training up to `step`."""
    from ran_bench.results import ResultsError, load_results

    try:
        return load_results(run_dir / "results.json").steps == step
    except ResultsError:
        return False  # missing or unreadable: the final evaluation writes it again


def _config_and_run_dir(args: argparse.Namespace) -> tuple[Config, Path]:
    """The config and run directory the arguments name; bad ones raise a UserError (exit status 2)."""
    run_dir = _run_dir(args)
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
    return load_config(config_path, args.overrides), run_dir


def _run_dir(args: argparse.Namespace) -> Path | None:
    """--run-dir, or runs/<config file name>; None when neither is given."""
    if args.run_dir:
        return Path(args.run_dir)
    return Path("runs") / Path(args.config).stem if args.config else None


def _precision_name(mixed_precision: str) -> str:
    return "fp32" if mixed_precision == "no" else mixed_precision


def _backend(cfg: Config, device: torch.device) -> str:
    if cfg.data.backend is not Backend.auto:
        return cfg.data.backend.name
    from ran_bench.data import dali_available

    return "dali" if device.type == "cuda" and dali_available() else "torchvision"


def _num_classes(cfg: Config) -> int:
    if cfg.data.num_classes is not None:
        return cfg.data.num_classes
    from ran_bench.data import find_classes

    return len(find_classes(cfg.data.root))


def _noisy_labels(cfg: Config, num_classes: int) -> tuple[list[int] | None, dict | None]:
    """Training labels with `data.label_noise` of them changed (the same on every rank, from the
    seed), and the record of the changes that `_save_label_noise` writes; (None, None) without noise."""
    if cfg.data.label_noise <= 0:
        return None, None
    from ran_bench.data import corrupt_labels, list_samples

    if cfg.data.root is None:
        raise ConfigError("data.label_noise needs a data set with labels (data.root)")
    files, clean, _ = list_samples(cfg.data.root, "train")
    noisy = corrupt_labels(clean, cfg.data.label_noise, num_classes, seed=cfg.seed)
    changed = [[i, a, b] for i, (a, b) in enumerate(zip(clean, noisy)) if a != b]
    return noisy, {"fraction": cfg.data.label_noise, "seed": cfg.seed, "num_samples": len(clean),
                   "num_changed": len(changed), "changes_index_from_to": changed,
                   "files": "sample index i is the i-th file of ran_bench.data.list_samples(root, 'train')"}


def _save_label_noise(run_dir: Path, record: dict) -> None:
    from ran_bench.results import write_json_atomic

    write_json_atomic(run_dir / "label_noise.json", record)
    log.info("label noise: %d of %d training labels changed (seed %d), see label_noise.json",
             record["num_changed"], record["num_samples"], record["seed"])


def _count(cfg: Config, model: nn.Module) -> tuple[int, int, int]:
    """Parameters, and multiply-adds at the model's paper input size (224 for ImageNet models)."""
    from ran_bench.models import model_info
    from ran_bench.profile import count_macs, count_params

    size = model_info(cfg.model.name).input_size
    return count_params(model), count_macs(model, size), size


def _require_tensorboard() -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install 'ran-bench[tensorboard]' "
                          "(or set log.tensorboard=false)")


def _flat_hparams(cfg: Config) -> dict[str, Any]:
    from omegaconf import OmegaConf

    def flat(prefix: str, node) -> dict[str, Any]:
        out = {}
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                out.update(flat(name + ".", value))
            else:
                out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
        return out

    return flat("", OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True))


class _RunLog:
    """The trainer's log: stderr, and on the main process RUN_DIR/train.log. Until `open`, the
    main process keeps its lines in memory, so a run that fails set-up on bad input leaves no run
    directory behind."""

    FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")

    def __init__(self) -> None:
        self.root = logging.getLogger("ran_bench")
        self.main = os.environ.get("RANK", "0") == "0"  # until `start` knows (torchrun and Accelerate set RANK)
        self.pending: logging.handlers.MemoryHandler | None = None
        self.file: logging.FileHandler | None = None
        self.bar = None

    def start(self, rank: int, main_process: bool) -> None:
        """Log to stderr: everything on the main process (kept for train.log), warnings only,
        prefixed with the rank, elsewhere."""
        self.main = main_process
        self.root.handlers.clear()
        self.root.propagate = False
        console = logging.StreamHandler(sys.stderr)
        if main_process:
            console.setFormatter(self.FORMAT)
            self.root.setLevel(logging.INFO)
            self.pending = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
            self.root.addHandler(self.pending)
        else:
            console.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
            self.root.setLevel(logging.WARNING)
        self.root.addHandler(console)

    def open(self, run_dir: Path) -> None:
        """Create the run directory and train.log (appended to), and write the lines kept so far."""
        with storage_errors(f"create the run directory {run_dir} (--run-dir)"):
            run_dir.mkdir(parents=True, exist_ok=True)
        with storage_errors(f"write {run_dir / 'train.log'} (the run directory must be writable)"):
            self.file = logging.FileHandler(run_dir / "train.log")
        self.file.setFormatter(self.FORMAT)
        if self.pending is not None:
            self.pending.setTarget(self.file)
            self.pending.flush()
            self.root.removeHandler(self.pending)
            self.pending = None
        self.root.addHandler(self.file)

    def progress_bar(self, **kwargs):
        """The loop's tqdm progress bar on stderr."""
        from tqdm.auto import tqdm

        self.bar = tqdm(**kwargs)
        return self.bar

    def failed(self, error: UserError, run_dir: Path | None) -> None:
        """Write the error that ends the run to train.log only (the command line prints it), where
        that is a run directory already: a new run that failed set-up leaves nothing behind."""
        if self.bar is not None:
            self.bar.close()  # ends its line, so that the command line's error line starts one
        if self.file is None:
            if not (self.main and run_dir is not None and (run_dir / "config.yaml").is_file()):
                return
            try:
                self.open(run_dir)
            except StorageError:
                return  # a read-only run directory: the command line still prints the error
        self.file.handleError = lambda record: None  # a full disk: no "Logging error" traceback after the error
        self.file.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (error,), None))


def _write_config(run_dir: Path, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    text = to_yaml(cfg)
    if path.is_file() and path.read_text() != text:
        log.warning("%s differs from this run's resolved config; it is replaced (the old one is config.yaml.prev)",
                    path)
        path.replace(run_dir / "config.yaml.prev")
    with atomic_write(path) as f:
        f.write(text)


def _append_metrics(run_dir: Path, main_process: bool, record: dict) -> None:
    if main_process:
        append_text(run_dir / "metrics.jsonl", json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint being resumed from: the resumed run logs them again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a kill
    with atomic_write(path) as f:
        f.write("".join(line + "\n" for line in keep))


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_cpu(v) for v in value]
    return value


def _signalled_anywhere(accelerator, stop) -> bool:
    """Whether any rank has received a stop signal (a collective: every rank calls it)."""
    flag = torch.tensor(float(stop.signum is not None), device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "sum")
    return flag.item() > 0


def _shutdown(accelerator, cfg: Config) -> None:
    if cfg.log.tensorboard:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
